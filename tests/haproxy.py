"""HAProxy in front of real cserver nodes, for end-to-end tests: the shipped
example, contrib/haproxy/cserver.cfg, with loopback addresses substituted,
run in the foreground (``haproxy -f CFG -db``) and watched through its stats
socket."""

import csv
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import time

from .server_process import LineClient

#: The example configuration an operator copies; the tests run it.
EXAMPLE = pathlib.Path(__file__).parent.parent / "contrib" / "haproxy" / "cserver.cfg"

#: Global settings for a production install that a test run cannot use (no
#: root, no daemon: the process must stay our child).
_DROPPED = ("user", "group", "chroot", "daemon", "pidfile")

_SECTION = re.compile(r"^(global|defaults|frontend|backend|listen)\b\s*(\S*)")


def find_haproxy():
    """The path of the haproxy binary, or None when it is not installed."""
    return shutil.which("haproxy") or next(
        (path for path in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy")
         if os.access(path, os.X_OK)), None)


def free_port():
    """A loopback TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def derive_config(text, listen_port, backend_ports, stats_socket):
    """
    The example configuration ``text`` for a test run: the frontend's ``bind``
    on 127.0.0.1:``listen_port``, the backend's ``server`` lines replaced by
    one ``nodeN 127.0.0.1:PORT`` per port in ``backend_ports`` (with the
    options of the example's first server line), the stats socket at
    ``stats_socket``, the log on stderr, and no user, group, chroot or daemon.
    Everything else is kept as it is.  Returns ``(config, backend name)``;
    raises ValueError if the example no longer has the lines to substitute.
    """
    out, section, backend = [], None, None
    found = {"bind": 0, "server": 0, "stats socket": 0}
    for line in text.splitlines():
        words = line.split()
        match = _SECTION.match(line)
        if match:
            section = match.group(1)
            if section == "backend":
                backend = match.group(2)
        elif not words or words[0].startswith("#"):
            pass
        elif section == "global" and words[0] in _DROPPED:
            continue
        elif section == "global" and words[0] == "log":
            line = "    log stderr format short local0 info"
        elif section == "global" and words[:2] == ["stats", "socket"]:
            found["stats socket"] += 1
            line = " ".join(["    stats socket", stats_socket, *words[3:]])
        elif section == "frontend" and words[0] == "bind":
            found["bind"] += 1
            line = " ".join([f"    bind 127.0.0.1:{listen_port}", *words[2:]])
        elif section == "backend" and words[0] == "server":
            found["server"] += 1
            if found["server"] > 1:
                continue
            out.extend(" ".join([f"    server node{n} 127.0.0.1:{port}", *words[3:]])
                       for n, port in enumerate(backend_ports, 1))
            continue
        out.append(line)
    if found["bind"] != 1 or found["stats socket"] != 1 or not found["server"] or not backend:
        raise ValueError(f"{EXAMPLE}: expected one bind, one stats socket and server lines"
                         f" in a backend, found {found}")
    return "\n".join(out) + "\n", backend


class HAProxyProcess:
    """
    ``haproxy -f CFG -db`` in front of cserver nodes on ``backend_ports`` (in
    order: node1, node2, ...), with the config derived from the example, its
    files in ``directory``.

    :ivar port: the frontend's port, once started.
    :ivar backend: the backend's name, as the stats socket reports it.
    """

    def __init__(self, directory, backend_ports, haproxy=None, example=EXAMPLE):
        self.directory = pathlib.Path(directory)
        self.backend_ports = list(backend_ports)
        self.haproxy = haproxy or find_haproxy()
        self.example = pathlib.Path(example)
        self.config = self.directory / "haproxy.cfg"
        self.log = self.directory / "haproxy.log"
        self.stats_socket = str(self.directory / "haproxy.sock")
        self.port = None
        self.backend = None
        self.process = None

    def start(self, timeout=20, wanted=None):
        """
        Write the config, start HAProxy and wait until every node passed a
        health check (or the servers are as ``wanted`` says: see
        :meth:`wait_for_servers`) and a connection through the frontend is
        greeted.
        """
        self.port = free_port()
        text, self.backend = derive_config(self.example.read_text(), self.port,
                                           self.backend_ports, self.stats_socket)
        self.config.write_text(text)
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [self.haproxy, "-f", str(self.config), "-db"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        try:
            self.wait_for_servers(wanted or {name: "UP" for name in self.names()}, timeout)
            client = LineClient(self.port)
            assert client.greeting.startswith("HELLO cserver "), client.greeting
            client.request("QUIT")
            client.close()
        except BaseException:
            self.stop()
            raise
        return self

    def names(self):
        """The server names in the backend, node1, node2, ..."""
        return [f"node{n}" for n in range(1, len(self.backend_ports) + 1)]

    def output(self):
        """Everything HAProxy logged so far."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def command(self, line):
        """Send one command to the stats socket; its answer."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(self.stats_socket)
            sock.sendall(line.encode() + b"\n")
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        return answer.decode()

    def set_state(self, name, state):
        """Set server ``name``'s administrative state: ready, drain (no new
        connections, still checked) or maint."""
        answer = self.command(f"set server {self.backend}/{name} state {state}")
        assert answer.strip() == "", answer

    def serving(self):
        """The names of the servers holding a session now."""
        return [name for name, (_, _, sessions) in self.servers().items() if sessions]

    def wait_idle(self, timeout=20):
        """Poll the stats socket until no server holds a session (a client's
        close reaches HAProxy a moment after the client made it)."""
        deadline = time.monotonic() + timeout
        while self.serving():
            assert time.monotonic() < deadline, f"sessions still open: {self.servers()}"
            time.sleep(0.02)

    def stats(self):
        """``show stat``: one dict per row (frontend, servers, backend)."""
        lines = self.command("show stat").lstrip("# ").splitlines()
        return list(csv.DictReader(line for line in lines if line))

    def servers(self):
        """Each server of the backend: ``{name: (status, check_status, current sessions)}``;
        status is UP, DOWN, "UP 1/2" (going down)...; check_status that of the last
        check (L7OK: the greeting and OK bye came)."""
        return {row["svname"]: (row["status"], row["check_status"].lstrip("* "),
                                int(row["scur"] or 0))
                for row in self.stats()
                if row["pxname"] == self.backend and row["svname"] not in ("FRONTEND",
                                                                            "BACKEND")}

    def wait_for_servers(self, wanted, timeout=20):
        """
        Poll the stats socket until each server named in ``wanted`` is in
        that state: "UP" (and its last check passed: L7OK), "DOWN", "DRAIN"...;
        the servers then (see :meth:`servers`).  AssertionError with HAProxy's
        log when the time runs out or HAProxy exits.
        """
        deadline = time.monotonic() + timeout
        seen = None
        while True:
            if self.process.poll() is not None:
                raise AssertionError(f"haproxy exited with {self.process.returncode}:\n"
                                     + self.output())
            try:
                seen = self.servers()
            except (FileNotFoundError, ConnectionRefusedError):
                pass  # the stats socket is not there yet
            if seen is not None and all(_in_state(seen.get(name), state)
                                        for name, state in wanted.items()):
                return seen
            if time.monotonic() > deadline:
                raise AssertionError(f"servers not {wanted} within {timeout} s: {seen}\n"
                                     + self.output())
            time.sleep(0.05)

    def stop(self, timeout=10):
        """SIGTERM, then SIGKILL if it has not exited within ``timeout`` seconds;
        the exit status."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.send_signal(signal.SIGKILL)
        return self.process.wait(timeout)


def _in_state(server, state):
    if server is None:
        return False
    status, check, _sessions = server
    if state == "UP":
        return status == "UP" and check == "L7OK"
    return status == state
