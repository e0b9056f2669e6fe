"""``cserver-journal`` on a large journal: how long each subcommand takes.

Writes a journal of 1,000,000 records (a start record, then messages from
several users, with the real FileJournal, as ``recovery_bench.py`` does) in a
temporary directory, or at PATH when given one (an existing PATH is measured
as it is), then runs each subcommand as a child process (``python -m
cserver.journal.cli``, interpreter start-up included), output to /dev/null,
and prints one line per command, with :func:`cserver.journal.recovery.recover`'s time
on the same file for comparison::

    python benchmarks/journal_cli_bench.py [--records N] [PATH]
"""

import os
import subprocess
import sys
import time

from recovery_bench import journal_main, write_journal

from cserver.journal.recovery import check

COMMANDS = [
    ["verify"],
    ["stats"],
    ["stats", "--json"],
    ["text"],
    ["tail", "-n", "10"],
    ["tail", "-n", "100000"],
]


def run(command, path):
    start = time.perf_counter()
    with open(os.devnull, "wb") as devnull:
        status = subprocess.run(
            [sys.executable, "-m", "cserver.journal.cli", *command, path],
            stdout=devnull, check=False,
        ).returncode
    return time.perf_counter() - start, status


def bench(path, records):
    if not os.path.exists(path):
        start = time.perf_counter()
        write_journal(path, records)
        print(f"journal_cli_bench: wrote {records} records in {time.perf_counter() - start:.1f} s")
    size = os.path.getsize(path)
    start = time.perf_counter()
    result = check(path)
    seconds = time.perf_counter() - start
    print(f"journal_cli_bench: {result.records} records, {size / 1e6:.1f} MB; "
          f"recovery's scan (check, in process) {seconds:.3f} s")
    ok = True
    for command in COMMANDS:
        seconds, status = run(command, path)
        ok = ok and status == 0
        print(f"journal_cli_bench: cserver-journal {' '.join(command):<16} {seconds:7.3f} s"
              f"  exit {status}  ({result.records / seconds / 1e6:.2f} M records/s)")
    return ok


def main(argv=None):
    return journal_main(bench, __doc__.split("\n\n")[0], argv)


if __name__ == "__main__":
    sys.exit(main())
