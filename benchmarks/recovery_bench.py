"""Start-up on a large journal: how long recovery takes.

Writes a journal of 1,000,000 message records from several users (with the
real FileJournal, fsync=never) in a temporary directory, or at PATH when
given one (an existing PATH is measured as it is), then times
:func:`cserver.journal.recovery.recover` (median of 3) and the whole
:meth:`cserver.journal.FileJournal.open`, and prints one line::

    python benchmarks/recovery_bench.py [--records N] [PATH]

The bar: start-up on a 1,000,000-record journal under 2 s.  The
exit status is 1 when the full open is over it.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

from twisted.internet.task import Clock

from cserver.journal import EVENT, FIELDS, FileJournal
from cserver.journal.recovery import recover

BAR = 2.0
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
    return journal.recovery


def bench(path, records):
    written = None
    if not os.path.exists(path):
        written, _ = timed(write_journal, path, records)
    size = os.path.getsize(path)
    runs = [timed(recover, path) for _ in range(3)]
    seconds = statistics.median(run for run, _result in runs)
    result = runs[0][1]
    if result.torn_bytes:
        raise SystemExit(f"{path}: recovery cut a torn tail of {result.torn_bytes} bytes")
    open_seconds, opened = timed(open_and_close, path)
    assert opened.records == result.records and opened.last_seq == result.last_seq
    verdict = "under" if open_seconds < BAR else "OVER"
    line = (
        f"recovery_bench: {result.records} records ({result.messages} messages, "
        f"{len(result.users)} users), {size / 1e6:.1f} MB: recover {seconds:.3f} s "
        f"(median of 3: {', '.join(f'{run:.3f}' for run, _ in runs)}), "
        f"FileJournal.open {open_seconds:.3f} s, {size / 1e6 / seconds:.0f} MB/s; "
        f"{verdict} the {BAR:g} s bar"
    )
    if written is not None:
        line += f" (journal written in {written:.1f} s)"
    print(line)
    return open_seconds < BAR


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
