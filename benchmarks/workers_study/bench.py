"""Drive one run: start a server command, run loadgen, read CPU of every process.

A prototype for the design study in docs/workers-design.rst, not part of
cserver.  Run from the repository root::

    python benchmarks/workers_study/bench.py LABEL [--loadgen PATH] [--workdir DIR] -- CMD...

``{port}`` and ``{journal}`` in CMD are substituted.  The C load generator is
``$LOADGEN`` or ``--loadgen``; if neither is given it is built from
../shared/bench/loadgen.c (relative to the repository root) into a temporary
directory.  The journal goes to ``--workdir`` (default: a temporary directory,
removed afterwards), so that directory's file system is the one measured.
``K`` in the environment sets the messages per connection (default 50).

Prints one JSON line: label, msg/s, total ms, p50/p99, CPU us/msg per process
(server first, then its children), loadgen CPU us/msg, the prototype's
counters if any, and what ``cserver.recovery.recover`` found in the journal.
"""

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
SHARED_BENCH = os.path.normpath(os.path.join(REPO, "..", "shared", "bench"))
HZ = os.sysconf("SC_CLK_TCK")


def cpu(pid):
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / HZ


def children(pid):
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(x) for x in f.read().split()]
    except FileNotFoundError:
        pass
    return out


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_greeting(port, proc, secs=20):
    end = time.monotonic() + secs
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit("server exited early")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.settimeout(2)
                if s.recv(200):
                    return
        except OSError:
            time.sleep(0.05)
    raise SystemExit("no greeting")


def build_loadgen(directory):
    """Build ../shared/bench/loadgen.c into ``directory``; return the executable."""
    exe = os.path.join(directory, "loadgen")
    subprocess.run(["gcc", "-O2", "-o", exe, os.path.join(SHARED_BENCH, "loadgen.c")],
                   check=True)
    return exe


def run(label, cmd, loadgen, jdir, n=1000, k=None, user=None):
    if k is None:
        k = int(os.environ.get("K", "50"))
    user = user or os.environ.get("USER") or "bench"
    port = free_port()
    os.makedirs(jdir, exist_ok=True)
    journal = f"{jdir}/{label}-{port}.jsonl"
    argv = [a.replace("{port}", str(port)).replace("{journal}", journal) for a in cmd]
    with open(journal + ".err", "w") as err:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err,
                                start_new_session=True)
    try:
        wait_greeting(port, proc)
        time.sleep(0.3)
        pids = [proc.pid] + children(proc.pid)
        before = {p: cpu(p) for p in pids}
        r0 = os.times()
        lg = subprocess.run([loadgen, "-p", str(port), "-n", str(n), "-k", str(k), "-u", user],
                            capture_output=True, text=True, timeout=300)
        r1 = os.times()
        after = {p: cpu(p) for p in pids}
        if lg.returncode:
            raise SystemExit(f"loadgen failed: {lg.stderr} {lg.stdout}")
        m = re.search(r"msg_per_s=(\d+)", lg.stdout)
        tot = re.search(r"total_ms=([\d.]+)", lg.stdout)
        lat = re.search(r"latency ms p50 ([\d.]+) p99 ([\d.]+)", lg.stdout)
        msgs = n * k
        lcpu = (r1.children_user + r1.children_system) - (r0.children_user + r0.children_system)
        res = dict(label=label, msg_s=int(m.group(1)), total_ms=float(tot.group(1)),
                   p50=float(lat.group(1)), p99=float(lat.group(2)),
                   cpu_us=[round((after[p] - before[p]) / msgs * 1e6, 2) for p in pids],
                   loadgen_cpu_us=round(lcpu / msgs * 1e6, 2))
        cfile = journal + ".counters"
        time.sleep(0.7)
        if os.path.exists(cfile):
            with open(cfile) as f:
                res["counters"] = f.read().strip()
        return res, journal, proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def main():
    if "--" not in sys.argv:
        raise SystemExit(__doc__)
    i = sys.argv.index("--")
    ap = argparse.ArgumentParser(usage="%(prog)s LABEL [--loadgen PATH] [--workdir DIR] -- CMD...")
    ap.add_argument("label")
    ap.add_argument("--loadgen", default=os.environ.get("LOADGEN"),
                    help="the C load generator (default: $LOADGEN, else built from "
                         "../shared/bench/loadgen.c)")
    ap.add_argument("--workdir", help="where the journal goes (default: a temporary directory)")
    args = ap.parse_args(sys.argv[1:i])
    cmd = sys.argv[i + 1:]
    tmp = tempfile.mkdtemp(prefix="workers-study-")
    try:
        loadgen = args.loadgen or build_loadgen(tmp)
        jdir = args.workdir or os.path.join(tmp, "j")
        res, journal, proc = run(args.label, cmd, loadgen, jdir)
        sys.path.insert(0, REPO)
        from cserver.recovery import recover
        r = recover(journal)
        res["journal"] = f"records={r.records} last_seq={r.last_seq} torn={r.torn_bytes}"
        os.unlink(journal)
        print(json.dumps(res), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
