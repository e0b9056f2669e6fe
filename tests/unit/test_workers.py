"""Tests for ``--workers N``: the options, the workers' command lines, the
tcp descriptions, and the parent's totals.

Unit layer: no socket and no process; the listening sockets, the restart
delays (a supervisor holding a real socket) and a real ``twistd -n cserver
--workers 2`` on loopback are in tests/e2e/test_workers.py."""

import socket

from twisted.internet.task import Clock
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase

from cserver.journal import MemoryJournal
from cserver.recovery import Recovery
from cserver.shared import Shared
from cserver.tap import Options
from cserver.worker import parse_args
from cserver.workers import WorkerSupervisor, parse_tcp, worker_arguments


class WorkersOptionsTests(SynchronousTestCase):
    """The --workers options, and what reaches each worker's command line."""

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
        """--writes and --sync reach each worker's command line and are parsed there."""
        for args, writes, sync in [
            ([], "eager", "auto"),
            (["--writes", "queued", "--sync", "thread"], "queued", "thread"),
        ]:
            options = Options()
            options.parseOptions(["--workers", "2", *args])
            worker = parse_args(["--index", "0", "--workers", "2", *worker_arguments(options)])
            assert (worker.writes, worker.sync) == (writes, sync), args


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
                                       [])
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
