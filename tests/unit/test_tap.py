"""Tests for cserver.tap and the twistd plugin: options, service, discovery;
and the process helpers makeService uses (cserver.process).

Unit layer: makeService runs on a memory reactor (nothing listens for real)."""

import gc
import getpass
import os
import pathlib
import resource
import socket
import sys

from twisted.application.service import IServiceMaker
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.plugin import getPlugins
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase

from cserver import tap
from cserver.auth import AllowListChecker, TextOrBytesChecker
from cserver.endpoints import with_backlog
from cserver.journal import AutoSyncer, InlineSyncer, SyncThread
from cserver.process import ParentWatch, describe_address, describe_socket, raise_open_file_limit
from cserver.tap import Options, makeService

from ..common import FakeReactor
from .base import RestoreInterpreter, Temporary


def parse(*args):
    options = Options()
    options.parseOptions(list(args))
    return options


#: Bad option values, and (a regular expression of) what the UsageError says.
BAD_OPTIONS = [
    (["--fsync", "sometimes"], "--fsync must be one of always, interval, never"),
    (["--max-connections", "0"], "must be at least 1"),
    (["--max-connections", "0"], "^--max-connections must be at least 1, not 0$"),
    (["--workers", "0"], "^--workers must be at least 1, not 0$"),
    (["--max-line", "many"], "^--max-line must be a whole number, not 'many'$"),
    (["--idle-timeout", "-1"], "^--idle-timeout must be at least 0 s, not -1$"),
    (["--work-delay", "nan"], "^--work-delay must be at least 0 s, not nan$"),
    (["--auth-throttle", "-2"], "^--auth-throttle must be at least 0, not -2$"),
    (["--users", " , "], "--users names nobody"),
    (["--writes", "lazy"], "--writes must be one of eager, queued"),
    (["--poll", "fast"], "--poll must be one of lean, twisted"),
    (["--sync", "never"], "--sync must be one of auto, reactor, thread"),
]


class OptionsTests(Temporary, SynchronousTestCase):
    """Parsing the twistd cserver options."""

    def test_defaults(self):
        """With no options: loopback port 31337 with a large backlog, the seed's auth, fsync
        always."""
        options = parse()
        expected = {
            "port": "tcp:31337:interface=127.0.0.1:backlog=4096",
            "journal": "cserver.jsonl",
            "fsync": "always",
            "users": getpass.getuser(),
            "user_list": [getpass.getuser()],
            "max-connections": 10000,
            "idle-timeout": 300.0,
            "auth-timeout": 30.0,
            "max-line": 65536,
            "work-delay": 0.0,
            "auth-throttle": 5,
            "writes": "eager",
            "sync": "auto",
        }
        assert {key: options[key] for key in expected} == expected
        assert not options.get("credCheckers")

    def test_all_options(self):
        """Every option is parsed and coerced to its type."""
        options = parse(
            "--port", "tcp:4000", "--journal", "/tmp/j", "--fsync", "interval",
            "--users", "alice, bob,", "--max-connections", "5", "--idle-timeout", "1.5",
            "--auth-timeout", "0", "--max-line", "100", "--work-delay", "3",
        )
        assert options["port"] == "tcp:4000:backlog=4096"
        assert options["journal"] == "/tmp/j"
        assert options["fsync"] == "interval"
        assert options["user_list"] == ["alice", "bob"]
        assert (options["max-connections"], options["max-line"]) == (5, 100)
        assert (options["idle-timeout"], options["auth-timeout"], options["work-delay"]) == (
            1.5, 0.0, 3.0,
        )

    def test_bad_options_are_refused(self):
        """Bad option values raise UsageError with a message naming the option and saying
        what is wrong."""
        for args, message in BAD_OPTIONS:
            try:
                with self.assertRaises(UsageError) as caught:
                    parse(*args)
            except self.failureException as e:
                self.fail(f"{args}: {e}")
            self.assertRegex(str(caught.exception), message, f"{args}")

    def test_auth_option_takes_cred_checkers(self):
        """--auth (twisted's AuthOptionMixin) is repeatable and builds checkers."""
        path = pathlib.Path(self.temp_dir()) / "passwd"
        path.write_text("carol:pw\n")
        options = parse("--auth", "memory:alice:pw", "--auth", f"file:{path}")
        assert len(options["credCheckers"]) == 2

    def test_backlog_added_only_where_missing(self):
        """A listen backlog is added to tcp/ssl/unix descriptions that lack one, and nowhere
        else."""
        assert with_backlog("tcp:1") == "tcp:1:backlog=4096"
        assert with_backlog("unix:/tmp/s") == "unix:/tmp/s:backlog=4096"
        assert with_backlog("tcp:1:backlog=10") == "tcp:1:backlog=10"
        assert with_backlog("systemd:domain=INET:index=0") == "systemd:domain=INET:index=0"


class ProcessHelpersTests(SynchronousTestCase):
    """cserver.process: the open-file limit, the addresses in the log, the parent watch."""

    def test_open_file_limit_is_raised_within_hard_limit(self):
        """The soft open-file limit is raised toward what is wanted, never past the hard
        limit."""
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
            assert raise_open_file_limit(512) == min(512, hard)
            assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == min(512, hard)
            assert raise_open_file_limit(100) == min(512, hard)
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    def test_addresses_are_written_with_their_kind(self):
        """tcp:, tcp6:, ssl: and unix: addresses read as the log writes them; a listening
        socket of ours reads as its Twisted address does."""
        assert describe_address(IPv4Address("TCP", "127.0.0.1", 5)) == "tcp:127.0.0.1:5"
        assert describe_address(IPv6Address("TCP", "::1", 6)) == "tcp6:::1:6"
        assert describe_address(IPv4Address("TCP", "0.0.0.0", 7), tls=True) == "ssl:0.0.0.0:7"
        assert describe_address(UNIXAddress(b"/run/c.sock")) == "unix:/run/c.sock"
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            assert describe_socket(sock) == f"tcp:127.0.0.1:{sock.getsockname()[1]}"

    def test_parent_watch_calls_gone_once_when_the_writer_closes(self):
        """What the parent writes is ignored; once its end closes, gone() is called, once."""
        read, write = os.pipe()
        self.addCleanup(os.close, read)
        gone = []
        removed = []
        reactor = type("Reactor", (), {"removeReader": lambda self, r: removed.append(r)})()
        watch = ParentWatch(reactor, read, lambda: gone.append(True))
        os.write(write, b"start line\n")
        watch.doRead()
        watch.doRead()  # nothing to read: not the end
        assert gone == []
        os.close(write)
        watch.doRead()
        watch.connectionLost(None)
        assert gone == [True] and removed == [watch]


class MakeServiceTests(RestoreInterpreter, Temporary, SynchronousTestCase):
    """
    makeService on a memory reactor (nothing listens for real); makeService
    tunes the interpreter for serving, and the test process is put back.
    """

    def setUp(self):
        super().setUp()
        self.tmp_path = pathlib.Path(self.temp_dir())

    def make(self, *args):
        """
        makeService on a memory reactor; the service is given up after the
        test: its journal closed, its lock released.
        """
        service = makeService(parse(*args), reactor=FakeReactor())

        def give_up():
            server = getattr(service, "server", service)
            server.factory.journal.close()
            server.lock.release()

        self.addCleanup(give_up)
        return service

    def test_make_service_wires_the_parts(self):
        """makeService recovers the journal and builds a factory with the options' limits and
        auth."""
        journal = self.tmp_path / "j.jsonl"
        service = self.make("--journal", str(journal), "--users", "alice",
                            "--max-connections", "7", "--work-delay", "2")
        factory = service.factory
        assert factory.limits.max_connections == 7
        assert factory.limits.work_delay == 2
        assert factory.journal.path == str(journal)
        assert journal.exists()
        [checker] = factory.portal.checkers.values()
        assert isinstance(checker, AllowListChecker)
        assert checker.users == {"alice"}

    def test_make_service_defaults_to_eager_writes_and_the_auto_syncer(self):
        """By default the service gives its port eager writes and the journal an AutoSyncer."""
        service = self.make("--journal", str(self.tmp_path / "j"))
        assert service.eager is True
        assert isinstance(service.factory.journal._syncer, AutoSyncer)

    def test_make_service_gives_the_reactor_lean_polling_unless_told_not_to(self):
        """By default makeService gives its reactor cserver.poll's lean loop;
        ``--poll twisted`` leaves the reactor's own."""
        for args, calls in [((), 1), (("--poll", "twisted"), 0)]:
            seen = []
            self.patch(tap, "lean_poll", seen.append)
            service = self.make("--journal", str(self.tmp_path / f"j{len(args)}"), *args)
            assert [r is service.reactor for r in seen] == [True] * calls, args

    def test_make_service_with_queued_writes_and_each_sync_mode(self):
        """--writes queued keeps Twisted's transport; --sync picks the journal's syncer."""
        for mode, syncer in [("reactor", InlineSyncer), ("thread", SyncThread),
                             ("auto", AutoSyncer)]:
            service = self.make("--journal", str(self.tmp_path / f"j-{mode}"),
                                "--writes", "queued", "--sync", mode)
            assert service.eager is False, mode
            assert type(service.factory.journal._syncer) is syncer, mode

    def test_make_service_with_auth_uses_password_checkers(self):
        """With --auth, the portal holds the given checkers (wrapped for str/bytes) only."""
        service = self.make("--journal", str(self.tmp_path / "j"), "--auth", "memory:a:b")
        checkers = set(service.factory.portal.checkers.values())
        assert len(checkers) == 1
        assert isinstance(checkers.pop(), TextOrBytesChecker)

    def test_make_service_refuses_damaged_journal(self):
        """A damaged journal stops makeService with a message naming the byte offset."""
        journal = self.tmp_path / "j.jsonl"
        journal.write_bytes(b"nonsense\n" + b'{"seq":1,"time":1,"event":"start","pid":1}\n')
        with self.assertRaises(SystemExit) as caught:
            makeService(parse("--journal", str(journal)), reactor=FakeReactor())
        self.assertRegex(str(caught.exception), "damaged at byte 0")
        assert sorted(p.name for p in self.tmp_path.iterdir()) == ["j.jsonl"]

    def test_make_service_reports_unopenable_journal(self):
        """A journal path that cannot be opened stops makeService with a clear message."""
        with self.assertRaises(SystemExit) as caught:
            makeService(parse("--journal", str(self.tmp_path / "missing-dir" / "j.jsonl")),
                        reactor=FakeReactor())
        self.assertRegex(str(caught.exception),
                         "cannot open journal .*missing-dir.* does not exist")

    def test_make_service_tunes_the_interpreter(self):
        """makeService freezes the start-up heap, collects less often and hands the GIL over
        sooner."""
        self.make("--journal", str(self.tmp_path / "j"))
        assert gc.get_threshold()[0] == 10000
        assert gc.get_freeze_count() > 0
        # pytest.approx's default tolerance: a millionth of the value.
        self.assertAlmostEqual(sys.getswitchinterval(), 0.0005, delta=0.0005e-6)


class PluginTests(SynchronousTestCase):
    """The twistd plugin."""

    def test_plugin_is_discovered(self):
        """Twisted's plugin scan finds the cserver service maker."""
        makers = {maker.tapname: maker for maker in getPlugins(IServiceMaker)}
        assert "cserver" in makers
        assert makers["cserver"].options is Options
