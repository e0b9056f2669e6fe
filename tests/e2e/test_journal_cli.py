"""Tests for cserver.journal.cli (``cserver-journal``) through ``python -m``:
verify, and tail -f, on journals written by the real FileJournal.

End-to-end layer: the tool as a real process (through ``main(argv)`` it is
in tests/unit/test_journal_cli.py).
"""

import json
import os
import subprocess
import sys

import pytest

from ..unit.test_journal_cli import lines, make_journal, message, write


@pytest.fixture
def journal(tmp_path):
    """
    A journal of 6 records: start, 3 messages (alice twice), an auth
    failure and a stop.
    """
    return make_journal(tmp_path)


def test_cli_subprocess_tail_follow(journal):
    """
    ``python -m cserver.journal.cli tail -f`` as a real process: prints the
    last record, then a record appended, then one written to a new file
    after the journal is renamed; exits 0 at the end of ``--for``.
    """
    process = subprocess.Popen(
        [sys.executable, "-m", "cserver.journal.cli", "tail", "-n", "1", "-f", "--for", "5",
         "--interval", "0.05", journal],
        stdout=subprocess.PIPE,
    )
    try:
        assert process.stdout.readline() == lines(journal)[-1] + b"\n"
        write(journal, [message("carol", "live")])
        assert json.loads(process.stdout.readline())["text"] == "live"
        os.rename(journal, journal + ".1")
        write(journal, [message("dave", "rotated")], last_seq=7)
        got = json.loads(process.stdout.readline())
        assert (got["seq"], got["text"]) == (8, "rotated")
        assert process.wait(10) == 0
    finally:
        process.kill()
        process.wait()
        process.stdout.close()


def test_cli_subprocess_verify(journal, tmp_path):
    """
    ``python -m cserver.journal.cli verify``: exit status 0 on a valid
    journal, 2 on a missing one.
    """
    command = [sys.executable, "-m", "cserver.journal.cli", "verify"]
    ok = subprocess.run([*command, journal], capture_output=True, check=False)
    assert (ok.returncode, ok.stdout.endswith(b"bytes\n")) == (0, True)
    missing = subprocess.run([*command, str(tmp_path / "nope")], capture_output=True,
                             check=False)
    assert missing.returncode == 2
