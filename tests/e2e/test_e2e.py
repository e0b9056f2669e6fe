"""End-to-end tests: a real ``twistd -n cserver`` subprocess on loopback,
real journal files, real signals.

End-to-end layer."""

import os
import signal

import pytest

from cserver import __version__

from ..server_process import Load, ServerProcess, check_journal, read_journal, rss


def test_serves_and_stops_cleanly(server):
    """twistd cserver greets, authenticates, journals, acks; SIGTERM exits 0 after a stop record."""
    process = server()
    client = process.connect()
    assert client.greeting == f"HELLO cserver {__version__} proto=1.1"
    assert client.request("AUTH alice") == "OK alice"
    assert client.request("MSG hello world") == "OK 2"
    stats = client.stats()
    assert (stats["total"], stats["served"], stats["mine"]) == ("1", "1", "1")
    assert client.request("QUIT") == "OK bye"
    client.close()
    assert process.stop() == 0
    records = read_journal(process.journal)
    assert [r["event"] for r in records] == ["start", "message", "stop"]
    assert [r["seq"] for r in records] == [1, 2, 3]
    assert records[1]["text"] == "hello world"
    assert records[1]["user"] == "alice"
    assert records[2]["served"] == 1


def test_restart_continues_seq_and_counts(server, tmp_path):
    """After a restart, seq, total and per-user counts continue from the journal."""
    first = server()
    client = first.connect()
    client.request("AUTH bob")
    assert [client.request(f"MSG m{i}") for i in range(3)] == ["OK 2", "OK 3", "OK 4"]
    client.close()
    assert first.stop() == 0
    second = server(journal=first.journal)
    client = second.connect()
    client.request("AUTH bob")
    assert client.request("MSG again") == "OK 7"
    stats = client.stats()
    assert (stats["total"], stats["served"], stats["user_total"]) == ("4", "1", "4")
    client.close()
    assert second.stop() == 0
    seqs = [r["seq"] for r in read_journal(first.journal)]
    assert seqs == list(range(1, len(seqs) + 1))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_acks_inflight_messages(server, sig):
    """SIGTERM or SIGINT with a MSG in service: the MSG is acked, a stop record follows, exit 0."""
    process = server("--work-delay", "1")
    client = process.connect()
    client.request("AUTH alice")
    client.send("MSG slow one")
    _wait_inflight(process)
    process.process.send_signal(sig)
    assert client.read_line() == "OK 2"
    assert process.process.wait(20) == 0
    records = read_journal(process.journal)
    assert [r["event"] for r in records] == ["start", "message", "stop"]


def test_second_signal_while_stopping_is_harmless(server):
    """A second SIGTERM while the server drains does not break the graceful stop."""
    process = server("--work-delay", "1")
    client = process.connect()
    client.request("AUTH alice")
    client.send("MSG slow one")
    _wait_inflight(process)
    process.process.send_signal(signal.SIGTERM)
    assert process.wait_for("received signal", 10)
    process.process.send_signal(signal.SIGTERM)
    assert client.read_line() == "OK 2"
    assert process.process.wait(20) == 0
    assert not any("Traceback" in line for line in process.output)
    assert [r["event"] for r in read_journal(process.journal)] == ["start", "message", "stop"]


def test_sighup_reopens_the_journal_and_keeps_serving(server):
    """SIGHUP reopens the journal: with nothing rotated it says so and keeps the same file;
    the server keeps serving and later stops cleanly (rotation: tests/e2e/test_reopen.py)."""
    process = server()
    client = process.connect()  # a greeting: the reactor runs, its handlers are in
    inode = os.stat(process.journal).st_ino
    process.process.send_signal(signal.SIGHUP)
    assert process.wait_for("nothing rotated", 10)
    assert client.request("AUTH alice") == "OK alice"
    assert client.request("MSG after hup") == "OK 2"
    client.close()
    assert process.stop() == 0
    assert os.stat(process.journal).st_ino == inode
    assert [r["event"] for r in read_journal(process.journal)] == ["start", "message", "stop"]


def _wait_inflight(process):
    """Wait (by asking the server) until a MSG is in flight."""
    probe = process.connect()
    probe.request("AUTH bob")
    try:
        for _ in range(1000):
            if probe.stats()["inflight"] != "0":
                return
        raise AssertionError("the MSG never showed as in flight")
    finally:
        probe.close()


@pytest.mark.parametrize("mode", [[], ["--sync", "reactor"], ["--sync", "thread"],
                                  ["--writes", "queued"]],
                         ids=["default", "sync-in-reactor", "sync-thread", "queued-writes"])
def test_kill_9_under_load_loses_no_acked_message(server, mode):
    """kill -9 while 20 clients send: after restart every acked (seq, text) is in the journal,
    whichever way the server syncs and writes."""
    process = server(*mode)
    load = Load(process.port, clients=20, until=400).start()
    try:
        assert load.enough.wait(60), "the clients got no acks"
        assert process.kill() == -signal.SIGKILL
    finally:
        load.stop()
    acked = load.acked
    restarted = server(journal=process.journal)
    assert acked
    journaled = check_journal(read_journal(process.journal), acked)
    client = restarted.connect()
    client.request("AUTH bob")
    assert client.stats()["total"] == str(len(journaled))
    client.close()
    assert restarted.stop() == 0


def test_torn_tail_is_cut_and_saved(server, tmp_path):
    """A journal ending in a torn record starts: the tail is cut, saved aside and reported."""
    first = server()
    client = first.connect()
    client.request("AUTH alice")
    client.request("MSG kept")
    client.close()
    assert first.stop() == 0
    with open(first.journal, "ab") as f:
        f.write(b'{"seq":4,"time":1.5,"event":"message","pid":1,"user":"alice","te')
    second = server(journal=first.journal)
    client = second.connect()
    client.request("AUTH alice")
    assert client.request("MSG after") == "OK 5"
    client.close()
    assert second.stop() == 0
    records = read_journal(first.journal)
    start = records[3]
    assert start["event"] == "start"
    assert start["torn_bytes"] == 64
    with open(start["torn_file"], "rb") as f:
        assert f.read().startswith(b'{"seq":4,')
    assert any("torn tail of 64 bytes" in line for line in second.output)


def test_damaged_journal_stops_start(tmp_path):
    """A damaged record mid-journal stops the start with the byte offset; the file is untouched."""
    journal = tmp_path / "journal.jsonl"
    good = b'{"seq":1,"time":1.0,"event":"start","pid":1}\n'
    content = good + b"garbage\n" + good.replace(b'"seq":1', b'"seq":2')
    journal.write_bytes(content)
    process = ServerProcess(tmp_path, journal=journal)
    with pytest.raises(AssertionError, match=f"damaged at byte {len(good)}: not a valid record"):
        process.start(timeout=20)
    assert process.process.wait(20) != 0
    assert journal.read_bytes() == content


@pytest.mark.parametrize("style", ["memory", "file"])
def test_password_auth_end_to_end(server, tmp_path, style):
    """--auth memory: and --auth file: both check AUTH <user> <password>."""
    if style == "memory":
        option = "memory:carol:s3cret"
    else:
        path = tmp_path / "passwd"
        path.write_text("carol:s3cret\n")
        option = f"file:{path}"
    process = server("--auth", option)
    client = process.connect()
    assert client.request("AUTH carol wrong").startswith("ERR auth ")
    assert client.request("AUTH carol").startswith("ERR auth ")
    assert client.request("AUTH carol s3cret") == "OK carol"
    assert client.request("MSG pw") == "OK 4"
    client.close()
    assert process.stop() == 0
    records = read_journal(process.journal)
    failed = [r for r in records if r["event"] == "auth_failed"]
    assert [r["user"] for r in failed] == ["carol", "carol"]
    assert b"wrong" not in open(process.journal, "rb").read()


def test_plugin_is_found_by_twistd(tmp_path):
    """twistd lists cserver among its commands (the plugin is installed and discoverable)."""
    import subprocess

    from ..server_process import twistd_command

    out = subprocess.run(
        twistd_command() + ["--help"], capture_output=True, text=True, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": ""},
    )
    assert "cserver" in out.stdout


def test_client_that_never_reads_cannot_grow_server_memory(server):
    """A client pipelining MSGs without reading a reply is throttled by flow
    control: the server stops reading it, its RSS stays bounded, and another
    client is still answered."""
    import select
    import socket

    process = server("--work-delay", "1")
    rss_before = rss(process.process.pid)
    flood = socket.create_connection(("127.0.0.1", process.port))
    flood.sendall(b"AUTH alice\n")
    flood.setblocking(False)
    chunk = b"".join(b"MSG flood %d\n" % i for i in range(1000))
    sent = 0
    stalled = False
    while sent < 500 * 1024 * 1024:
        _, writable, _ = select.select([], [flood], [], 2.0)
        if not writable:
            stalled = True
            break
        try:
            sent += flood.send(chunk)
        except BlockingIOError:
            pass
    assert stalled, f"the server read all {sent} bytes"
    other = process.connect()
    assert other.request("AUTH bob") == "OK bob"
    stats = other.stats()
    assert 0 < int(stats["inflight"]) <= 1000
    assert int(stats["inflight_peak"]) <= 1000
    growth = rss(process.process.pid) - rss_before
    assert growth < 50 * 1024 * 1024, f"server RSS grew by {growth} bytes"
    other.close()
    flood.close()
    assert process.stop() == 0


