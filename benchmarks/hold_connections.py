"""Memory of the server holding N authenticated connections open (the bar: under 80 MB).

Starts ``twistd -n cserver`` on a free loopback port with a fresh journal and
``--max-connections 20000``, reads the idle server's RSS, then opens N
connections from this one process (a plain non-blocking socket loop, so the
client stays lean), sends ``AUTH <user>`` on each and waits for ``HELLO ...``
and ``OK <user>``.  Once all N are authenticated and still open, it reads the
server's VmRSS and VmHWM from /proc/PID/status and asks one connection for
STATS (``connections``, ``peak``: the server's own count).  Then it closes
every connection and stops the server with SIGTERM.  MB here are 10^6 bytes.

    python benchmarks/hold_connections.py                      # 10,000 connections
    python benchmarks/hold_connections.py --connections 1000 10000

Each N in ``--connections`` gets a fresh server.  One line per N::

    hold_connections: 10000 authenticated connections held open: server RSS ...

The exit status is 1 when a connection failed, the server's count differs, or
the RSS is at or over the bar (``--bar``, 80 MB).  The soft open-file limit is
raised to the hard one; N is bounded by it and by the loopback ephemeral port
range (net.ipv4.ip_local_port_range: about 28,000 ports to one server port).
"""

import argparse
import errno
import getpass
import selectors
import socket
import sys
import tempfile
import time
from collections import Counter

import _servers

MB = 1e6


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", "-c", type=int, nargs="+", default=[10000],
                        metavar="N", help="connections to hold, one server each (10000)")
    parser.add_argument("--user", default=getpass.getuser(),
                        help="the user to AUTH as and the server's --users (%(default)s)")
    parser.add_argument("--bar", type=float, default=80.0,
                        help="the RSS bar in MB, 10^6 bytes (%(default)s)")
    parser.add_argument("--window", type=int, default=1000,
                        help="connection attempts in flight at once (%(default)s)")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="seconds allowed to open and authenticate all (%(default)s)")
    parser.add_argument("--settle", type=float, default=1.0,
                        help="seconds to wait after the last AUTH before reading the RSS "
                        "(%(default)s)")
    return parser.parse_args(argv)


def open_sessions(port, count, user, window, timeout):
    """
    Open ``count`` connections to ``port`` and authenticate each, at most
    ``window`` in progress at once.  Returns ``(sockets, errors)``: the open,
    authenticated sockets and a Counter of failures by cause.
    """
    auth = f"AUTH {user}\n".encode()
    ok = f"OK {user}".encode()
    selector = selectors.DefaultSelector()
    held, errors = [], Counter()
    started = in_progress = 0
    deadline = time.monotonic() + timeout

    def fail(sock, cause):
        nonlocal in_progress
        selector.unregister(sock)
        sock.close()
        errors[cause] += 1
        in_progress -= 1

    try:
        while started < count or in_progress:
            while started < count and in_progress < window:
                started += 1
                try:
                    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                except OSError as e:
                    errors[errno.errorcode.get(e.errno, str(e))] += 1
                    continue
                sock.setblocking(False)
                code = sock.connect_ex(("127.0.0.1", port))
                if code not in (0, errno.EINPROGRESS):
                    sock.close()
                    errors[errno.errorcode.get(code, str(code))] += 1
                    continue
                selector.register(sock, selectors.EVENT_WRITE, None)
                in_progress += 1
            left = deadline - time.monotonic()
            if left <= 0:
                for key in list(selector.get_map().values()):
                    fail(key.fileobj, "timeout")
                break
            for key, _ in selector.select(min(left, 1.0)):
                sock, buffer = key.fileobj, key.data
                if buffer is None:  # the connect finished
                    code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if code:
                        fail(sock, errno.errorcode.get(code, str(code)))
                        continue
                    sock.send(auth)  # a few bytes into an empty send buffer
                    selector.modify(sock, selectors.EVENT_READ, b"")
                    continue
                try:
                    data = sock.recv(4096)
                except OSError as e:
                    fail(sock, errno.errorcode.get(e.errno, "reset"))
                    continue
                buffer += data
                lines = buffer.split(b"\r\n")
                if len(lines) >= 3:  # HELLO, the AUTH reply and what follows
                    if lines[0].startswith(b"HELLO ") and lines[1] == ok and not lines[2]:
                        selector.unregister(sock)
                        in_progress -= 1
                        held.append(sock)
                    else:
                        bad = lines[1] if lines[0].startswith(b"HELLO ") else lines[0]
                        fail(sock, bad.decode("utf-8", "replace")[:40])
                elif not data:
                    first = lines[0].decode("utf-8", "replace")[:40]
                    fail(sock, first if first.startswith("ERR") else "closed")
                else:
                    selector.modify(sock, selectors.EVENT_READ, buffer)
    except BaseException:
        close_all(held)
        raise
    finally:
        for key in list(selector.get_map().values()):
            key.fileobj.close()
        selector.close()
    return held, errors


def still_open(sockets, wait=0.2):
    """How many of ``sockets`` have nothing to read (no EOF, no stray data) after ``wait`` s."""
    selector = selectors.DefaultSelector()
    try:
        for sock in sockets:
            selector.register(sock, selectors.EVENT_READ)
        readable = len(selector.select(wait))
    finally:
        selector.close()
    return len(sockets) - readable


def stats(sock, timeout=10.0):
    """Send STATS on ``sock`` and return the reply as a dict."""
    sock.setblocking(True)
    sock.settimeout(timeout)
    sock.sendall(b"STATS\n")
    reply = b""
    while not reply.endswith(b"\n"):
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("the server closed the STATS connection")
        reply += chunk
    line = reply.decode().strip()
    if not line.startswith("OK "):
        raise RuntimeError(f"STATS: {line}")
    return dict(word.split("=", 1) for word in line[3:].split() if "=" in word)


def close_all(sockets):
    for sock in sockets:
        sock.close()
    sockets.clear()


def measure(count, args, directory):
    """One server, ``count`` connections: prints the result lines; True if within the bar."""
    with _servers.cserver(directory, "--max-connections", "20000", user=args.user) as server:
        time.sleep(args.settle)
        idle, _ = _servers.memory(server.pid)
        print(f"hold_connections: idle server RSS {idle / MB:.1f} MB", flush=True)
        start = time.monotonic()
        held, errors = open_sessions(server.port, count, args.user, args.window, args.timeout)
        try:
            seconds = time.monotonic() - start
            authenticated = len(held)
            time.sleep(args.settle)
            open_now = still_open(held)
            rss, hwm = _servers.memory(server.pid)
            counted = stats(held[0]) if held else {}
        finally:
            close_all(held)
        status = server.stop()
    connections, peak = counted.get("connections", "-"), counted.get("peak", "-")
    problems = []
    if errors or authenticated != count:
        problems.append("failed: " + ", ".join(f"{k} {v}" for k, v in errors.most_common()))
    if open_now != count:
        problems.append(f"only {open_now} still open")
    if str(connections) != str(count):
        problems.append(f"the server counts {connections}")
    if rss >= args.bar * MB:
        problems.append(f"RSS over the {args.bar:g} MB bar")
    if status != 0:
        problems.append(f"server exit status {status}")
    print(
        f"hold_connections: {authenticated} authenticated connections held open "
        f"(opened and authenticated in {seconds:.1f} s): server RSS {rss / MB:.1f} MB "
        f"(peak {hwm / MB:.1f} MB, idle {idle / MB:.1f} MB, "
        f"{(rss - idle) / max(authenticated, 1) / 1e3:.1f} kB per connection), "
        f"STATS connections={connections} peak={peak}; bar: under {args.bar:g} MB"
        + ("; " + "; ".join(problems) if problems else ""),
        flush=True,
    )
    return not problems


def main(argv=None):
    args = parse_args(argv)
    files = _servers.raise_open_files()
    needed = max(args.connections) + 64
    if files < needed:
        sys.exit(f"hold_connections: {max(args.connections)} connections need {needed} "
                 f"open files; the limit is {files} (raise the hard limit: ulimit -Hn)")
    print(f"hold_connections: {_servers.machine()}, Python {sys.version.split()[0]}",
          flush=True)
    good = True
    for count in args.connections:
        with tempfile.TemporaryDirectory(prefix="cserver-hold-") as directory:
            good = measure(count, args, directory) and good
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
