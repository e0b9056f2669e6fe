"""Running under systemd: sd_notify (cserver.notify) without a socket, the
service's READY / STOPPING / WATCHDOG hooks, and the shipped unit files.

Unit layer: a recording notifier, a fake endpoint, a task.Clock.  The
datagrams sent to a real ``$NOTIFY_SOCKET``, ``systemd-analyze verify`` and a
real server started by ``systemd-socket-activate`` are in
tests/e2e/test_systemd.py (which takes the helpers below from here)."""

import os
import re
import shlex

from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from cserver.notify import Notifier, watchdog_interval
from cserver.service import CServerService

from ..common import make_factory

UNITS = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    "contrib", "systemd")
SERVICE = os.path.join(UNITS, "cserver.service")
SOCKET = os.path.join(UNITS, "cserver.socket")


# -- helpers ----------------------------------------------------------------------------------

class RecordingNotifier(Notifier):
    """A Notifier that records what it would send."""

    def __init__(self, environ=None, pid=None):
        super().__init__({"NOTIFY_SOCKET": "/nonexistent", **(environ or {})}, pid)
        self.sent = []

    def send(self, *states):
        self.sent.append(states[0])
        return True


def unit(path):
    """A unit file parsed: {section: {key: [values]}} (keys may repeat)."""
    with open(path) as f:
        text = f.read().replace("\\\n", " ")
    sections, current = {}, None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def exec_start_argv():
    """The shipped ExecStart, split into words."""
    return shlex.split(unit(SERVICE)["Service"]["ExecStart"][0])


# -- sd_notify --------------------------------------------------------------------------------

class NotifierTests(SynchronousTestCase):
    """sd_notify when there is nothing to send to, and the watchdog interval."""

    def test_without_notify_socket_nothing_is_sent(self):
        """Without $NOTIFY_SOCKET (not run by systemd) every notification is a silent
        no-op."""
        notifier = Notifier({"WATCHDOG_USEC": "1000000"})
        assert not notifier.enabled
        assert notifier.ready("x") is False
        assert notifier.stopping() is False
        assert notifier.start_watchdog(Clock()) is None
        notifier.stop_watchdog()

    def test_watchdog_interval_is_half_of_watchdog_usec(self):
        """
        WATCHDOG_USEC asks for a ping every half interval; WATCHDOG_PID of another process
        means none.
        """
        assert watchdog_interval({"WATCHDOG_USEC": "30000000"}, 42) == 15.0
        assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "42"}, 42) == 15.0
        assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "43"}, 42) is None
        assert watchdog_interval({}, 42) is None
        assert watchdog_interval({"WATCHDOG_USEC": "0"}, 42) is None
        assert watchdog_interval({"WATCHDOG_USEC": "soon"}, 42) is None


# -- the service's hooks --------------------------------------------------------------------

class FakePort:
    def getHost(self):
        return IPv4Address("TCP", "127.0.0.1", 31337)

    def stopListening(self):
        return defer.succeed(None)


class FakeEndpoint:
    def __init__(self):
        self.listening = defer.Deferred()

    def listen(self, factory):
        return self.listening


class ServiceHooksTests(SynchronousTestCase):
    """CServerService's READY / STOPPING / WATCHDOG notifications."""

    def test_service_is_ready_once_start_record_is_durable_and_port_listens(self):
        """
        CServerService sends READY=1 only when both the start record is durable and the port
        listens; STOPPING=1 first thing on stop.
        """
        clock = Clock()
        factory = make_factory(clock=clock)
        endpoint = FakeEndpoint()
        notifier = RecordingNotifier({"WATCHDOG_USEC": "2000000"})
        service = CServerService(factory, endpoint, clock, notifier=notifier)
        service.startService()
        assert notifier.sent == ["WATCHDOG=1"]
        clock.advance(0)  # the start record is durable
        assert "READY=1" not in notifier.sent
        endpoint.listening.callback(FakePort())
        assert notifier.sent == ["WATCHDOG=1", "READY=1"]
        clock.advance(1)
        assert notifier.sent[-1] == "WATCHDOG=1"
        done = service.stopService()
        assert notifier.sent[-1] == "STOPPING=1"
        clock.advance(0)
        assert done.called
        count = len(notifier.sent)
        clock.advance(10)
        assert len(notifier.sent) == count, "the watchdog outlived the service"
        assert [r["event"] for r in factory.journal.records()] == ["start", "stop"]

    def test_service_not_ready_when_listening_comes_before_the_start_record(self):
        """
        A port that listens before the start record is durable does not make the service
        ready yet.
        """
        clock = Clock()
        factory = make_factory(clock=clock)
        endpoint = FakeEndpoint()
        endpoint.listening.callback(FakePort())
        notifier = RecordingNotifier()
        service = CServerService(factory, endpoint, clock, notifier=notifier)
        service.startService()
        assert notifier.sent == []
        clock.advance(0)
        assert notifier.sent == ["READY=1"]


# -- the unit files ---------------------------------------------------------------------------

class UnitFilesTests(SynchronousTestCase):
    """The shipped systemd unit files, read as text."""

    def test_units_agree_on_the_socket(self):
        """
        The service adopts the socket unit's descriptor by its name, with the socket's address
        family.
        """
        sock = unit(SOCKET)["Socket"]
        service = unit(SERVICE)["Service"]
        argv = exec_start_argv()
        port = argv[argv.index("--port") + 1]
        kind, _, params = port.partition(":")
        params = dict(p.split("=", 1) for p in params.split(":"))
        assert kind == "systemd"
        assert params["name"] == sock["FileDescriptorName"][0]
        assert "index" not in params
        listen = sock["ListenStream"][0]
        # A bare port is an IPv6 dual-stack socket; an IPv4 address an AF_INET one.
        family = "INET" if re.match(r"^\d+\.\d+\.\d+\.\d+:\d+$", listen) else "INET6"
        assert params["domain"] == family
        assert service["Type"] == ["notify"]
        assert service["NotifyAccess"] == ["main"]
        assert "--nodaemon" in argv and "--pidfile=" in argv
        journal = argv[argv.index("--journal") + 1]
        assert journal.startswith("/var/lib/" + service["StateDirectory"][0] + "/")

    def test_units_documentation_is_what_the_install_puts_beside_twistd(self):
        """Each unit's Documentation= is the README that the package installs under the prefix
        of the unit's twistd (data_files share/doc/cserver)."""
        prefix = os.path.dirname(os.path.dirname(exec_start_argv()[0]))
        for path in (SERVICE, SOCKET):
            [documentation] = unit(path)["Unit"]["Documentation"]
            assert documentation == f"file://{prefix}/share/doc/cserver/README.rst"
        with open(os.path.join(os.path.dirname(SERVICE), "..", "..", "setup.cfg")) as f:
            setup = f.read()
        assert "share/doc/cserver =\n    README.rst" in setup
