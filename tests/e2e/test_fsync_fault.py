"""An fsync failure under a real ``twistd -n cserver``: once an fdatasync of
the journal fails, nothing more is acknowledged until the server is
restarted, and the restart on the same journal recovers.  And a slow
fdatasync: what it holds up with the sync in the reactor, in a thread, and
with ``--sync auto`` (the default), which moves it to the thread.

The failure is injected from outside the package: tests/e2e/fsync_fault.c,
compiled here with the C compiler and loaded into the server with
LD_PRELOAD, makes fdatasync(2) and fsync(2) fail with EIO while a trigger
file exists (its path in ``$CSERVER_FAULT_FSYNC_TRIGGER``), or sleep first
(``$CSERVER_FAULT_FSYNC_DELAY_MS``), and forwards them to libc otherwise.
Python's ``os.fdatasync`` reaches it: libpython calls libc's dynamic
``fdatasync`` symbol, which the preloaded library defines first.  (The unit
tests in tests/unit/test_journal.py replace ``FileJournal._os_fdatasync``
instead.)

End-to-end layer."""

import errno
import os
import re
import select
import time
from contextlib import contextmanager, suppress

import pytest

from ..server_process import ServerProcess, read_journal

TRIGGER_VARIABLE = "CSERVER_FAULT_FSYNC_TRIGGER"

#: Why the server refuses once an fsync failed (what ``_describe`` makes of EIO).
REASON = f"fsync failed: EIO {os.strerror(errno.EIO)}"
REFUSED = f"ERR unavailable {REASON}"
#: What the server logs when the fsync fails.
FAILURE_LOGGED = re.compile(
    re.escape(f"[cserver.journal#critical] journal: {REASON}; "
              "no more records are taken until restart")
)


class FaultyDisk:
    """
    Starts servers (users alice and bob) with the shim preloaded, all on
    one journal in ``directory``; the shim's fsyncs fail while
    :attr:`trigger` exists.
    """

    def __init__(self, directory, shim):
        self.directory = directory
        self.journal = directory / "journal.jsonl"
        self.trigger = directory / "fsync-fails"
        preload = " ".join(filter(None, [shim, os.environ.get("LD_PRELOAD")]))
        self.env = {"LD_PRELOAD": preload, TRIGGER_VARIABLE: str(self.trigger)}
        self.shim = shim
        self.servers = []

    def start(self, *args):
        server = ServerProcess(self.directory, "--users", "alice,bob", *args,
                               journal=self.journal, env=self.env)
        self.servers.append(server)
        return server.start()

    def fail_fsyncs(self):
        self.trigger.touch()

    def heal(self):
        self.trigger.unlink()


@pytest.fixture
def disk(tmp_path, shim):
    disk = FaultyDisk(tmp_path, shim)
    yield disk
    for server in disk.servers:
        if server.process.poll() is None:
            server.kill()


def _text(prefix, i):
    return f'{prefix} {i} "q" \\ é'


def _ack(client, prefix, count):
    """
    ``count`` MSGs, one at a time, each of which must be acked; their
    (seq, text), the seqs contiguous.
    """
    acked = []
    for i in range(count):
        text = _text(prefix, i)
        reply = client.request(f"MSG {text}")
        assert reply.startswith("OK "), reply
        acked.append((int(reply[3:]), text))
    seqs = [seq for seq, _ in acked]
    assert seqs == list(range(seqs[0], seqs[0] + count)), seqs
    return acked


def _messages(records):
    return [(r["seq"], r["text"]) for r in records if r["event"] == "message"]


def _break(server, disk, client):
    """
    Make fsyncs fail and send one MSG: it is refused, naming the fsync
    failure, and the server logs the failure.
    """
    disk.fail_fsyncs()
    assert client.request("MSG refused while fsync fails") == REFUSED
    assert server.wait_for(FAILURE_LOGGED, 10), "".join(server.output)


def _serving_and_broken(disk, count=3, args=()):
    """
    A server (started with ``args``) that acked ``count`` MSGs from alice and
    then had an fsync fail; the server, alice's connection and the acked
    (seq, text).
    """
    server = disk.start(*args)
    client = server.connect()
    assert client.request("AUTH alice") == "OK alice"
    # An ack means every record up to it is synced, the start record too, so
    # the failure hits the next MSG and nothing before it.
    acked = _ack(client, "before", count)
    _break(server, disk, client)
    return server, client, acked


def test_shim_loaded_and_not_triggered_acks_normally(disk):
    """With the shim preloaded and no trigger file, MSGs -- one at a time and
    pipelined -- are acked with contiguous seqs, journaled with their text,
    and SIGTERM exits 0 after a ``stop`` record: the shim forwards to the real
    fdatasync."""
    server = disk.start()
    with open(f"/proc/{server.process.pid}/maps") as f:
        assert disk.shim in f.read(), "the fsync shim is not loaded in the server"
    client = server.connect()
    assert client.request("AUTH alice") == "OK alice"
    acked = _ack(client, "one by one", 5)
    texts = [_text("pipelined", i) for i in range(3)]
    client.send(*(f"MSG {text}" for text in texts))
    last = acked[-1][0]
    for i, text in enumerate(texts, 1):
        assert client.read_line() == f"OK {last + i}"
        acked.append((last + i, text))
    client.close()
    assert server.stop() == 0
    records = read_journal(disk.journal)
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
    assert _messages(records) == acked
    assert [records[0]["event"], records[-1]["event"]] == ["start", "stop"]


@pytest.mark.parametrize("args", [("--sync", "reactor"), ("--sync", "thread")],
                         ids=["reactor", "thread"])
def test_fsync_failure_refuses_the_msg_and_the_server_keeps_running(disk, args):
    """Once fsyncs fail, the next MSG gets ``ERR unavailable fsync failed: EIO
    Input/output error``; the server logs ``journal: fsync failed: ...; no
    more records are taken until restart`` at level critical, keeps running
    and still answers STATS (the refused MSG not counted); the refused
    record is cut off the file, which holds exactly the acked MSGs.  The
    same whether the fdatasync runs in the reactor or in the sync thread."""
    server, client, acked = _serving_and_broken(disk, args=args)
    assert server.process.poll() is None, "the server exited after the fsync failure"
    stats = client.stats()
    assert (stats["total"], stats["served"], stats["inflight"]) == ("3", "3", "0"), stats
    assert server.process.poll() is None
    records = read_journal(disk.journal)
    assert [r["event"] for r in records] == ["start", "message", "message", "message"]
    assert _messages(records) == acked


def test_after_an_fsync_failure_msgs_are_refused_even_once_fsync_works(disk):
    """An fsync error is not retried and not trusted: with the trigger file
    gone (fsync would succeed again), MSGs on the same connection -- one, and
    three pipelined -- and on a new connection still get the same ``ERR
    unavailable fsync failed: ...``; AUTH and STATS still work, and nothing
    more reaches the journal."""
    server, client, acked = _serving_and_broken(disk)
    disk.heal()
    assert client.request("MSG after the trigger is gone") == REFUSED
    client.send(*(f"MSG {_text('pipelined', i)}" for i in range(3)))
    assert [client.read_line() for _ in range(3)] == [REFUSED] * 3
    other = server.connect()
    assert other.greeting.startswith("HELLO cserver ")
    assert other.request("AUTH bob") == "OK bob"
    assert other.request("MSG from a new connection") == REFUSED
    assert other.stats()["total"] == "3"
    assert server.process.poll() is None
    assert _messages(read_journal(disk.journal)) == acked


def test_sigterm_after_an_fsync_failure_exits_0_without_a_stop_record(disk):
    """SIGTERM after an fsync failure stops the server gracefully: exit
    status 0, ``could not journal the stop record: fsync failed: ...`` logged
    at level error, then ``cserver stopped``; the journal gets no ``stop``
    record and ends with the last acked MSG."""
    server, client, acked = _serving_and_broken(disk)
    # fsync works again, yet the stop record is refused: the journal stays
    # broken for the life of the process (FileJournal.broken), and every
    # record -- the stop record too -- is refused with that reason without a
    # write.  The service logs it and stops as usual, so the exit status is
    # the graceful 0 and does not tell that the journal broke; only the log
    # and the missing stop record do.
    disk.heal()
    assert server.stop() == 0
    assert server.wait_for(re.escape(f"could not journal the stop record: {REASON}"), 10), (
        "".join(server.output))
    assert server.wait_for(r"cserver stopped: served 3, total 3", 10), "".join(server.output)
    records = read_journal(disk.journal)
    assert "stop" not in [r["event"] for r in records]
    assert records[-1]["event"] == "message"
    assert _messages(records) == acked
    client.close()


def test_restart_without_the_fault_recovers_the_journal_and_acks_again(disk):
    """After an fsync failure and SIGTERM, twistd started again (shim loaded,
    no trigger) on the same journal recovers it cleanly (no torn tail, its
    ``start`` record right after the last acked MSG, which it counts); every
    MSG acked before the failure is in the journal with its seq and text,
    none refused is, seqs are contiguous, and new MSGs are acked again with
    the next seqs."""
    server, client, acked = _serving_and_broken(disk)
    other = server.connect()
    assert other.request("AUTH bob") == "OK bob"
    assert other.request("MSG bob while broken") == REFUSED
    client.close()
    other.close()
    assert server.stop() == 0
    disk.heal()

    restarted = disk.start()
    client = restarted.connect()
    assert client.request("AUTH bob") == "OK bob"
    after = _ack(client, "after restart", 3)
    assert after[0][0] == acked[-1][0] + 2  # the new start record takes the seq between
    assert client.stats()["total"] == "6"
    client.close()
    assert restarted.stop() == 0

    records = read_journal(disk.journal)
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
    assert _messages(records) == acked + after
    assert [r["event"] for r in records] == (
        ["start"] + ["message"] * 3 + ["start"] + ["message"] * 3 + ["stop"]
    )
    start = records[4]
    assert start["pid"] == restarted.process.pid
    assert (start["last_seq"], start["messages"], start["torn_bytes"]) == (acked[-1][0], 3, 0)
    assert not any("refused" in r.get("text", "") or "broken" in r.get("text", "")
                   for r in records)


def test_a_new_journal_that_cannot_be_synced_stops_the_start(disk):
    """A new journal file whose fsync fails is not served: twistd exits 1,
    saying it cannot open the journal and why, and leaves no file behind."""
    disk.fail_fsyncs()
    with pytest.raises(AssertionError, match="server did not start") as failed:
        disk.start()
    assert f"cannot open journal {disk.journal}: Input/output error" in str(failed.value)
    assert disk.servers[-1].process.wait(10) == 1
    assert not os.path.exists(disk.journal)
    assert not os.path.exists(f"{disk.journal}.lock")


def test_fsync_failing_from_the_start_refuses_msgs_and_says_why(disk):
    """When the start record's fsync already fails (an existing journal), the
    server logs ``could not journal the start record: fsync failed: ...`` (no
    unhandled-error traceback), keeps listening and refuses MSGs with that
    reason; the file keeps no record of this run."""
    first = disk.start()
    client = first.connect()
    assert client.request("AUTH alice") == "OK alice"
    _ack(client, "first run", 1)
    client.close()
    assert first.stop() == 0
    before = read_journal(disk.journal)
    disk.fail_fsyncs()
    server = disk.start()
    assert server.wait_for(re.escape(f"could not journal the start record: {REASON}"), 10), (
        "".join(server.output))
    client = server.connect()
    assert client.request("AUTH alice") == "OK alice"
    assert client.request("MSG while the disk fails") == REFUSED
    client.close()
    assert server.stop() == 0
    assert not any("Unhandled error" in line for line in server.output), "".join(server.output)
    assert read_journal(disk.journal) == before


# -- a slow disk ----------------------------------------------------------------------------

#: How long each fdatasync takes while the disk is slow: far longer than a
#: STATS round trip, so that the order of the replies below is certain.
SLOW_SYNC_MS = 1500


@contextmanager
def _slow_disk(tmp_path, shim, *args):
    """
    A server (users alice and bob, started with ``args``) whose fdatasyncs
    take SLOW_SYNC_MS while ``tmp_path/slow`` exists (the shim creates
    ``tmp_path/syncing`` as each slow one begins); yields alice's and bob's
    authenticated connections.  The server must then stop with status 0.
    """
    env = {
        "LD_PRELOAD": " ".join(filter(None, [shim, os.environ.get("LD_PRELOAD")])),
        "CSERVER_FAULT_FSYNC_DELAY_MS": str(SLOW_SYNC_MS),
        "CSERVER_FAULT_FSYNC_SLOW": str(tmp_path / "slow"),
        "CSERVER_FAULT_FSYNC_MARK": str(tmp_path / "syncing"),
    }
    server = ServerProcess(tmp_path, "--users", "alice,bob", *args, env=env).start()
    try:
        writer, probe = server.connect(), server.connect()
        assert writer.request("AUTH alice") == "OK alice"
        assert probe.request("AUTH bob") == "OK bob"
        yield writer, probe
        writer.close()
        probe.close()
        assert server.stop() == 0
    finally:
        if server.process.poll() is None:
            server.kill()


def _stats_during_a_slow_sync(tmp_path, writer, probe):
    """
    With the disk slow, send a MSG on ``writer``; once its fdatasync has
    begun, STATS on ``probe``.  Returns STATS's ``inflight`` and whether the
    MSG's ack had come by then; then waits for the ack, and makes the disk
    quick again.
    """
    mark = tmp_path / "syncing"
    with suppress(FileNotFoundError):
        mark.unlink()
    (tmp_path / "slow").touch()
    writer.send("MSG written to a slow disk")
    deadline = time.monotonic() + 10
    while not mark.exists():  # the shim creates it as the slow sync begins
        assert time.monotonic() < deadline, "no fdatasync began"
        time.sleep(0.005)
    stats = probe.stats()
    acked_already = select.select([writer.sock], [], [], 0)[0] != []
    assert writer.read_line().startswith("OK ")
    (tmp_path / "slow").unlink()
    return stats["inflight"], acked_already


@pytest.mark.parametrize("mode, answered_during_sync", [("thread", True), ("reactor", False)])
def test_a_slow_fsync_holds_up_other_clients_only_in_the_reactor(
        tmp_path, shim, mode, answered_during_sync):
    """While a MSG's fdatasync is under way (the shim makes it take 1.5 s), a STATS from
    another client is answered at once with --sync thread -- the MSG still in flight and
    not yet acked -- while with --sync reactor the reactor waits for the sync: STATS is
    answered after the MSG's ack, with nothing in flight.  The MSG is acked in both."""
    with _slow_disk(tmp_path, shim, "--sync", mode) as (writer, probe):
        seen = _stats_during_a_slow_sync(tmp_path, writer, probe)
        assert seen == (("1", False) if answered_during_sync else ("0", True))


def test_auto_sync_moves_to_the_thread_once_the_disk_is_slow(tmp_path, shim):
    """With --sync auto (the default) a quick disk is synced in the reactor; after one slow
    fdatasync, which held up the reactor, the next is made in the thread (STATS answered
    during it); once the disk is quick again, a few syncs bring the average down and the
    reactor syncs again."""
    with _slow_disk(tmp_path, shim) as (writer, probe):
        assert writer.request("MSG quick").startswith("OK ")
        assert _stats_during_a_slow_sync(tmp_path, writer, probe) == ("0", True)
        assert _stats_during_a_slow_sync(tmp_path, writer, probe) == ("1", False)
        # An average of two 1.5 s syncs, a fifth of each new one's weight: 40 quick
        # syncs bring it from about 0.5 s to under 2 ms.
        for i in range(40):
            assert writer.request(f"MSG quick {i}").startswith("OK ")
        assert _stats_during_a_slow_sync(tmp_path, writer, probe) == ("0", True)
