"""The journal before and after a change, measured in one run.

Checks out an earlier revision's ``cserver/`` (``git archive``) into a
temporary directory and runs each measurement in a child process, once with
that tree first on ``sys.path`` ("before") and once with this checkout
("after"), alternating, ``--rounds`` times; prints the median of each and
the ratio::

    python benchmarks/ab_journal.py [--before REV] [--records N] [--rounds K]

The measurements:

- ``take+write``: N message records taken by a :class:`FileJournal`
  (``fsync="never"``) and written in batches of 100 -- the per-message
  journal work of the server (the record's encoding, batching, the write);
- ``shared``: the same through a ``SharedFileJournal`` (the ``--workers``
  path: each batch numbered under the file's lock from the shared header);
- ``header``: N times the shared header's reads and writes of one batch
  (``--workers``: each batch touches it 14 times under the lock);
- ``recover``: :func:`recover` of an N-record journal (what start-up does);
- ``open``: the whole ``FileJournal.open`` of that journal.

Before timing, it checks that both trees write byte-identical journals for
the same events (with one pid and fixed times), strings with controls,
quotes, U+2028 and astral characters included.  The default ``--before``
is the last revision with the hand-built f-string records, the regex
recovery and the struct-indexed shared header.
"""

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEFAULT_BEFORE = "5a2f885"
MEASUREMENTS = ("take+write", "shared", "header", "recover", "open")
USERS = ["alice", "bob", "carol", "zoë", 'q"uote', "😀"]


# -- the child: one measurement with whichever cserver is on sys.path ---------------


def _api():
    from cserver import journal

    try:
        from cserver.journal.recovery import recover
    except ImportError:
        from cserver.recovery import recover
    try:
        from cserver.journal.header import Shared
    except ImportError:
        from cserver.shared import Shared
    return journal, recover, Shared


def _events(count, seed=None):
    from cserver.journal import EVENT

    rng = random.Random(seed)
    now = 1764750000.0
    for index in range(count):
        if seed is None:
            text = f"message {index} from the load generator, run {index % 97}"
        else:
            text = "".join(rng.choice("ab \"\\\n\t\x00\x1f\x7f\u2028é😀") for _ in range(12))
        yield {EVENT: "message", "log_time": now + index * 1e-5,
               "user": USERS[index % len(USERS)], "text": text,
               "peer": f"tcp:127.0.0.1:{40000 + index % 1000}"}


def _fill(journal, events, batch=100):
    for index, event in enumerate(events, 1):
        journal(event)
        if index % batch == 0:
            journal.flush()
    journal.flush()


def _timed_fill(journal, records):
    """
    Seconds for ``journal`` to take and write ``records`` message records.
    """
    events = list(_events(records))
    start = time.perf_counter()
    _fill(journal, events)
    elapsed = time.perf_counter() - start
    journal.close()
    return elapsed


def child(what, path, records):
    from twisted.internet.task import Clock

    journal_module, recover, shared_memory = _api()
    if what == "identical":
        journal = journal_module.FileJournal.open(path, Clock(), fsync="never")
        journal._pid = 4242
        _fill(journal, _events(records, seed=7), batch=7)
        journal.close()
        return 0.0
    if what == "take+write":
        journal = journal_module.FileJournal.open(path, Clock(), fsync="never")
        return _timed_fill(journal, records)
    if what == "shared":
        shared = shared_memory.create(1)
        journal_module.SharedFileJournal.prepare(path, shared)
        journal = journal_module.SharedFileJournal.open(path, Clock(), shared, fsync="never")
        return _timed_fill(journal, records)
    if what == "header":
        # The header work of one batch under the lock (what _write_batch
        # reads and writes), ``records`` times.
        header = shared_memory.create(1).header
        start = time.perf_counter()
        for _ in range(records):
            if header.broken or header.busy:
                raise AssertionError("a fresh header is neither broken nor busy")
            header.busy = 4242
            first = header.last_seq + 1
            offset = header.end
            header.commit_messages = header.messages + 100
            header.commit_seq = first + 99
            header.end = offset + 10000
            header.last_seq = first + 99
            header.messages = header.commit_messages
            header.commit_seq = 0
            header.busy = 0
        return time.perf_counter() - start
    if what == "recover":
        start = time.perf_counter()
        recover(path)
        return time.perf_counter() - start
    if what == "open":
        start = time.perf_counter()
        journal_module.FileJournal.open(path, Clock(), fsync="never").close()
        return time.perf_counter() - start
    raise SystemExit(f"unknown measurement {what}")


# -- the parent ----------------------------------------------------------------------


def run_child(tree, what, path, records):
    env = dict(os.environ, PYTHONPATH=tree)
    out = subprocess.run(
        [sys.executable, __file__, "--child", what, path, str(records)],
        env=env, capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"{what} in {tree} failed:\n{out.stderr}")
    return float(out.stdout)


def checkout(revision, directory):
    archive = subprocess.run(["git", "-C", ROOT, "archive", revision, "cserver", "twisted"],
                             capture_output=True, check=True).stdout
    os.mkdir(directory)
    subprocess.run(["tar", "-x", "-C", directory], input=archive, check=True)
    return directory


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", default=DEFAULT_BEFORE, help="the earlier revision")
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as work:
        before = checkout(args.before, os.path.join(work, "before"))
        trees = {"before": before, "after": ROOT}
        # 1. The same events make the same bytes.
        written = {}
        for name, tree in trees.items():
            path = os.path.join(work, f"identical-{name}.jsonl")
            run_child(tree, "identical", path, 20_000)
            written[name] = open(path, "rb").read()
        same = written["before"] == written["after"]
        print(f"byte-identical journals for 20,000 random records: {'yes' if same else 'NO'}",
              flush=True)
        if not same:
            return 1
        # 2. The timings, alternating.
        journal = os.path.join(work, "journal.jsonl")
        results = {}
        for round_ in range(args.rounds):
            for what in MEASUREMENTS:
                for name, tree in (trees.items() if round_ % 2 == 0
                                   else reversed(list(trees.items()))):
                    if what in ("take+write", "shared", "header"):
                        path = os.path.join(work, f"{what}-{name}.jsonl")
                        if os.path.exists(path):
                            os.unlink(path)
                    else:
                        path = journal
                        if not os.path.exists(journal):
                            run_child(ROOT, "take+write", journal, args.records)
                    seconds = run_child(tree, what, path, args.records)
                    results.setdefault((what, name), []).append(seconds)
                    print(f"  round {round_ + 1}/{args.rounds}: {what:<10} {name:<6} "
                          f"{seconds:.3f} s", file=sys.stderr, flush=True)
        report = {}
        print(f"\n{args.records:,} records, median of {args.rounds} (before = {args.before}):")
        print(f"{'':<11} {'before':>9} {'after':>9} {'after/before':>13}")
        for what in MEASUREMENTS:
            b = statistics.median(results[(what, "before")])
            a = statistics.median(results[(what, "after")])
            report[what] = {"before": b, "after": a}
            print(f"{what:<11} {b:>8.3f}s {a:>8.3f}s {a / b:>12.2f}x")
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        print(child(sys.argv[2], sys.argv[3], int(sys.argv[4])))
    else:
        sys.exit(main())
