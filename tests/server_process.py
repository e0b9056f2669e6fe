"""A real ``twistd -n cserver`` in a child process, and a blocking line client,
for end-to-end tests on loopback."""

import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

_LISTENING = re.compile(r"listening on (?:tcp|ssl):127\.0\.0\.1:(\d+)")


def twistd_command():
    """
    The twistd of the Python running the tests (a virtualenv's, when it is one).
    """
    near = os.path.join(os.path.dirname(sys.executable), "twistd")
    return [near] if os.path.exists(near) else [shutil.which("twistd") or "twistd"]


def run_twistd(directory, *args, timeout=60, env=None):
    """
    ``twistd -n --pidfile= cserver ARGS`` in ``directory``, to its end: for a
    start that must fail.  Returns the CompletedProcess (text output).
    """
    return subprocess.run(
        twistd_command() + ["-n", "--pidfile=", "cserver", *args],
        cwd=str(directory), capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **env} if env else None,
    )


class ServerProcess:
    """
    ``twistd -n cserver`` on a free loopback port, its journal in ``directory``;
    ``env``: variables set for it over this process's environment; ``umask``:
    the umask it starts with (default: this process's).

    @ivar output: every line the server printed so far.
    """

    def __init__(self, directory, *args, journal=None, twistd=None, env=None, umask=None):
        self.directory = str(directory)
        self.env = env
        self.umask = umask
        self.twistd = twistd or twistd_command()
        self.journal = str(journal or os.path.join(self.directory, "journal.jsonl"))
        self.args = list(args)
        self.output = []
        self.port = None
        self.process = None
        self._lines = queue.Queue()

    def start(self, timeout=20):
        """
        Start the server and wait until it says it is listening.
        """
        command = self.twistd + [
            "-n", "--pidfile=", "cserver",
            "--port", "tcp:0:interface=127.0.0.1",
            "--journal", self.journal,
            *self.args,
        ]
        self.process = subprocess.Popen(
            command,
            cwd=self.directory,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **self.env} if self.env else None,
            preexec_fn=None if self.umask is None else (lambda: os.umask(self.umask)),
        )
        threading.Thread(target=self._read, daemon=True).start()
        line = self.wait_for(_LISTENING, timeout)
        if line is None:
            self.kill()
            raise AssertionError("server did not start:\n" + "".join(self.output))
        self.port = int(_LISTENING.search(line).group(1))
        return self

    def _read(self):
        for line in self.process.stdout:
            self.output.append(line)
            self._lines.put(line)
        self._lines.put(None)

    def wait_for(self, pattern, timeout=20):
        """
        The next output line matching ``pattern``; None if the server exits
        or the time runs out first.
        """
        pattern = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            try:
                line = self._lines.get(timeout=left)
            except queue.Empty:
                return None
            if line is None:
                return None
            if pattern.search(line):
                return line

    def stop(self, sig=signal.SIGTERM, timeout=20):
        """
        Send ``sig`` and wait for the exit; returns the exit status.
        """
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout)

    def kill(self):
        """
        SIGKILL: no chance to clean up.
        """
        return self.stop(signal.SIGKILL)

    def connect(self, timeout=10):
        return LineClient(self.port, timeout)


class LineClient:
    """
    A blocking client of the line protocol, for tests.
    """

    def __init__(self, port, timeout=10):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.file = self.sock.makefile("rb")
        self.greeting = self.read_line()

    def send(self, *lines):
        self.sock.sendall(b"".join(line.encode("utf-8") + b"\n" for line in lines))

    def read_line(self):
        line = self.file.readline()
        if not line:
            raise ConnectionError("server closed the connection")
        assert line.endswith(b"\r\n"), line
        return line[:-2].decode("utf-8")

    def request(self, line):
        self.send(line)
        return self.read_line()

    def stats(self):
        reply = self.request("STATS")
        assert reply.startswith("OK "), reply
        return dict(item.split("=", 1) for item in reply[3:].split())

    def close(self):
        self.file.close()
        self.sock.close()


def read_journal(path):
    """
    The records of a journal file, parsed.
    """
    import json

    with open(path, "rb") as f:
        return [json.loads(line) for line in f]


def check_journal(records, acked, label=""):
    """
    Seqs run 1..N without a gap and every acked ``(seq, text)`` is journaled
    with that text; returns the message records as ``{seq: text}``.
    """
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
    journaled = {r["seq"]: r["text"] for r in records if r["event"] == "message"}
    missing = [(seq, text) for seq, text in acked if journaled.get(seq) != text]
    assert not missing, f"{label}acked but not journaled: {missing[:5]}"
    return journaled


def rss(pid):
    """
    The resident set size of process ``pid``, in bytes.
    """
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class Load:
    """
    ``clients`` threads, each connected to ``port``, that AUTH as ``user``
    and send MSGs one after another, recording every ack as ``(seq, text)``
    in :attr:`acked`, until :meth:`stop` or until their connection is lost
    (the server killed).  :attr:`enough` is set once ``until`` acks came in.
    With ``stopping_ends``, a client also stops at ``ERR unavailable server
    stopping`` (a graceful stop under load); any other reply but ``OK`` fails.
    """

    def __init__(self, port, clients, until, prefix="", user="alice", stopping_ends=False):
        self.port = port
        self.stopping_ends = stopping_ends
        self.prefix = prefix
        self.user = user
        self.until = until
        self.acked = []
        self.enough = threading.Event()
        self._lock = threading.Lock()
        self._halt = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(n,)) for n in range(clients)]

    def start(self):
        for thread in self._threads:
            thread.start()
        return self

    def _run(self, n):
        try:
            client = LineClient(self.port)
            client.request(f"AUTH {self.user}")
            for i in range(100000):
                if self._halt.is_set():
                    break
                text = f'{self.prefix}c{n} m{i} "q" \\ é'
                reply = client.request(f"MSG {text}")
                if self.stopping_ends and reply == "ERR unavailable server stopping":
                    break
                assert reply.startswith("OK "), reply
                with self._lock:
                    self.acked.append((int(reply[3:]), text))
                    if len(self.acked) >= self.until:
                        self.enough.set()
            client.close()
        except (ConnectionError, OSError):
            pass

    def stop(self):
        """
        Stop sending and wait for every client thread.
        """
        self._halt.set()
        for thread in self._threads:
            thread.join(30)


_WORKER_STARTED = re.compile(r"worker (\d+) started, pid (\d+)")


def worker_pids(process):
    """The pid of each worker index of a --workers server, the newest one its parent
    logged."""
    pids = {}
    for line in list(process.output):
        match = _WORKER_STARTED.search(line)
        if match:
            pids[int(match.group(1))] = int(match.group(2))
    return pids


def running(pid):
    """Whether ``pid`` is a live process (a zombie is not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def kill_quietly(pid):
    """SIGKILL ``pid`` if it still runs."""
    if running(pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
