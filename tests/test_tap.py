"""Tests for cserver.tap and the twistd plugin: options, service, discovery."""

import gc
import getpass
import resource
import sys

import pytest
from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins
from twisted.python.usage import UsageError

from cserver.auth import AllowListChecker, TextOrBytesChecker
from cserver.journal import AutoSyncer, InlineSyncer, SyncThread
from cserver.tap import Options, makeService, raise_open_file_limit, with_backlog

from .common import FakeReactor

#: makeService tunes the interpreter for serving: put the test process back.
pytestmark = pytest.mark.usefixtures("restore_interpreter")


def parse(*args):
    options = Options()
    options.parseOptions(list(args))
    return options


def test_defaults():
    """With no options: loopback port 31337 with a large backlog, the seed's auth, fsync always."""
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


def test_all_options():
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


@pytest.mark.parametrize(
    "args, message",
    [
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
        (["--sync", "never"], "--sync must be one of auto, reactor, thread"),
    ],
)
def test_bad_options_are_refused(args, message):
    """Bad option values raise UsageError with a message naming the option and saying
    what is wrong."""
    with pytest.raises(UsageError, match=message):
        parse(*args)


def test_auth_option_takes_cred_checkers(tmp_path):
    """--auth (twisted's AuthOptionMixin) is repeatable and builds checkers."""
    path = tmp_path / "passwd"
    path.write_text("carol:pw\n")
    options = parse("--auth", "memory:alice:pw", "--auth", f"file:{path}")
    assert len(options["credCheckers"]) == 2


def test_backlog_added_only_where_missing():
    """A listen backlog is added to tcp/ssl/unix descriptions that lack one, and nowhere else."""
    assert with_backlog("tcp:1") == "tcp:1:backlog=4096"
    assert with_backlog("unix:/tmp/s") == "unix:/tmp/s:backlog=4096"
    assert with_backlog("tcp:1:backlog=10") == "tcp:1:backlog=10"
    assert with_backlog("systemd:domain=INET:index=0") == "systemd:domain=INET:index=0"


def test_open_file_limit_is_raised_within_hard_limit():
    """The soft open-file limit is raised toward what is wanted, never past the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        assert raise_open_file_limit(512) == min(512, hard)
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == min(512, hard)
        assert raise_open_file_limit(100) == min(512, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.fixture
def make():
    """
    makeService on a memory reactor (nothing listens for real); every service
    made is given up after the test: its journal closed, its lock released.
    """
    made = []

    def make_(*args):
        service = makeService(parse(*args), reactor=FakeReactor())
        made.append(service)
        return service

    yield make_
    for service in made:
        server = getattr(service, "server", service)
        server.factory.journal.close()
        server.lock.release()


def test_make_service_wires_the_parts(tmp_path, make):
    """makeService recovers the journal and builds a factory with the options' limits and auth."""
    journal = tmp_path / "j.jsonl"
    service = make("--journal", str(journal), "--users", "alice",
                   "--max-connections", "7", "--work-delay", "2")
    factory = service.factory
    assert factory.limits.max_connections == 7
    assert factory.limits.work_delay == 2
    assert factory.journal.path == str(journal)
    assert journal.exists()
    [checker] = factory.portal.checkers.values()
    assert isinstance(checker, AllowListChecker)
    assert checker.users == {"alice"}


def test_make_service_defaults_to_eager_writes_and_the_auto_syncer(tmp_path, make):
    """By default the service gives its port eager writes and the journal an AutoSyncer."""
    service = make("--journal", str(tmp_path / "j"))
    assert service.eager is True
    assert isinstance(service.factory.journal._syncer, AutoSyncer)


@pytest.mark.parametrize("mode, syncer", [("reactor", InlineSyncer), ("thread", SyncThread),
                                          ("auto", AutoSyncer)])
def test_make_service_with_queued_writes_and_each_sync_mode(tmp_path, mode, syncer, make):
    """--writes queued keeps Twisted's transport; --sync picks the journal's syncer."""
    service = make("--journal", str(tmp_path / "j"), "--writes", "queued", "--sync", mode)
    assert service.eager is False
    assert type(service.factory.journal._syncer) is syncer


def test_make_service_with_auth_uses_password_checkers(tmp_path, make):
    """With --auth, the portal holds the given checkers (wrapped for str/bytes) only."""
    service = make("--journal", str(tmp_path / "j"), "--auth", "memory:a:b")
    checkers = set(service.factory.portal.checkers.values())
    assert len(checkers) == 1
    assert isinstance(checkers.pop(), TextOrBytesChecker)


def test_make_service_refuses_damaged_journal(tmp_path):
    """A damaged journal stops makeService with a message naming the byte offset."""
    journal = tmp_path / "j.jsonl"
    journal.write_bytes(b"nonsense\n" + b'{"seq":1,"time":1,"event":"start","pid":1}\n')
    with pytest.raises(SystemExit, match="damaged at byte 0"):
        makeService(parse("--journal", str(journal)), reactor=FakeReactor())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["j.jsonl"]


def test_make_service_reports_unopenable_journal(tmp_path):
    """A journal path that cannot be opened stops makeService with a clear message."""
    with pytest.raises(SystemExit, match="cannot open journal .*missing-dir.* does not exist"):
        makeService(parse("--journal", str(tmp_path / "missing-dir" / "j.jsonl")),
                    reactor=FakeReactor())


def test_make_service_tunes_the_interpreter(tmp_path, make):
    """makeService freezes the start-up heap, collects less often and hands the GIL over sooner."""
    make("--journal", str(tmp_path / "j"))
    assert gc.get_threshold()[0] == 10000
    assert gc.get_freeze_count() > 0
    assert sys.getswitchinterval() == pytest.approx(0.0005)


def test_plugin_is_discovered():
    """Twisted's plugin scan finds the cserver service maker."""
    makers = {maker.tapname: maker for maker in getPlugins(IServiceMaker)}
    assert "cserver" in makers
    assert makers["cserver"].options is Options
