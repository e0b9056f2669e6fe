"""Tests for cserver.journal.SharedFileJournal with real writer processes:
two forked writers append to one journal from one shared header while one or
the other is SIGKILLed at random.

End-to-end layer: forked processes and SIGKILL (several journals in one
process standing for several workers are in tests/unit/test_journal_shared.py).
"""

import os
import random
import signal
import time

import pytest
from twisted.internet.task import Clock

from cserver.journal import EVENT, SharedFileJournal
from cserver.journal.header import Shared

from ..unit.test_journal import message
from ..unit.test_journal_shared import assert_valid


@pytest.fixture
def shared():
    shared = Shared.create(2)
    yield shared
    shared.close()
    os.close(shared.fd)


def _append_forever(path, shared, report_path, tag, fsync):
    """
    A child: append batches of 1-20 messages, each flushed (and synced by
    ``fsync``), then note every acked (seq, text) in the report file.
    """
    clock = Clock()
    journal = SharedFileJournal.open(path, clock, shared, fsync=fsync)
    report = os.open(report_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    rng = random.Random(os.getpid())
    acked = []
    n = 0
    while True:
        for _ in range(rng.randint(1, 20)):
            text = f"{tag}-{n}" + "x" * rng.randint(0, 50)
            n += 1
            message(journal, lambda seq, reason, text=text: acked.append((seq, reason, text)),
                    text=text)
        journal.flush()
        lines = [f"{seq} {text}\n" for seq, reason, text in acked if reason is None]
        acked.clear()
        os.write(report, "".join(lines).encode())


def test_writers_killed_at_random_lose_no_acked_record(path, shared, tmp_path):
    """Two writer processes append while one or the other is SIGKILLed at
    random (100 kills; every 10th kills both, the second while it writes),
    each once it has reported an ack: at each of those checkpoints, once one
    more write has repaired what the victims left, the file is a valid
    journal with contiguous seqs, and every record any writer reported acked
    is in it, at its seq."""
    SharedFileJournal.prepare(path, shared)
    rng = random.Random(4)
    reports = {}  # report file: how much of it is checked

    def spawn():
        tag = len(reports)
        report_path = str(tmp_path / f"acked-{tag}")
        reports[report_path] = 0
        pid = os.fork()
        if pid == 0:
            try:
                # Without syncs a writer spends most of its time under the
                # lock, where a kill leaves a partial batch.
                _append_forever(path, shared, report_path, tag,
                                "always" if tag % 4 == 0 else "never")
            finally:
                os._exit(1)
        return pid, report_path

    def kill(child, mid_batch=False):
        pid, report_path = child
        # However loaded the machine, each victim has acked something first
        # (polled: the report file is the writer's only sign of progress).
        while not os.path.exists(report_path) or not os.path.getsize(report_path):
            assert os.waitpid(pid, os.WNOHANG) == (0, 0), "a writer died on its own"
            time.sleep(0.001)
        if mid_batch:
            # Aim at the lock holder: watch the header (no sleep: a batch
            # holds the lock for microseconds) for up to a second.
            header = shared.header
            deadline = time.monotonic() + 1.0
            while header.busy != pid and time.monotonic() < deadline:
                pass
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)

    children = [spawn(), spawn()]
    acked = busy = 0
    try:
        for round_ in range(1, 101):
            time.sleep(rng.uniform(0, 0.01))
            kill(children.pop(rng.randrange(len(children))))
            if round_ % 10 == 0:
                kill(children.pop(), mid_batch=True)
                busy += shared.header.busy != 0
                acked += _check_after_kills(path, shared, reports)
                if round_ == 100:
                    break
                children.append(spawn())
            children.append(spawn())
    finally:
        for pid, _ in children:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    assert busy > 0, "no checkpoint found a writer killed mid-batch"
    assert acked >= 110, "each of the 110 victims reported at least one ack"
    # The records acked before a checkpoint are still there at the end.
    reports = dict.fromkeys(reports, 0)
    assert _check_after_kills(path, shared, reports) == acked


def _check_after_kills(path, shared, reports):
    """
    With every writer dead: one more write (as the parent's stop record),
    then the file must be valid and hold every ack reported since the last
    check; return how many those were.
    """
    parent = SharedFileJournal.open(path, Clock(), shared)
    parent({EVENT: "stop", "log_time": 1.0})
    parent.close()
    assert_valid(path, shared)
    # recover() checked that the seqs run 1..n: record n is line n.
    lines = open(path, "rb").read().split(b"\n")
    acked = 0
    for report_path, checked in reports.items():
        if not os.path.exists(report_path):
            continue
        with open(report_path, "rb") as f:
            f.seek(checked)
            data = f.read()
        data = data[: data.rfind(b"\n") + 1]  # a victim's last line may be cut
        reports[report_path] = checked + len(data)
        for line in data.split(b"\n")[:-1]:
            seq, text = line.split(b" ", 1)
            record = lines[int(seq) - 1]
            assert record.startswith(b'{"seq":%s,' % seq)
            assert record.endswith(b',"text":"%s","peer":"tcp:127.0.0.1:40000"}' % text)
            acked += 1
    return acked
