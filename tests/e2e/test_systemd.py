"""Running under systemd, end to end: sd_notify (cserver.notify) datagrams on a
real ``$NOTIFY_SOCKET`` (a path, an abstract name, none listening), the
watchdog's pings, the --workers parent's READY / STOPPING with a real listening
socket, the shipped unit files (``systemd-analyze verify``), and a real server
started by ``systemd-socket-activate`` with a fake ``$NOTIFY_SOCKET``.

End-to-end layer; the notifications without a socket, the service's hooks and
the unit files read as text are in tests/unit/test_systemd.py, whose helpers
(the unit-file parser, the recording notifier) these tests use."""

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid

import pytest
from twisted.internet.task import Clock

from cserver import __version__
from cserver.config import Config
from cserver.journal.header import Shared
from cserver.journal.recovery import Recovery
from cserver.notify import Notifier, notify_address
from cserver.testing import MemoryJournal
from cserver.workers.supervisor import WorkerSupervisor

from ..server_process import LineClient, read_journal, twistd_command
from ..unit.test_systemd import SERVICE, SOCKET, RecordingNotifier, exec_start_argv

# -- helpers ----------------------------------------------------------------------------------

@pytest.fixture
def short_dir():
    """A directory with a short path (a unix socket path has at most 107 bytes)."""
    with tempfile.TemporaryDirectory(prefix="cs-") as path:
        yield path


def bound_receiver(address):
    """A unix datagram socket bound to ``address``, with a timeout."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(10)
    return sock


def pending(sock):
    """Every datagram waiting on ``sock``, without blocking."""
    found = []
    timeout = sock.gettimeout()
    sock.setblocking(False)
    try:
        while True:
            found.append(sock.recv(4096))
    except BlockingIOError:
        return found
    finally:
        sock.settimeout(timeout)


# -- sd_notify --------------------------------------------------------------------------------

def test_sends_states_to_a_socket_path(short_dir):
    """
    READY=1 (with STATUS=), STOPPING=1 and WATCHDOG=1 arrive as one datagram each at $NOTIFY_SOCKET,
    a path.
    """
    path = os.path.join(short_dir, "notify")
    with bound_receiver(path) as receiver:
        notifier = Notifier({"NOTIFY_SOCKET": path})
        assert notifier.ready("listening\non port 1")
        assert notifier.watchdog()
        assert notifier.stopping()
        assert [receiver.recv(4096) for _ in range(3)] == [
            b"READY=1\nSTATUS=listening on port 1", b"WATCHDOG=1", b"STOPPING=1",
        ]


def test_sends_to_an_abstract_socket():
    """A $NOTIFY_SOCKET starting with @ names a socket in the abstract namespace."""
    name = f"cserver-test-{uuid.uuid4().hex}"
    assert notify_address("@" + name) == "\0" + name
    with bound_receiver("\0" + name) as receiver:
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).send("STATUS=ok", "READY=1")
        assert receiver.recv(4096) == b"STATUS=ok\nREADY=1"


def test_unreachable_socket_is_logged_not_raised(short_dir):
    """A $NOTIFY_SOCKET nobody listens on makes send() return False (and log), never raise."""
    notifier = Notifier({"NOTIFY_SOCKET": os.path.join(short_dir, "gone")})
    assert notifier.enabled
    assert notifier.ready() is False


def test_watchdog_pings_on_the_clock(short_dir):
    """
    start_watchdog sends WATCHDOG=1 at once and every WATCHDOG_USEC/2 on the given clock;
    stop_watchdog ends it.
    """
    path = os.path.join(short_dir, "notify")
    clock = Clock()
    with bound_receiver(path) as receiver:
        notifier = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "3000000"})
        notifier.start_watchdog(clock)
        assert pending(receiver) == [b"WATCHDOG=1"]
        clock.advance(1.49)
        assert pending(receiver) == []
        clock.advance(0.01)
        assert pending(receiver) == [b"WATCHDOG=1"]
        clock.advance(1.5)
        assert pending(receiver) == [b"WATCHDOG=1"]
        notifier.stop_watchdog()
        clock.advance(10)
        assert pending(receiver) == []
        assert not clock.getDelayedCalls()


# -- the --workers parent's hooks -------------------------------------------------------------

def test_workers_parent_is_ready_once_start_record_is_durable():
    """
    The --workers parent sends READY=1 once its start record is durable and STOPPING=1 when it
    stops.
    """
    class Supervisor(WorkerSupervisor):
        def _spawn(self, index):
            pass

    clock = Clock()
    journal = MemoryJournal(clock)
    journal.path = "journal.jsonl"
    shared = Shared.create(1)
    listening = socket.socket()
    try:
        listening.bind(("127.0.0.1", 0))
        notifier = RecordingNotifier()
        service = Supervisor(clock, shared, journal, Recovery(), [listening], Config(),
                             notifier=notifier)
        service.startService()
        assert notifier.sent == []
        clock.advance(0)
        assert notifier.sent == ["READY=1"]
        service.stopService()
        assert notifier.sent == ["READY=1", "STOPPING=1"]
        clock.advance(0)
    finally:
        shared.close()
        listening.close()


# -- the unit files ---------------------------------------------------------------------------

def test_systemd_analyze_verify(tmp_path):
    """
    systemd-analyze verify accepts the shipped units without a warning (ExecStart pointed at this
    venv's twistd).
    """
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian package: systemd)")
    twistd = twistd_command()[0]
    if not os.path.isabs(twistd) or not os.access(twistd, os.X_OK):
        pytest.skip("no twistd executable to point ExecStart at")
    shipped = exec_start_argv()[0]
    with open(SERVICE) as f:
        text = f.read()
    assert f"ExecStart={shipped} " in text
    # Only the binary's path changes: systemd-analyze checks that it exists.
    (tmp_path / "cserver.service").write_text(text.replace(f"ExecStart={shipped} ",
                                                           f"ExecStart={twistd} "))
    shutil.copy(SOCKET, tmp_path / "cserver.socket")
    result = subprocess.run(
        [analyze, "verify", "--man=no", "cserver.service", "cserver.socket"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )
    # Unknown keys and unparsable values are only warnings (exit status 0).
    complaints = [line for line in (result.stdout + result.stderr).splitlines()
                  if "cserver" in line]
    assert result.returncode == 0 and not complaints, result.stdout + result.stderr


# -- end to end -----------------------------------------------------------------------------

class Activated:
    """``systemd-socket-activate`` running ``twistd -n cserver`` with the unit's --port."""

    def __init__(self, directory, notify_socket):
        self.directory = directory
        self.notify_socket = notify_socket
        self.process = None
        self.output = []
        self.port = None

    def start(self, attempts=3):
        activate = shutil.which("systemd-socket-activate")
        argv = exec_start_argv()
        port_description = argv[argv.index("--port") + 1]
        for _ in range(attempts):
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                self.port = probe.getsockname()[1]
            command = [
                activate, "-l", f"127.0.0.1:{self.port}", "--fdname=cserver",
                "-E", f"NOTIFY_SOCKET={self.notify_socket}", "-E", "WATCHDOG_USEC=1000000",
                *twistd_command(), "-n", "--pidfile=", "cserver",
                "--port", port_description,
                "--journal", os.path.join(self.directory, "journal.jsonl"),
                "--users", "alice",
            ]
            self.output = []
            self.process = subprocess.Popen(command, cwd=self.directory, stdout=subprocess.PIPE,
                                            stderr=subprocess.STDOUT, text=True)
            listening = threading.Event()

            def read(process=self.process, output=self.output, listening=listening):
                for line in process.stdout:
                    output.append(line)
                    if "Listening on" in line:
                        listening.set()
                listening.set()

            threading.Thread(target=read, daemon=True).start()
            listening.wait(10)
            if self.process.poll() is None and any("Listening on" in x for x in self.output):
                return self
            self.stop(signal.SIGKILL)  # the port was taken meanwhile: another one
        raise AssertionError("systemd-socket-activate did not listen:\n" + "".join(self.output))

    def stop(self, sig=signal.SIGTERM, timeout=20):
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(timeout)


def receive_until(receiver, state, timeout=20):
    """The datagrams received until one holding ``state`` (that one last)."""
    received = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        receiver.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data = receiver.recv(4096)
        except TimeoutError:
            break
        received.append(data)
        if state in data.split(b"\n"):
            return received
    raise AssertionError(f"no {state!r} within {timeout} s; got {received!r}")


def test_socket_activated_server_notifies_ready_and_stopping(short_dir):
    """
    Under systemd-socket-activate, the server adopts the named socket, sends READY=1 (then answers
    HELLO on a new connection), WATCHDOG=1 while running, STOPPING=1 on SIGTERM, and exits 0.
    """
    if shutil.which("systemd-socket-activate") is None:
        pytest.skip("systemd-socket-activate is not installed (Debian package: systemd)")
    path = os.path.join(short_dir, "notify")
    with bound_receiver(path) as receiver:
        server = Activated(short_dir, path).start()
        try:
            # systemd-socket-activate starts the server on the first connection;
            # this one waits in the adopted socket's backlog meanwhile.
            first = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            received = receive_until(receiver, b"READY=1")
            ready = received[-1].split(b"\n")
            assert ready[0] == b"READY=1"
            assert ready[1].startswith(b"STATUS=listening on tcp:127.0.0.1:")
            client = LineClient(server.port)
            assert client.greeting == f"HELLO cserver {__version__} proto=1.1"
            assert client.request("AUTH alice") == "OK alice"
            assert client.request("MSG under systemd") == "OK 2"
            client.close()
            greeting = f"HELLO cserver {__version__} proto=1.1\r\n".encode()
            assert first.makefile("rb").readline() == greeting
            first.close()
            receive_until(receiver, b"WATCHDOG=1", timeout=5)
            assert server.stop() == 0, "".join(server.output)
            stopping = receive_until(receiver, b"STOPPING=1", timeout=5)
            assert b"READY=1" not in b"\n".join(stopping)
        finally:
            server.stop(signal.SIGKILL)
    records = read_journal(os.path.join(short_dir, "journal.jsonl"))
    assert [r["event"] for r in records] == ["start", "message", "stop"]
