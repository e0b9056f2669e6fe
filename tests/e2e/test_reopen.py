"""Tests for reopening the journal at its path (SIGHUP, log rotation), end to
end with a real twistd: a rename and SIGHUP, the shipped logrotate config, and
--workers ignoring SIGHUP.

End-to-end layer: real ``twistd cserver`` processes and signals
(FileJournal.reopen on a task.Clock is in tests/unit/test_reopen.py).
"""

import glob
import os
import shutil
import signal
import subprocess

import pytest

from ..server_process import read_journal


def test_sighup_rotates_the_journal_end_to_end(server):
    """twistd cserver: messages, rename the journal, SIGHUP, more messages: the old file ends
    where the new one begins (with a reopen record), seq is contiguous across both, every
    acked message is in one of them, STATS total counts all; after a restart seq and total
    continue."""
    process = server()
    journal = process.journal
    client = process.connect()
    client.request("AUTH alice")
    acked = {}
    for i in range(5):
        reply = client.request(f"MSG before {i}")
        acked[int(reply[3:])] = f"before {i}"
    os.rename(journal, journal + ".1")
    process.process.send_signal(signal.SIGHUP)
    assert process.wait_for("reopened at seq", 10)
    for i in range(5):
        reply = client.request(f"MSG after {i}")
        assert reply.startswith("OK "), reply
        acked[int(reply[3:])] = f"after {i}"
    assert client.stats()["total"] == "10"
    client.close()
    assert process.stop() == 0
    old, new = read_journal(journal + ".1"), read_journal(journal)
    assert new[0]["event"] == "reopen"
    assert new[0]["previous"] == os.path.realpath(journal + ".1")
    assert new[0]["previous_last_seq"] == old[-1]["seq"]
    assert new[0]["total"] == 5
    records = old + new
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
    journaled = {r["seq"]: r["text"] for r in records if r["event"] == "message"}
    assert journaled == acked
    restarted = server(journal=journal)
    client = restarted.connect()
    client.request("AUTH bob")
    assert client.request("MSG restarted") == f"OK {records[-1]['seq'] + 2}"
    stats = client.stats()
    assert (stats["total"], stats["user_total"]) == ("11", "1")
    client.close()
    assert restarted.stop() == 0
    assert read_journal(journal)[-1]["total"] == 11


@pytest.mark.skipif(shutil.which("logrotate") is None, reason="needs logrotate")
def test_the_shipped_logrotate_config_rotates_a_running_server(server, tmp_path):
    """contrib/logrotate/cserver (its path and postrotate command pointed at this server)
    renames the journal and signals the server, which goes on in a new file that continues
    the seq."""
    process = server()
    client = process.connect()
    client.request("AUTH alice")
    assert client.request("MSG before") == "OK 2"
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with open(os.path.join(here, "contrib", "logrotate", "cserver")) as f:
        config = f.read()
    assert "copytruncate\n" not in config.replace("nocopytruncate", "")
    config = config.replace("/var/lib/cserver/cserver.jsonl", process.journal)
    config = config.replace("systemctl reload cserver.service",
                            f"kill -HUP {process.process.pid}")
    (tmp_path / "logrotate.conf").write_text(config)
    subprocess.run(["logrotate", "-f", "-s", str(tmp_path / "state"),
                    str(tmp_path / "logrotate.conf")], check=True, timeout=30)
    assert process.wait_for("reopened at seq 3", 10)
    assert client.request("MSG after") == "OK 4"
    client.close()
    assert process.stop() == 0
    (rotated,) = glob.glob(process.journal + "-*")
    assert [r["seq"] for r in read_journal(rotated)] == [1, 2]
    new = read_journal(process.journal)
    assert [r["seq"] for r in new] == [3, 4, 5]
    assert new[0]["previous"] == os.path.realpath(rotated)


def test_workers_parent_ignores_sighup(server):
    """With --workers, SIGHUP is logged and ignored: the journal is not reopened, the server
    keeps serving into the same file."""
    process = server("--workers", "2")
    client = process.connect()
    inode = os.stat(process.journal).st_ino
    process.process.send_signal(signal.SIGHUP)
    assert process.wait_for("received SIGHUP: ignored", 10)
    assert client.request("AUTH alice") == "OK alice"
    assert client.request("MSG after hup").startswith("OK ")
    client.close()
    assert process.stop() == 0
    assert os.stat(process.journal).st_ino == inode
    assert not any(r["event"] == "reopen" for r in read_journal(process.journal))
