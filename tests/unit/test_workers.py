"""Tests for ``--workers N``: the options, what the parent tells each worker,
the tcp descriptions, and the parent's totals.

Unit layer: no socket and no process; the listening sockets, the restart
delays (a supervisor holding a real socket) and a real ``twistd -n cserver
--workers 2`` on loopback are in tests/e2e/test_workers.py."""

import socket

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase

from cserver.config import Config
from cserver.endpoints import parse_tcp
from cserver.journal.header import Shared
from cserver.journal.recovery import Recovery
from cserver.tap import Options
from cserver.testing import MemoryJournal
from cserver.workers import WorkerStart
from cserver.workers.supervisor import WorkerProcess, WorkerSupervisor


class WorkersOptionsTests(SynchronousTestCase):
    """The --workers options, and what reaches each worker."""

    def test_workers_default_to_one_process(self):
        """Without --workers the server stays the single process it was."""
        options = Options()
        options.parseOptions([])
        assert options["workers"] == 1

    def test_workers_refuse_a_non_tcp_port(self):
        """--workers 2 with a unix: port is refused with a message naming the reason."""
        with self.assertRaises(UsageError) as caught:
            Options().parseOptions(["--workers", "2", "--port", "unix:/tmp/x.sock"])
        self.assertRegex(str(caught.exception), "tcp")

    def test_restart_delays_are_options_and_checked(self):
        """--restart-delay and --restart-max-delay parse as seconds; a max below the first
        is refused."""
        options = Options()
        options.parseOptions(["--restart-delay", "0.05", "--restart-max-delay", "0.2"])
        assert (options["restart-delay"], options["restart-max-delay"]) == (0.05, 0.2)
        with self.assertRaises(UsageError) as caught:
            Options().parseOptions(["--restart-delay", "5", "--restart-max-delay", "1"])
        self.assertRegex(str(caught.exception), "restart-max-delay")

    def test_workers_get_the_write_and_sync_options(self):
        """--writes and --sync reach each worker, in the start line its parent writes it."""
        for args, writes, sync in [
            ([], "eager", "auto"),
            (["--writes", "queued", "--sync", "thread"], "queued", "thread"),
        ]:
            options = Options()
            options.parseOptions(["--workers", "2", *args])
            start = WorkerStart(index=1, family="inet", config=options.config)
            told = WorkerStart.decode(start.encode())
            assert (told.config.writes, told.config.sync) == (writes, sync), args
            assert told == start

    def test_every_option_reaches_the_workers(self):
        """The start line carries the whole config, --auth descriptions and counters included,
        and nothing but one line."""
        options = Options()
        options.parseOptions(["--workers", "3", "--auth", "memory:a:b", "--users", "x,y",
                              "--max-line", "99", "--idle-timeout", "1.5"])
        start = WorkerStart(index=2, family="inet6", config=options.config, base_served=7,
                            base_auth_failures=3)
        line = start.encode()
        assert line.endswith(b"\n") and line.count(b"\n") == 1
        assert WorkerStart.decode(line) == start
        assert WorkerStart.decode(line).config.auth == ("memory:a:b",)

    def test_the_parent_writes_the_start_line_to_a_new_worker(self):
        """A spawned worker's first input is its start line, with its slot's counters."""
        clock = Clock()
        shared = Shared.create(2)
        try:
            shared.slot(1).served = 5
            config = Config(workers=2, max_line=10)
            supervisor = WorkerSupervisor(clock, shared, MemoryJournal(clock), Recovery(),
                                          [socket.socket(), socket.socket()], config)
            self.addCleanup(lambda: [s.close() for s in supervisor.sockets])
            spawned = []

            def spawnProcess(process, executable, args, env=None, childFDs=None):
                transport = StringTransport()
                transport.pid = 42
                process.makeConnection(transport)
                spawned.append((process, args, childFDs, transport))

            clock.spawnProcess = spawnProcess
            supervisor._spawn(1)
            [(process, args, fds, transport)] = spawned
            assert isinstance(process, WorkerProcess)
            assert args[1:] == ["-m", "cserver.workers.worker"]
            assert set(fds) == {0, 1, 2, 3, 4}
            start = WorkerStart.decode(transport.value())
            assert (start.index, start.family, start.base_served) == (1, "inet", 5)
            assert start.config == config
        finally:
            shared.close()


class ParseTcpTests(SynchronousTestCase):
    """parse_tcp."""

    def test_parse_tcp_reads_port_interface_and_backlog(self):
        """tcp and tcp6 descriptions give family, host, port and backlog, positional or
        named."""
        assert parse_tcp("tcp:0:interface=127.0.0.1:backlog=4096") == (
            socket.AF_INET, "127.0.0.1", 0, 4096)
        assert parse_tcp("tcp:port=80") == (socket.AF_INET, "0.0.0.0", 80, 50)
        assert parse_tcp("tcp6:81:interface=\\:\\:1") == (socket.AF_INET6, "::1", 81, 50)
        with self.assertRaises(ValueError):
            parse_tcp("unix:/tmp/sock")


class ParentTotalsTests(SynchronousTestCase):
    """The parent's journaled totals."""

    def test_parent_journals_totals_when_they_change(self):
        """The parent's periodic totals go into the journal, once per change."""
        clock = Clock()
        journal = MemoryJournal(clock)
        shared = Shared.create(2)
        try:
            service = WorkerSupervisor(clock, shared, journal, Recovery(), [object(), object()],
                                       Config(workers=2))
            shared.slot(0).served = 3
            shared.slot(1).served = 4
            shared.header.messages = 7
            service.log_totals()
            service.log_totals()
            clock.advance(0)
            shared.slot(1).connections = 2
            service.log_totals()
            clock.advance(0)
            records = journal.records()
            assert [r["event"] for r in records] == ["totals", "totals"]
            assert (records[0]["served"], records[0]["total"]) == (7, 7)
            assert records[1]["connections"] == 2
        finally:
            shared.close()
