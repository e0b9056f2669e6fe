"""Kill -9 writers of the shared-append journal (design B) at random moments.

A prototype for the design study in docs/workers-design.rst, not part of
cserver.  Run from the repository root::

    python benchmarks/workers_study/crash_b.py VARIANT SECONDS [--workdir DIR]

VARIANT: append  - O_APPEND write under flock, seq from shm, no end offset kept
         pwrite  - pwrite at the shm end offset, no busy flag/truncate
         repair  - pwrite at shm end + busy flag; next holder ftruncates to end
         sharedofd - repair, but flock taken through an fd inherited from the
                     parent (one open file description), and no kills
Two writer processes append batches of 1..2000 records (~110 B each) and
fdatasync; after the sync they report (first, last, sha1) as acked.  The
main process SIGKILLs a random writer every 0..15 ms and restarts it.  At the
end: recover() the file, and check every acked batch is there, byte for byte.
The journal goes to --workdir (default: a temporary directory, removed at the
end); several seconds of this write hundreds of MB.
"""
import argparse
import atexit
import fcntl
import hashlib
import mmap
import os
import random
import shutil
import signal
import struct
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from cserver.recovery import JournalDamaged, recover

HDR = struct.Struct("=qqq")
ap = argparse.ArgumentParser()
ap.add_argument("variant", choices=["append", "pwrite", "repair", "sharedofd"])
ap.add_argument("seconds", type=float)
ap.add_argument("--workdir", help="where the journal goes (default: a temporary directory)")
args = ap.parse_args()
variant, seconds = args.variant, args.seconds
workdir = args.workdir
if workdir is None:
    workdir = tempfile.mkdtemp(prefix="crash-b-")
    # Removed by the main process only: the forked writers leave through os._exit.
    atexit.register(shutil.rmtree, workdir, True)
path = os.path.join(workdir, f"crash-{variant}.jsonl")
os.makedirs(workdir, exist_ok=True)
if os.path.exists(path):
    os.unlink(path)
for f in os.listdir(os.path.dirname(path)):
    if f.startswith(f"crash-{variant}.jsonl.torn"):
        os.unlink(os.path.join(os.path.dirname(path), f))
shared_fd = os.open(path, os.O_RDWR | os.O_CREAT | (os.O_APPEND if variant == "append" else 0),
                    0o644)
shm = mmap.mmap(-1, 4096, mmap.MAP_SHARED)
rpipe, wpipe = os.pipe()

def writer(idx):
    random.seed(os.getpid())
    if variant == "sharedofd":
        fd = shared_fd
    else:
        fd = os.open(path, os.O_RDWR | (os.O_APPEND if variant == "append" else 0))
    n = 0
    deadline = time.monotonic() + seconds + 5
    while time.monotonic() < deadline:
        count = random.choice([1, 10, 200, 2000])
        tails = [b'"time":%f,"event":"message","pid":%d,"user":"w%d","text":"%s","peer":"x"}\n'
                 % (time.time(), os.getpid(), idx,
                    b"%d-%d" % (os.getpid(), n + i) + b"a" * 40)
                 for i in range(count)]
        n += count
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            last, end, busy = HDR.unpack_from(shm, 0)
            if variant in ("repair", "sharedofd") and busy:
                os.ftruncate(fd, end)
            first = last + 1
            data = b"".join([b'{"seq":%d,' % (first + i) + t for i, t in enumerate(tails)])
            HDR.pack_into(shm, 0, last, end, 1)
            if variant == "append":
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            else:
                view = memoryview(data)
                off = end
                while view:
                    k = os.pwrite(fd, view, off)
                    view = view[k:]
                    off += k
            HDR.pack_into(shm, 0, first + count - 1, end + len(data), 0)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.fdatasync(fd)
        os.write(wpipe, struct.pack("=qq20s", first, first + count - 1,
                                    hashlib.sha1(data).digest()))
    os._exit(0)

def spawn(idx):
    pid = os.fork()
    if pid == 0:
        try:
            writer(idx)
        finally:
            os._exit(1)
    return pid

pids = [spawn(0), spawn(1)]
kills = 0
end_at = time.monotonic() + seconds
os.set_blocking(rpipe, False)
acked = []
buf = b""
try:
    while time.monotonic() < end_at:
        time.sleep(random.uniform(0, 0.015))
        if variant != "sharedofd":
            i = random.randrange(2)
            os.kill(pids[i], signal.SIGKILL)
            os.waitpid(pids[i], 0)
            kills += 1
            pids[i] = spawn(i)
        try:
            buf += os.read(rpipe, 1 << 20)
        except BlockingIOError:
            pass
finally:
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
            os.waitpid(p, 0)
        except ProcessLookupError:
            pass
while True:
    try:
        chunk = os.read(rpipe, 1 << 20)
    except BlockingIOError:
        break
    if not chunk:
        break
    buf += chunk
S = struct.Struct("=qq20s")
acked = [S.unpack_from(buf, o) for o in range(0, len(buf) // S.size * S.size, S.size)]
size = os.fstat(shared_fd).st_size
try:
    r = recover(path)
    result = f"valid: records={r.records} last_seq={r.last_seq} torn_bytes={r.torn_bytes}"
    damaged = False
except JournalDamaged as e:
    result = f"DAMAGED: {str(e)[:140]}"
    damaged = True
missing = 0
if not damaged:
    lines = {}
    with open(path, "rb") as f:
        for line in f:
            lines[int(line[7:line.index(b",")])] = line
    for first, last, digest in acked:
        data = b"".join(lines.get(s, b"") for s in range(first, last + 1))
        if hashlib.sha1(data).digest() != digest:
            missing += 1
print(f"{variant}: {seconds}s kills={kills} acked_batches={len(acked)} size={size} -> {result}; "
      f"acked batches missing/altered={missing if not damaged else 'n/a'}")
