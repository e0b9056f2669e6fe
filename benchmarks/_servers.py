"""What the benchmark scripts share: the servers they run (cserver under twistd,
the Twisted floor, the C reference), one ``cserver-client bench`` run, and the
reStructuredText tables they print.

Each server runs as a child process on a loopback port.  Use it as a context
manager: the ``with`` block is entered once the server answers, and on leaving
it (errors included) the server gets SIGTERM, then SIGKILL if it has not exited
within a grace period.  Not a benchmark itself; the scripts next to it import it.
"""

import getpass
import json
import os
import queue
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The bench kit's reference servers: run from where they are, never copied.
SHARED_BENCH = os.path.normpath(os.path.join(REPO, "..", "shared", "bench"))
_LISTENING = re.compile(r"listening on tcp:127\.0\.0\.1:(\d+)")


def executable(name):
    """``name`` from the bin directory of the running Python (a virtualenv's), else PATH."""
    near = os.path.join(os.path.dirname(sys.executable), name)
    return near if os.path.exists(near) else (shutil.which(name) or name)


def free_port():
    """A loopback port that was free a moment ago (for servers that cannot listen on 0)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raise_open_files():
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def memory(pid):
    """VmRSS and VmHWM of process ``pid``, in bytes, from /proc/PID/status."""
    values = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) * 1024
    return values["VmRSS"], values["VmHWM"]


def cpu_seconds(pid):
    """User plus system CPU time of process ``pid`` so far, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine():
    """``N x CPU model`` of this machine, from nproc and /proc/cpuinfo."""
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = " ".join(line.partition(":")[2].split())
                    break
    except OSError:
        pass
    return f"{os.cpu_count()} x {model}"


def stats(port, user, password=None, timeout=10.0):
    """
    The STATS of the cserver on loopback ``port``, as a dict (integer values as ``int``).

    One plain socket: read the greeting, ``AUTH user[ password]``, ``STATS``,
    ``QUIT`` (waiting for its ``OK bye``).  An ``ERR`` or an unexpected line
    raises RuntimeError; a silent server, OSError after ``timeout`` seconds.
    """
    with (socket.create_connection(("127.0.0.1", port), timeout=timeout) as s,
          s.makefile("rb") as replies):

        def reply(expected):
            line = replies.readline().decode("utf-8", "replace").rstrip("\r\n")
            if not line.startswith(expected + " "):
                raise RuntimeError(f"STATS on port {port}: got {line!r}, wanted {expected}")
            return line[len(expected) + 1:]

        reply("HELLO")
        s.sendall(f"AUTH {user}".encode() + (f" {password}".encode() if password else b"")
                  + b"\r\n")
        reply("OK")
        s.sendall(b"STATS\r\n")
        data = reply("OK")
        s.sendall(b"QUIT\r\n")
        reply("OK")
    values = {}
    for word in data.split():
        key, sep, value = word.partition("=")
        if sep:
            try:
                values[key] = int(value)
            except ValueError:
                values[key] = value
    return values


class ServerProcess:
    """
    A server in a child process on 127.0.0.1, its output read by a thread.

    With ``port`` None the server is expected to print ``listening on
    tcp:127.0.0.1:PORT`` (cserver does); otherwise it is ready once a
    connection to ``port`` gets a greeting.

    @ivar output: every line the server printed so far.
    """

    def __init__(self, name, command, port=None, cwd=None, start_timeout=30.0, env=None):
        self.name = name
        self.command = [str(word) for word in command]
        self.env = env
        self.port = port
        self.cwd = cwd
        self.start_timeout = start_timeout
        self.output = []
        self.process = None
        self._lines = queue.Queue()

    @property
    def pid(self):
        return self.process.pid

    def __enter__(self):
        self.process = subprocess.Popen(
            self.command, cwd=self.cwd, stdin=subprocess.DEVNULL,
            env=None if self.env is None else {**os.environ, **self.env},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
        )
        threading.Thread(target=self._read, daemon=True).start()
        try:
            if self.port is None:
                self.port = self._wait_listening()
            else:
                self._wait_greeting()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info):
        self.stop()

    def _read(self):
        for line in self.process.stdout:
            self.output.append(line)
            self._lines.put(line)
        self._lines.put(None)

    def _failed(self, why):
        tail = "".join(self.output[-20:])
        return RuntimeError(f"{self.name}: {why}\n{' '.join(self.command)}\n{tail}")

    def _wait_listening(self):
        deadline = time.monotonic() + self.start_timeout
        while True:
            left = deadline - time.monotonic()
            try:
                line = self._lines.get(timeout=max(left, 0.001))
            except queue.Empty:
                raise self._failed(f"not listening within {self.start_timeout:g} s") from None
            if line is None:
                raise self._failed(f"exited with status {self.process.wait()}")
            found = _LISTENING.search(line)
            if found:
                return int(found.group(1))

    def _wait_greeting(self):
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise self._failed(f"exited with status {self.process.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    s.settimeout(2)
                    if s.recv(200):
                        return
            except OSError:
                time.sleep(0.1)
        raise self._failed(f"no greeting on port {self.port} within {self.start_timeout:g} s")

    def stop(self, grace=20.0):
        """SIGTERM, then SIGKILL after ``grace`` seconds; returns the exit status."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode


def cserver(directory, *options, user=None, env=None):
    """
    ``twistd -n cserver`` on a free loopback port, with a fresh journal in
    ``directory``; ``env``: variables set for it over this process's.
    """
    journal = os.path.join(directory, "journal.jsonl")
    command = [
        executable("twistd"), "-n", "--pidfile=", "cserver",
        "--port", "tcp:0:interface=127.0.0.1", "--journal", journal,
        "--users", user or getpass.getuser(), *options,
    ]
    return ServerProcess("cserver", command, cwd=directory, env=env)


def floor(directory, shared=SHARED_BENCH):
    """The Twisted floor (``floor.py PORT``), run with this Python, on a free port."""
    port = free_port()
    command = [sys.executable, os.path.join(shared, "floor.py"), port]
    return ServerProcess("floor", command, port=port, cwd=directory)


def build_reference(directory, shared=SHARED_BENCH):
    """Compile the C reference server into ``directory``; its path, or None if gcc fails."""
    exe = os.path.join(directory, "refsrv")
    source = os.path.join(shared, "refsrv.c")
    try:
        subprocess.run(["gcc", "-O2", "-w", "-o", exe, source], check=True, timeout=120,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return None
    return exe


def reference(exe, directory, sync=True):
    """The C reference on a free port, journaling to ``directory`` (fdatasync with ``sync``)."""
    port = free_port()
    journal = os.path.join(directory, "ref.jsonl")
    command = [exe, port, "-s" if sync else "nosync", journal]
    return ServerProcess("refsrv", command, port=port, cwd=directory)


def run_bench(port, user, options, timeout):
    """
    One ``cserver-client bench ... --json`` run against loopback ``port``; its
    report, with ``ok`` False on any failure and ``notes`` saying why.
    """
    command = [executable("cserver-client"), "bench", "--port", str(port), "--user", user,
               *options, "--json"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "notes": [f"bench killed after {timeout:g} s"]}
    lines = done.stdout.strip().splitlines()
    try:
        report = json.loads(lines[-1])
    except (IndexError, ValueError):
        tail = " | ".join(done.stderr.strip().splitlines()[-3:])
        return {"ok": False, "notes": [f"bench exit {done.returncode}, no report: {tail}"]}
    report["ok"] = bool(report.get("ok")) and done.returncode == 0
    if done.returncode:
        report.setdefault("notes", []).append(f"bench exit {done.returncode}")
    return report


def results(args, measure):
    """
    The results of a benchmark: read from ``args.from_results`` (a JSON file
    an earlier run saved; nothing is measured), else ``measure(args)``, saved
    to ``args.results`` when that is set.
    """
    if args.from_results:
        with open(args.from_results) as f:
            return json.load(f)
    measured = measure(args)
    if args.results:
        with open(args.results, "w") as f:
            json.dump(measured, f, indent=1)
    return measured


def reproducing(argv, output_options):
    """``argv`` without the ``output_options`` (and their values): what reruns the measurement."""
    kept, skip = [], False
    for word in argv:
        if skip:
            skip = False
        elif word in output_options:
            skip = True
        elif not word.startswith(tuple(f"{option}=" for option in output_options)):
            kept.append(word)
    return kept


def rst_table(head, body, left=(0,)):
    """A reStructuredText simple table; the columns in ``left`` flush left, others right."""
    widths = [max(len(line[i]) for line in [head, *body]) for i in range(len(head))]
    rule = "  ".join("=" * w for w in widths)

    def line(cells):
        out = [c.ljust(w) if i in left else c.rjust(w)
               for i, (c, w) in enumerate(zip(cells, widths, strict=True))]
        return "  ".join(out).rstrip()

    return "\n".join([rule, line(head), rule, *(line(b) for b in body), rule])
