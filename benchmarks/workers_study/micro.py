"""Micro-measurements behind the design study's cost figures: fdatasync after a
4 KB append, an uncontended flock plus unlock, and writing counters into a
memfd mmap.

A prototype for the design study in docs/workers-design.rst, not part of
cserver.  Run from the repository root::

    python benchmarks/workers_study/micro.py [--dir DIR]

The scratch file goes in ``--dir`` (default: the temporary directory), so
that directory's file system is the one whose fdatasync is measured; it is
removed at the end.
"""

import argparse
import fcntl
import mmap
import os
import statistics
import struct
import tempfile
import time

# Kept at module level on purpose: the figures in the doc were measured with
# module-level (global) variables, which cost more than a function's locals.
ap = argparse.ArgumentParser()
ap.add_argument("--dir", default=tempfile.gettempdir(),
                help="directory for the scratch file (its file system is measured)")
args = ap.parse_args()
fd, p = tempfile.mkstemp(prefix="micro-", suffix=".jsonl", dir=args.dir)
os.close(fd)
fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND)
lat = []
for _ in range(300):
    os.write(fd, b"x" * 4000 + b"\n")
    t = time.perf_counter()
    os.fdatasync(fd)
    lat.append(time.perf_counter() - t)
lat.sort()
print(f"fdatasync after 4 KB append: median {statistics.median(lat)*1e3:.2f} ms "
      f"p90 {lat[270]*1e3:.2f} ms")
N = 200000
t = time.perf_counter()
for _ in range(N):
    fcntl.flock(fd, fcntl.LOCK_EX)
    fcntl.flock(fd, fcntl.LOCK_UN)
print(f"flock+unlock uncontended: {(time.perf_counter()-t)/N*1e9:.0f} ns")
memfd = os.memfd_create("c")
os.ftruncate(memfd, 4096)
shm = mmap.mmap(memfd, 4096)
S = struct.Struct("=qqqq")
t = time.perf_counter()
for i in range(N):
    S.pack_into(shm, 64, i, i, i, i)
print(f"pack_into 4 counters into memfd mmap: {(time.perf_counter()-t)/N*1e9:.0f} ns")
one = struct.Struct("=q")
t = time.perf_counter()
for _ in range(N):
    one.pack_into(shm, 64, one.unpack_from(shm, 64)[0] + 1)
print(f"read-increment-write one counter: {(time.perf_counter()-t)/N*1e9:.0f} ns")
v = memoryview(shm).cast("q")
t = time.perf_counter()
for _ in range(N):
    v[8] += 1
print(f"memoryview.cast('q')[i] += 1: {(time.perf_counter()-t)/N*1e9:.0f} ns")
os.unlink(p)
