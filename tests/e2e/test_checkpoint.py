"""A clean stop leaves the journal's checkpoint; the next start reads only what
follows it, and counts what a whole read counts.

End-to-end layer."""

import os
import re
import stat
from collections import Counter

from cserver.journal.checkpoint import path_for

from ..server_process import read_journal


def _send(process, user, count):
    client = process.connect()
    assert client.request(f"AUTH {user}") == f"OK {user}"
    for index in range(count):
        assert client.request(f"MSG {user} {index}").startswith("OK ")
    client.close()


def _user_totals(process, users):
    totals = {}
    for user in users:
        client = process.connect()
        client.request(f"AUTH {user}")
        stats = client.stats()
        totals[user] = int(stats["user_total"])
        total = int(stats["total"])
        client.close()
    return total, totals


def test_the_next_start_reads_from_the_checkpoint_and_counts_the_same(server):
    """SIGTERM leaves <journal>.checkpoint (0600) at the journal's end; the next
    server says it read from there, and STATS gives the total and per-user totals
    the journal holds.  After that server is killed (no checkpoint of its own),
    the third start reads from the first checkpoint on, through what the killed
    one wrote, and still counts every message."""
    first = server()
    _send(first, "alice", 30)
    _send(first, "bob", 20)
    assert first.stop() == 0
    checkpoint = path_for(first.journal)
    assert stat.S_IMODE(os.stat(checkpoint).st_mode) == 0o600
    size = os.path.getsize(first.journal)

    second = server(journal=first.journal)
    line = second.wait_for(re.compile(r"journal read from its checkpoint on, byte (\d+)"))
    assert int(re.search(r"byte (\d+)", line).group(1)) == size
    assert _user_totals(second, ["alice", "bob"]) == (50, {"alice": 30, "bob": 20})
    _send(second, "bob", 5)
    second.kill()

    third = server(journal=first.journal)
    line = third.wait_for(re.compile(r"journal read from its checkpoint on, byte (\d+)"))
    assert int(re.search(r"byte (\d+)", line).group(1)) == size
    messages = Counter(r["user"] for r in read_journal(first.journal) if r["event"] == "message")
    assert messages == {"alice": 30, "bob": 25}
    assert _user_totals(third, ["alice", "bob"]) == (55, {"alice": 30, "bob": 25})
    assert third.stop() == 0
