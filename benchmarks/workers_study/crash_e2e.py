"""End to end kill -9 test of a prototype under load.

A prototype for the design study in docs/workers-design.rst, not part of
cserver.  Run from the repository root::

    python benchmarks/workers_study/crash_e2e.py DESIGN WHAT [--workdir DIR]

DESIGN is A, B or C; WHAT is worker or parent.
Starts `proto.py parent --design DESIGN --workers 2`, runs 200 connections that
send MSGs one at a time and record every `OK <seq>` with its text, kills -9 one
worker (or the parent) after 1.5 s, runs on to 3 s, stops everything, then
recovers the journal and checks every acked (seq, text) is in it.  The
journal goes to --workdir (default: a temporary directory, removed at the end).
"""
import argparse
import asyncio
import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from cserver.recovery import JournalDamaged, recover

HERE = os.path.dirname(os.path.abspath(__file__))

ap = argparse.ArgumentParser()
ap.add_argument("design", choices=["A", "B", "C"])
ap.add_argument("what", choices=["worker", "parent"])
ap.add_argument("--workdir", help="where the journal goes (default: a temporary directory)")
args = ap.parse_args()
design, what = args.design, args.what
workdir = args.workdir
if workdir is None:
    workdir = tempfile.mkdtemp(prefix="crash-e2e-")
    atexit.register(shutil.rmtree, workdir, True)
os.makedirs(workdir, exist_ok=True)
PY = sys.executable
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
journal = os.path.join(workdir, f"e2e-{design}-{what}.jsonl")
for f in os.listdir(workdir):
    if f.startswith(os.path.basename(journal)):
        os.unlink(os.path.join(workdir, f))
proc = subprocess.Popen([PY, os.path.join(HERE, "proto.py"), "parent", "--design", design,
                         "--workers", "2", "--share", "reuseport", "--port", str(port),
                         "--journal", journal, "--users", "bench"],
                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                        start_new_session=True)
acked, dropped = [], [0]

async def client(i, stop_at):
    try:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        await r.readline()
        w.write(b"AUTH bench\n")
        await r.readline()
        n = 0
        while time.monotonic() < stop_at:
            text = f"c{i}-{n}"
            n += 1
            w.write(f"MSG {text}\n".encode())
            line = await asyncio.wait_for(r.readline(), 10)
            if not line:
                dropped[0] += 1
                return
            if line.startswith(b"OK "):
                acked.append((int(line.split()[1]), text))
        w.close()
    except (OSError, asyncio.TimeoutError):
        dropped[0] += 1

async def main():
    stop_at = time.monotonic() + 3
    tasks = [asyncio.create_task(client(i, stop_at)) for i in range(200)]
    await asyncio.sleep(1.5)
    victim = proc.pid if what == "parent" else workers[0]
    os.kill(victim, signal.SIGKILL)
    await asyncio.gather(*tasks)

try:
    line = proc.stdout.readline()
    workers = [int(p) for p in line.strip().split("pids=")[1].split(",")]
    time.sleep(0.5)
    asyncio.run(main())
    time.sleep(0.5)
    alive_before = [p for p in workers if os.path.exists(f"/proc/{p}") and
                    open(f"/proc/{p}/stat").read().split(") ")[1][0] != "Z"]
finally:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    time.sleep(1)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
alive = [p for p in workers if os.path.exists(f"/proc/{p}") and
         open(f"/proc/{p}/stat").read().split(") ")[1][0] != "Z"]
try:
    r = recover(journal)
    lines = {}
    with open(journal, "rb") as f:
        for raw in f:
            rec = json.loads(raw)
            lines[rec["seq"]] = rec["text"]
    lost = [(s, t) for s, t in acked if lines.get(s) != t]
    print(f"{design} kill -9 {what}: acked={len(acked)} dropped_conns={dropped[0]} "
          f"journal records={r.records} last_seq={r.last_seq} torn={r.torn_bytes} "
          f"acked_lost={len(lost)} workers_alive_0.5s_after_test={alive_before}")
except JournalDamaged as e:
    print(f"{design} kill -9 {what}: DAMAGED {e}")
