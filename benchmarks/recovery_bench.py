"""Start-up on a large journal: how long recovery takes.

Writes a journal of 1,000,000 message records from several users (with the
real FileJournal, fsync=never) in a temporary directory, or at PATH when
given one (an existing PATH is measured as it is; its checkpoint, if any, is
removed first and written again), then times the start-up two ways:

- read whole, as after a crash (no checkpoint):
  :func:`cserver.journal.recovery.recover` (median of 3) and the whole
  :meth:`cserver.journal.FileJournal.open`;
- after a clean stop: the journal closed, its checkpoint left as the server
  leaves it (:mod:`cserver.journal.checkpoint`), then ``FileJournal.open``
  (median of 3), which reads only what follows the checkpoint; the counts
  are checked against the whole read.

It prints one line::

    python benchmarks/recovery_bench.py [--records N] [PATH]

The bars on a 1,000,000-record journal: start-up after a clean stop under
0.6 s, read whole under 2 s.  The exit status is 1 when either is over.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

from twisted.internet.task import Clock

from cserver.journal import EVENT, FIELDS, FileJournal
from cserver.journal.checkpoint import path_for
from cserver.journal.recovery import recover

#: Start-up after a clean stop (from the checkpoint it left).
BAR = 0.6
#: Start-up with no checkpoint (after a crash): the whole journal read.
WHOLE_BAR = 2.0
USERS = ["alice", "bob", "carol", "dave", "eve", "zoë", 'q"uote', "😀"]
BATCH = 10_000


def write_journal(path, records):
    """
    Write ``records`` records to a new journal at ``path`` the way the server
    does: a start record, then messages from several users, in batches.
    """
    clock = Clock()
    journal = FileJournal.open(path, clock, fsync="never")
    journal({EVENT: "start", FIELDS: {"version": "bench", "records": 0}, "log_time": time.time()})
    now = time.time()
    for seq in range(2, records + 1):
        journal({
            EVENT: "message",
            "log_time": now + seq * 1e-5,
            "user": USERS[seq % len(USERS)],
            "text": f"message {seq} from the load generator, run {seq % 97}",
            "peer": f"tcp:127.0.0.1:{40000 + seq % 1000}",
        })
        if seq % BATCH == 0:
            journal.flush()
    journal.close()


def timed(function, *args):
    start = time.perf_counter()
    result = function(*args)
    return time.perf_counter() - start, result


def open_and_close(path):
    journal = FileJournal.open(path, Clock())
    journal.close()
    return journal


def bench(path, records):
    written = None
    if not os.path.exists(path):
        written, _ = timed(write_journal, path, records)
    if os.path.exists(path_for(path)):
        os.unlink(path_for(path))  # the whole read first
    size = os.path.getsize(path)
    runs = [timed(recover, path) for _ in range(3)]
    seconds = statistics.median(run for run, _result in runs)
    result = runs[0][1]
    if result.torn_bytes:
        raise SystemExit(f"{path}: recovery cut a torn tail of {result.torn_bytes} bytes")
    whole_seconds, journal = timed(open_and_close, path)
    # What a clean stop leaves: the checkpoint; then the start after it.
    assert journal.write_checkpoint(dict(result.users))
    starts = [timed(open_and_close, path) for _ in range(3)]
    start_seconds = statistics.median(run for run, _journal in starts)
    opened = starts[0][1].recovery
    assert (opened.records, opened.last_seq, opened.messages, opened.users) == (
        result.records, result.last_seq, result.messages, result.users)
    verdicts = [f"{'under' if start_seconds < BAR else 'OVER'} the {BAR:g} s bar",
                f"{'under' if whole_seconds < WHOLE_BAR else 'OVER'} the {WHOLE_BAR:g} s bar"]
    line = (
        f"recovery_bench: {result.records} records ({result.messages} messages, "
        f"{len(result.users)} users), {size / 1e6:.1f} MB: read whole: recover "
        f"{seconds:.3f} s (median of 3: {', '.join(f'{run:.3f}' for run, _ in runs)}), "
        f"FileJournal.open {whole_seconds:.3f} s, {size / 1e6 / seconds:.0f} MB/s "
        f"({verdicts[1]}); after a clean stop, from its checkpoint: FileJournal.open "
        f"{start_seconds * 1000:.2f} ms ({verdicts[0]})"
    )
    if written is not None:
        line += f"; journal written in {written:.1f} s"
    print(line)
    return start_seconds < BAR and whole_seconds < WHOLE_BAR


def journal_main(bench, description, argv=None):
    """
    The command line of a benchmark over one journal: ``[path] [--records N]``;
    ``bench(path, records)`` runs on ``path`` or, without one, on a journal in a
    temporary directory.  Exit status 0 when it returns true.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("path", nargs="?", help="the journal (written there if missing)")
    parser.add_argument("--records", type=int, default=1_000_000,
                        help="records to write (default 1,000,000)")
    args = parser.parse_args(argv)
    if args.path:
        return 0 if bench(args.path, args.records) else 1
    with tempfile.TemporaryDirectory(prefix="cserver-bench-") as directory:
        return 0 if bench(os.path.join(directory, "journal.jsonl"), args.records) else 1


def main(argv=None):
    return journal_main(bench, __doc__.split("\n\n")[0], argv)


if __name__ == "__main__":
    sys.exit(main())
