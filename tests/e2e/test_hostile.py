"""End-to-end tests: hostile and broken clients against a real ``twistd -n
cserver`` on loopback:
slowloris, idle and never-authenticating connections, more connections than
allowed, a huge line with no newline, NUL bytes, random bytes, invalid UTF-8,
very many tiny lines, and clients that flood without reading.  Each test is
bounded in time and bytes."""

import json
import random
import select
import socket
import statistics
import threading
import time

import pytest

from ..server_process import read_journal, rss

#: Every ERR code docs/protocol.rst defines.
ERR_CODES = {"auth", "busy", "encoding", "noauth", "state", "syntax", "timeout", "toolong",
             "unavailable", "unknown"}


class RawClient:
    """
    A socket that sends any bytes and reads reply lines with a deadline.
    """

    def __init__(self, port, rcvbuf=None):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(10)
        self.sock.connect(("127.0.0.1", port))
        self.buffer = b""
        self.eof = False

    def send(self, data):
        self.sock.sendall(data)

    def read_line(self, timeout=10.0):
        """
        The next reply line (CRLF-terminated, returned without it); None at
        EOF or when ``timeout`` passes first.
        """
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if self.eof or left <= 0:
                return None
            if not select.select([self.sock], [], [], left)[0]:
                return None
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                data = b""
            if not data:
                self.eof = True
            self.buffer += data
        line, _, self.buffer = self.buffer.partition(b"\n")
        assert line.endswith(b"\r"), line
        return line[:-1].decode("utf-8", "replace")

    def closed_by_server(self, timeout=5.0):
        """True once the server has closed the connection (EOF after any replies)."""
        deadline = time.monotonic() + timeout
        while not self.eof and time.monotonic() < deadline:
            if self.read_line(deadline - time.monotonic()) is None and not self.eof:
                return False
        return self.eof

    def close(self):
        self.sock.close()


def _message_records(process):
    return [r for r in read_journal(process.journal) if r["event"] == "message"]


def _still_serves(process, text="still here"):
    """The server is alive and another client can authenticate and send."""
    assert process.process.poll() is None, "".join(process.output)
    client = process.connect()
    assert client.request("AUTH bob") == "OK bob"
    reply = client.request(f"MSG {text}")
    assert reply.startswith("OK "), reply
    stats = client.stats()
    client.close()
    return int(reply[3:]), stats




def _in_threads(*functions):
    """Run the functions at once; their results, in order (an exception is re-raised)."""
    results = [None] * len(functions)

    def run(index, function):
        try:
            results[index] = function()
        except BaseException as e:  # re-raised below, in the test's thread
            results[index] = e

    threads = [threading.Thread(target=run, args=(i, f)) for i, f in enumerate(functions)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results


def _drip(port, first_lines, drip, every=1.0, stop_after=10.0):
    """
    Send ``first_lines`` (waiting for each reply), then ``drip`` one byte every
    ``every`` seconds, never a newline, reading meanwhile.  Returns the
    replies after the first lines, the seconds from the last complete line to
    the server's close, and whether it did close.
    """
    client = RawClient(port)
    assert client.read_line().startswith("HELLO ")
    for line in first_lines:
        client.send(line + b"\n")
        assert client.read_line() is not None
    started = time.monotonic()
    replies = []
    position = 0
    while time.monotonic() - started < stop_after and not client.eof:
        line = client.read_line(every)
        if line is not None:
            replies.append(line)
            continue
        if client.eof:
            break
        if position < len(drip):
            try:
                client.send(drip[position:position + 1])
            except OSError:
                break
            position += 1
    closed = client.closed_by_server(1.0)
    elapsed = time.monotonic() - started
    client.close()
    return replies, elapsed, closed


def _chatter(port, line=b"STATS\n", every=0.2, stop_after=10.0):
    """A client that sends ``line`` every ``every`` seconds and never authenticates."""
    client = RawClient(port)
    assert client.read_line().startswith("HELLO ")
    started = time.monotonic()
    replies = []
    while time.monotonic() - started < stop_after and not client.eof:
        try:
            client.send(line)
        except OSError:
            break
        reply = client.read_line(every * 5)
        if reply is None:
            break
        replies.append(reply)
        time.sleep(every)
    closed = client.closed_by_server(1.0)
    client.close()
    return replies, time.monotonic() - started, closed


def test_timeouts_close_slowloris_idle_and_unauthenticated_clients(server):
    """With --auth-timeout 1 --idle-timeout 2: a client that never authenticates is
    sent ERR timeout and closed about 1 s after connecting even while it keeps
    sending (STATS every 0.2 s) or drips an AUTH one byte a second; an
    authenticated client that drips a MSG one byte a second (never a newline)
    or sends nothing is closed about 2 s after its last complete line.  The
    partial MSG is not journaled, and the server keeps serving."""
    process = server("--auth-timeout", "1", "--idle-timeout", "2")
    port = process.port
    chatty, auth_drip, msg_drip, idle = _in_threads(
        lambda: _chatter(port),
        lambda: _drip(port, [], b"AUTH alice"),
        lambda: _drip(port, [b"AUTH alice"], b"MSG never finished"),
        lambda: _drip(port, [b"AUTH bob"], b""),
    )
    replies, elapsed, closed = chatty
    assert replies[-1] == "ERR timeout" and closed, chatty
    assert all(r.startswith("OK total=") for r in replies[:-1]), replies
    assert 0.8 <= elapsed < 3.0, chatty
    for result, low, high in [(auth_drip, 0.8, 3.0), (msg_drip, 1.8, 4.5), (idle, 1.8, 4.5)]:
        replies, elapsed, closed = result
        assert replies == ["ERR timeout"] and closed, result
        assert low <= elapsed < high, result
    _seq, stats = _still_serves(process)
    assert stats["connections"] == "1"
    assert [r["text"] for r in _message_records(process)] == ["still here"]


def test_max_connections_is_never_exceeded(server):
    """With --max-connections 10, 25 clients connecting at once: exactly 10 get
    HELLO and 15 get ERR busy and a close; STATS says connections=10 peak=10.
    Once the 10 hold-outs are closed by --auth-timeout, new clients get in,
    and peak never went past 10."""
    process = server("--max-connections", "10", "--auth-timeout", "1", "--idle-timeout", "0")
    barrier = threading.Barrier(25)

    def connect():
        barrier.wait(10)
        client = RawClient(process.port)
        return client, client.read_line()

    clients = _in_threads(*[connect] * 25)
    admitted = [c for c, first in clients if first.startswith("HELLO ")]
    refused = [c for c, first in clients if first == "ERR busy"]
    assert (len(admitted), len(refused)) == (10, 15), [first for _c, first in clients]
    for client in refused:
        assert client.closed_by_server(), "a busy connection was left open"
    admitted[0].send(b"STATS\n")
    stats = dict(item.split("=", 1) for item in admitted[0].read_line()[3:].split())
    assert (stats["connections"], stats["peak"]) == ("10", "10")
    for client in admitted:
        assert client.read_line(5) == "ERR timeout"
        assert client.closed_by_server()
    for client, _first in clients:
        client.close()
    _seq, stats = _still_serves(process)
    assert (stats["connections"], stats["peak"]) == ("1", "10")


@pytest.mark.parametrize("prefix", [b"", b"MSG "], ids=["unauthenticated", "authenticated-msg"])
def test_huge_line_without_newline_is_refused(server, prefix):
    """A client sending 1 GiB with no newline: the server answers ERR toolong
    and closes once the line passes --max-line (64 KiB), before 20 MB are
    sent; its RSS grows by under 10 MB and nothing is journaled."""
    process = server()
    rss_before = rss(process.process.pid)
    client = RawClient(process.port)
    assert client.read_line().startswith("HELLO ")
    if prefix:
        client.send(b"AUTH alice\n")
        assert client.read_line() == "OK alice"
    client.sock.setblocking(False)
    chunk = b"x" * 65536
    sent = 0
    data = prefix + chunk
    refused = False
    while sent < 1024 * 1024 * 1024:
        _, writable, _ = select.select([], [client.sock], [], 5.0)
        assert writable, f"the server stopped reading after {sent} bytes without closing"
        try:
            sent += client.sock.send(data)
        except BlockingIOError:
            continue
        except (BrokenPipeError, ConnectionResetError):
            refused = True
            break
        data = chunk
    client.sock.setblocking(True)
    assert refused, "the server read 1 GiB of one line"
    assert sent < 20 * 1024 * 1024, sent
    try:
        assert client.read_line() == "ERR toolong"
    except ConnectionResetError:
        pytest.fail("the connection was reset before ERR toolong could be read")
    growth = rss(process.process.pid) - rss_before
    assert growth < 10 * 1024 * 1024, f"server RSS grew by {growth} bytes"
    client.close()
    _still_serves(process)
    assert [r["text"] for r in _message_records(process)] == ["still here"]


def _garbage(kind):
    if kind == "nul":
        return (b"\x00" * 10000 + b"\n" + b"MSG \x00\x00\n" + b"AUTH\x00alice\n"
                + b"\x00\r\n" * 1000 + b"STATS\x00\n")
    if kind == "random":
        data = random.Random(6).randbytes(2 * 1024 * 1024)
        # No accidental QUIT or AUTH (three failures would close; five would
        # throttle the host): this test is about the bytes, not the verbs.
        lines = [line for line in data.split(b"\n")
                 if line.partition(b" ")[0].upper().rstrip(b"\r") not in (b"QUIT", b"AUTH")]
        return b"\n".join(lines) + b"\n"
    if kind == "utf8":
        lines = [b"\xff\xfe", b"MSG \xc3\x28", b"AUTH \xed\xa0\x80", b"\xc0\xaf",
                 b"\xf8\x88\x80\x80", b"STATS\xff", b"\xe2\x82", b"MSG \xf4\x90\x80\x80",
                 b"\xed\xb2\x80 x"]
        return b"".join(line + b"\n" for line in lines) * 1000
    assert kind == "tiny"
    return b"\n\r\nx\n\r\r\ny\r\n" * 40000  # 200,000 lines, 120,000 of them not empty


@pytest.mark.parametrize("kind", ["nul", "random", "utf8", "tiny"])
def test_garbage_gets_errors_never_a_crash_or_a_record(server, kind):
    """NUL bytes, 2 MB of random bytes, invalid UTF-8 lines (overlong,
    surrogates, truncated sequences) and 200,000 tiny lines from an
    unauthenticated client: every non-empty line gets exactly one ERR reply
    with a code the protocol defines, the connection stays usable (QUIT gets
    OK bye), the server keeps serving others, and no message is journaled."""
    process = server()
    data = _garbage(kind)
    expected = sum(1 for line in data.split(b"\n")[:-1]
                   if (line[:-1] if line.endswith(b"\r") else line))
    client = RawClient(process.port)
    assert client.read_line().startswith("HELLO ")
    replies = []

    def read_all():
        while True:
            line = client.read_line(20)
            if line is None:
                return
            replies.append(line)

    reader = threading.Thread(target=read_all)
    reader.start()
    client.send(data + b"QUIT\n")
    reader.join(60)
    assert not reader.is_alive()
    assert replies[-1] == "OK bye", replies[-5:]
    assert len(replies) == expected + 1
    codes = {reply.split(" ")[1] for reply in replies[:-1]}
    assert all(reply.startswith("ERR ") for reply in replies[:-1])
    assert codes <= ERR_CODES, codes
    client.close()
    _still_serves(process)
    with open(process.journal, "rb") as f:
        for line in f:
            json.loads(line)
    assert [r["text"] for r in _message_records(process)] == ["still here"]


def test_flooders_do_not_slow_down_other_clients(server):
    """Three clients pipeline MSGs as fast as they can and never read a reply
    (each with a 4 KiB receive buffer, so flow control stalls them soon):
    meanwhile another client's MSG round trips stay short (median under
    0.5 s, none over 5 s: generous bounds, as the machine may be loaded),
    the flooders end up stalled with at most 1000 MSGs each in flight
    (inflight_peak at most 3001, the probe's one included), and the
    server's RSS grows by under 50 MB."""
    process = server()
    rss_before = rss(process.process.pid)
    stalled = []

    def flood():
        client = RawClient(process.port, rcvbuf=4096)
        client.send(b"AUTH alice\n")
        client.sock.setblocking(False)
        chunk = b"".join(b"MSG flood %d\n" % i for i in range(1000))
        sent = 0
        while sent < 200 * 1024 * 1024:
            if not select.select([], [client.sock], [], 1.0)[1]:
                stalled.append(sent)
                return client
            try:
                sent += client.sock.send(chunk)
            except BlockingIOError:
                pass
        return client

    def probe():
        client = process.connect()
        assert client.request("AUTH bob") == "OK bob"
        times = []
        for i in range(300):
            started = time.monotonic()
            assert client.request(f"MSG probe {i}").startswith("OK ")
            times.append(time.monotonic() - started)
        return client, times

    *flooders, (other, times) = _in_threads(flood, flood, flood, probe)
    assert statistics.median(times) < 0.5, statistics.median(times)
    assert max(times) < 5.0, max(times)
    assert len(stalled) == 3, "a flooder was never stalled"
    stats = other.stats()
    assert int(stats["inflight_peak"]) <= 3 * 1000 + 1, stats  # the flooders' and the probe's
    growth = rss(process.process.pid) - rss_before
    assert growth < 50 * 1024 * 1024, f"server RSS grew by {growth} bytes"
    other.close()
    for client in flooders:
        client.close()
    assert process.stop() == 0


def test_pipelined_short_lines_are_never_too_long(server):
    """A client that pipelines 1500 short MSGs in one write, with --max-line 256
    and --work-delay 0.5 (so 1000 are in flight and the server stops reading):
    every MSG is acked, none is answered ERR toolong -- each line is 12 bytes."""
    process = server("--max-line", "256", "--work-delay", "0.5")
    client = RawClient(process.port)
    assert client.read_line().startswith("HELLO ")
    client.send(b"AUTH alice\n" + b"".join(b"MSG m%06d\n" % i for i in range(1500)))
    assert client.read_line() == "OK alice"
    replies = []
    while len(replies) < 1500:
        line = client.read_line(10)
        if line is None:
            break
        replies.append(line)
    client.close()
    assert [r.split(" ")[0] for r in replies] == ["OK"] * 1500, replies[-3:]
