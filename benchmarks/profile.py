"""Where the server's time goes: a py-spy profile of ``twistd -n cserver`` under load.

Starts a server on a free loopback port, attaches py-spy (``pip install
py-spy``) to it, drives it with ``cserver-client bench`` (1000 connections x
50 MSGs by default, several times), and sorts every sample of the server's
reactor thread by the innermost frame that says what it was doing:

- socket send / recv: the kernel work of moving bytes (``send``, ``recv``);
- epoll registration: ``startWriting``/``stopWriting`` and the other epoll calls;
- Twisted: the reactor loop and transports, in Python;
- cserver protocol, journal, cred: this project's own code;
- journal write + fdatasync: the system calls behind the journal.

With prometheus_client installed (the test extra), the server also serves
``--metrics``, and the run ends with how many fdatasyncs it made and how
long they took (the ``cserver_journal_fsync_seconds`` histogram).  Server
options go after ``--``, e.g. ``-- --writes queued``.

    python benchmarks/profile.py [--connections 1000] [--messages 50] [--rounds 5] [-- OPTIONS]
"""

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _servers import cserver, free_port  # noqa: E402

CATEGORIES = [
    ("journal write + fdatasync", ("FileJournal._append", "FileJournal._sync")),
    ("socket send", ("writeSomeData", "untilConcludes", "EagerServer.write")),
    ("socket recv", ("Connection.doRead",)),
    ("socket accept / close", ("Port.doRead", "_closeSocket", "socket.accept", "_real_close")),
    ("epoll registration", ("EPollReactor._add", "EPollReactor._remove", "addWriter",
                            "removeWriter", "addReader", "removeReader")),
    ("epoll wait", ("EPollReactor.doPoll (twisted/internet/epollreactor.py:227",)),
    ("cred (Portal, checker, realm)", ("twisted/cred/", "cserver/auth.py")),
    ("cserver journal", ("cserver/journal.py",)),
    ("cserver protocol + factory", ("cserver/protocol.py", "cserver/server.py")),
    ("Twisted Deferreds", ("twisted/internet/defer.py",)),
]


def classify(frames):
    """The category of one stack (outermost first): the innermost frame that matches."""
    for frame in reversed(frames):
        for name, needles in CATEGORIES:
            if any(needle in frame for needle in needles):
                return name
    return "Twisted reactor and transports (Python)"


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--messages", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("options", nargs="*", help="server options (after --)")
    args = parser.parse_args()
    options = list(args.options)
    metrics = None
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        pass
    else:
        metrics = free_port()
        options += ["--metrics", f"tcp:{metrics}:interface=127.0.0.1"]
    py_spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    if not os.path.exists(py_spy):
        sys.exit("profile: py-spy is needed: pip install py-spy")
    work = tempfile.mkdtemp(prefix="cserver-profile-")
    raw = os.path.join(work, "profile.txt")
    with cserver(work, *options) as server:
        spy = subprocess.Popen(
            [py_spy, "record", "--format", "raw", "--rate", str(args.rate), "--output", raw,
             "--pid", str(server.process.pid)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        client = os.path.join(os.path.dirname(sys.executable), "cserver-client")
        for _ in range(args.rounds):
            subprocess.run(
                [client, "bench", "--port", str(server.port), "-c", str(args.connections),
                 "-n", str(args.messages), "--json"],
                check=True, stdout=subprocess.DEVNULL, timeout=300,
            )
        spy.send_signal(2)
        spy.wait(60)
        syncs = fsync_histogram(metrics) if metrics else None
    counts = collections.Counter()
    total = 0
    with open(raw) as f:
        for line in f:
            stack, _, n = line.rstrip().rpartition(" ")
            if "threading.py" in stack:
                continue
            total += int(n)
            counts[classify(stack.split(";"))] += int(n)
    shutil.rmtree(work, ignore_errors=True)
    print(f"profile: {args.rounds} x bench -c {args.connections} -n {args.messages}, "
          f"server options: {' '.join(args.options) or '(defaults)'}; "
          f"{total} samples of the reactor thread")
    width = max(len(name) for name in counts)
    for name, n in counts.most_common():
        print(f"  {name:<{width}}  {100 * n / total:5.1f}%")
    if syncs:
        count, seconds = syncs
        messages = args.rounds * args.connections * args.messages
        print(f"fdatasync: {count:.0f} for {messages} messages "
              f"({messages / count:.0f} messages per sync), {seconds * 1e3:.0f} ms in all, "
              f"{seconds / count * 1e3:.2f} ms each on average")


def fsync_histogram(port):
    """The count and sum of cserver_journal_fsync_seconds from ``/metrics`` on ``port``."""
    from urllib.request import urlopen

    with urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as page:
        text = page.read().decode()
    values = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        values[name] = value
    prefix = "cserver_journal_fsync_seconds"
    return float(values[f"{prefix}_count"]), float(values[f"{prefix}_sum"])


if __name__ == "__main__":
    main()
