"""Tests for cserver.journal_cli (``cserver-journal``): verify, tail, text
and stats on journals written by the real FileJournal (fsync=never, on a
task.Clock), through ``main(argv)``.

Unit layer: journals in a temporary directory, the tool run in this process
(through ``python -m`` it is in tests/e2e/test_journal_cli.py).
"""

import json
import os
import pathlib
import re
import time
from io import BytesIO, StringIO

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from cserver.journal import EVENT, FIELDS, FileJournal
from cserver.journal import cli as journal_cli
from cserver.journal.recovery import Recovery, check, recover

from .base import Temporary

T0 = 1594053897.25  # 2020.07.06 16:44:57.250000000 UTC
PID = os.getpid()
NASTY = [
    "",
    'say "hi"',
    "back\\slash \\n \\u0041 \\",
    "tab\tnewline\nreturn\rformfeed\fbackspace\b",
    "nul\x00 and \x01\x1f\x7f and \x85 next-line",
    "zoë – ŝ ĉ 中文",
    "line\u2028separator\u2029paragraph",
    "emoji 😀🎉 and a ZWJ 👩‍👩‍👧",
    '{"seq":9,"time":1,"event":"message","pid":1,"user":"x","text":"y","peer":"z"}\n',
]


def message(user, text, when=T0, peer="127.0.0.1:5000"):
    return {EVENT: "message", "log_time": when, "user": user, "text": text, "peer": peer}


def record(kind, when=T0, **fields):
    return {EVENT: kind, FIELDS: fields, "log_time": when, **fields}


def write(path, events, last_seq=0):
    """
    Append ``events`` to the journal at ``path`` with a FileJournal, its
    seq continuing from ``last_seq`` when the file is new.
    """
    if last_seq:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        journal = FileJournal(path, fd, Recovery(last_seq=last_seq), Clock(), fsync="never")
    else:
        journal = FileJournal.open(path, Clock(), fsync="never")
    for event in events:
        journal(event)
    journal.close()


def lines(path):
    with open(path, "rb") as f:
        return f.read().split(b"\n")[:-1]


def run(*argv):
    """
    ``main(argv)``: (exit status, stdout bytes, stderr text).
    """
    out, err = BytesIO(), StringIO()
    status = journal_cli.main(list(argv), stdout=out, stderr=err)
    return status, out.getvalue(), err.getvalue()


def make_journal(directory):
    """
    A journal of 6 records: start, 3 messages (alice twice), an auth
    failure and a stop.
    """
    path = str(directory / "cserver.jsonl")
    write(path, [
        record("start", version="0.1.0", records=0, last_seq=0, messages=0, torn_bytes=0,
               torn_file=None),
        message("alice", "hello", T0 + 1),
        message("bob", "hi", T0 + 2),
        message("alice", "again", T0 + 3),
        record("auth_failed", T0 + 4, user="mallory", peer="10.0.0.1:4000"),
        record("stop", T0 + 5, served=3, total=3),
    ])
    return path


def unescape(quoted):
    """
    The text of a C-style quoted string as ``text`` writes it.
    """
    assert quoted[0] == quoted[-1] == '"'
    simple = {"n": "\n", "r": "\r", "t": "\t", '"': '"', "\\": "\\"}

    def one(match):
        code = match.group(1)
        return simple[code] if code in simple else chr(int(code[1:], 16))

    return re.sub(r"\\(x[0-9a-f]{2}|u[0-9a-f]{4}|.)", one, quoted[1:-1])


class CliCase(Temporary):
    """
    ``self.directory``, a new empty directory (pathlib.Path), and
    ``self.six_records()``, the journal of six records made in it.
    """

    def setUp(self):
        super().setUp()
        self.directory = pathlib.Path(self.temp_dir())

    def six_records(self):
        """The path of a new journal of six records in ``self.directory``: see
        :func:`make_journal`."""
        return make_journal(self.directory)


class VerifyTests(CliCase, SynchronousTestCase):
    """``verify``: a journal valid, damaged, torn, missing; and usage errors."""

    def test_verify_ok(self):
        """
        A valid journal: exit status 0 and one line with the record and message
        counts, the seq range and the size.
        """
        journal = self.six_records()
        status, out, err = run("verify", journal)
        assert (status, err) == (0, "")
        size = os.path.getsize(journal)
        assert out == f"{journal}: OK, 6 records (3 messages), seq 1-6, {size} bytes\n".encode()

    def test_verify_empty(self):
        """
        An empty journal (as a first start leaves it) is valid.
        """
        path = str(self.directory / "j.jsonl")
        write(path, [])
        assert run("verify", path) == (
            0, f"{path}: OK, 0 records (0 messages), 0 bytes\n".encode(), "")

    def test_verify_seq_continuing_from_rotation(self):
        """
        A journal whose first seq is not 1 (the file after a rotation) is valid,
        and its seq range says where it starts.
        """
        path = str(self.directory / "j.jsonl")
        write(path, [message("alice", "a"), message("bob", "b")], last_seq=41)
        status, out, _err = run("verify", path)
        assert status == 0
        assert b"2 records (2 messages), seq 42-43," in out

    def test_verify_damaged_mid_file(self):
        """
        A garbage line before valid records: exit status 1 and the byte offset
        where the damaged line starts; the file is left as it is.
        """
        journal = self.six_records()
        data = lines(journal)
        data[2] = b"x" * len(data[2])
        damaged = b"\n".join(data) + b"\n"
        with open(journal, "wb") as f:
            f.write(damaged)
        offset = len(data[0]) + len(data[1]) + 2
        status, out, err = run("verify", journal)
        assert (status, out) == (1, b"")
        assert err.startswith(f"{journal}: damaged at byte {offset}: not a valid record: b'xxx")
        with open(journal, "rb") as f:
            assert f.read() == damaged

    def test_verify_seq_gap(self):
        """
        A missing record is damage: the offset of the record whose seq is not
        the expected one.
        """
        journal = self.six_records()
        data = lines(journal)
        del data[1]
        with open(journal, "wb") as f:
            f.write(b"\n".join(data) + b"\n")
        status, _out, err = run("verify", journal)
        assert status == 1
        assert err == (f"{journal}: damaged at byte {len(data[0]) + 1}: "
                       "seq 3 where 2 was expected\n")

    def test_verify_torn_tail(self):
        """
        A record cut short at the end is a problem (exit status 1) reported as a
        torn tail with its size and offset; unlike recovery, verify cuts nothing
        and writes no side file.
        """
        journal = self.six_records()
        size = os.path.getsize(journal)
        with open(journal, "ab") as f:
            f.write(b'{"seq":7,"time":15')
        status, out, err = run("verify", journal)
        assert (status, out) == (1, b"")
        assert err.startswith(f"{journal}: torn tail of 18 bytes at byte {size}, after 6 records")
        assert os.path.getsize(journal) == size + 18
        assert os.listdir(os.path.dirname(journal)) == ["cserver.jsonl"]

    def test_check_agrees_with_recover(self):
        """
        recovery.check finds what recover finds, torn tail included, and leaves
        the file alone; recover then cuts the same bytes.
        """
        journal = self.six_records()
        with open(journal, "ab") as f:
            f.write(b"\x00\x00\x00")
        checked = check(journal)
        assert os.path.getsize(journal) == checked.size + 3
        recovered = recover(journal)
        assert (checked.records, checked.last_seq, checked.messages, checked.users,
                checked.size, checked.torn_bytes, checked.torn_path) == (
            recovered.records, recovered.last_seq, recovered.messages, recovered.users,
            recovered.size, recovered.torn_bytes, None)

    def test_verify_missing_file(self):
        """
        A missing journal is an I/O error: exit status 2 and a message.
        """
        path = str(self.directory / "nope.jsonl")
        status, out, err = run("verify", path)
        assert (status, out) == (2, b"")
        assert err == f"cserver-journal: cannot read {path}: No such file or directory\n"

    def test_usage_error(self):
        """
        No subcommand is a usage error: exit status 2.
        """
        with self.assertRaises(SystemExit) as raised:
            journal_cli.main([], stderr=StringIO())
        assert raised.exception.code == 2


class TailTests(CliCase, SynchronousTestCase):
    """``tail``: the last records, and ``-f`` following appends and rotations."""

    def test_tail_last_records(self):
        """
        ``tail -n 2`` prints the last two records exactly as they are in the
        file; ``-n 0`` prints nothing; more than there are prints them all.
        """
        journal = self.six_records()
        data = lines(journal)
        assert run("tail", "-n", "2", journal) == (0, b"\n".join(data[-2:]) + b"\n", "")
        assert run("tail", "-n", "0", journal) == (0, b"", "")
        assert run("tail", "-n", "100", journal) == (0, b"\n".join(data) + b"\n", "")

    def test_tail_default_and_long_file(self):
        """
        By default the last 10 records; the file is read from its end in
        blocks, so records spanning block boundaries come out whole.
        """
        path = str(self.directory / "j.jsonl")
        write(path, [message("alice", f"{n} " + "y" * 3000) for n in range(100)])
        status, out, _err = run("tail", path)
        assert status == 0
        assert out.split(b"\n")[:-1] == lines(path)[-10:]
        tail, end = journal_cli.last_lines(open(path, "rb"), 50, block=1000)
        assert [line[:-1] for line in tail] == lines(path)[-50:]
        assert end == os.path.getsize(path)

    def test_tail_leaves_out_partial_line(self):
        """
        A record still being written (no newline yet) is not printed.
        """
        journal = self.six_records()
        last = lines(journal)[-1]
        with open(journal, "ab") as f:
            f.write(b'{"seq":7,')
        assert run("tail", "-n", "1", journal) == (0, last + b"\n", "")

    def test_follow_appends_and_rotation(self):
        """
        ``tail -f`` prints records appended while it polls, a record completed
        across two polls once whole, and, when the journal is rotated (renamed,
        a new file created at the path), the rest of the old file and then the
        new file from its start.
        """
        journal = self.six_records()
        rotated = journal + ".1"
        new = []

        def step_1():
            write(journal, [message("carol", "appended")])
            with open(journal, "ab") as f:
                f.write(b'{"seq":8,"time":1,"event":"x",')

        def step_2():
            with open(journal, "ab") as f:
                f.write(b'"pid":1}\n')

        def step_3():
            os.rename(journal, rotated)
            with open(rotated, "ab") as f:
                f.write(b'{"seq":9,"time":1,"event":"x","pid":1}\n')

        def step_4():
            write(journal, [message("dave", "after rotation")], last_seq=9)
            new.extend(lines(journal))

        steps = [step_1, step_2, lambda: None, step_3, lambda: None, step_4]
        now = [0.0]

        def sleep(seconds):
            if steps:
                steps.pop(0)()
            now[0] += seconds

        f = open(journal, "rb")
        f.seek(0, os.SEEK_END)
        out = BytesIO()
        journal_cli.follow(journal, f, out, interval=1, seconds=10, sleep=sleep,
                           clock=lambda: now[0])
        assert f.closed
        assert out.getvalue().split(b"\n")[:-1] == lines(rotated)[6:] + new
        assert len(out.getvalue().split(b"\n")[:-1]) == 4
        assert b"after rotation" in out.getvalue()
        assert now[0] == 10

    def test_follow_bounded_by_for(self):
        """
        ``tail -f --for S`` through main prints the last records and returns 0
        after about S seconds.
        """
        journal = self.six_records()
        start = time.monotonic()
        status, out, _err = run("tail", "-n", "1", "-f", "--for", "0.3", "--interval", "0.05",
                                journal)
        assert status == 0
        assert out == lines(journal)[-1] + b"\n"
        assert 0.3 <= time.monotonic() - start < 3


class TextTests(CliCase, SynchronousTestCase):
    """``text``: one line per record in the C original's format."""

    def test_text_each_event_kind(self):
        """
        One line per record in the C original's format, in UTC with --utc:
        message, auth_failed, and start/stop/totals and any other kind as the
        verb and its fields.
        """
        journal = self.six_records()
        write(journal, [
            record("totals", T0 + 6, total=3, served=3, connections=1, inflight=0,
                   auth_failures=1, workers=2),
            record("reopened", T0 + 7.5, previous="cserver.jsonl.1", ratio=0.5),
        ])
        status, out, err = run("text", "--utc", journal)
        assert (status, err) == (0, "")
        assert out.decode().splitlines() == [
            f'2020.07.06 16:44:57.250000000 -- server {PID} started version="0.1.0" records=0 '
            "last_seq=0 messages=0 torn_bytes=0 torn_file=null",
            f'2020.07.06 16:44:58.250000000 -- server {PID} recvd message "hello" from user alice',
            f'2020.07.06 16:44:59.250000000 -- server {PID} recvd message "hi" from user bob',
            f'2020.07.06 16:45:00.250000000 -- server {PID} recvd message "again" from user alice',
            f"2020.07.06 16:45:01.250000000 -- server {PID} auth failed for user mallory "
            "from 10.0.0.1:4000",
            f"2020.07.06 16:45:02.250000000 -- server {PID} stopped served=3 total=3",
            f"2020.07.06 16:45:03.250000000 -- server {PID} totals total=3 served=3 connections=1 "
            "inflight=0 auth_failures=1 workers=2",
            f'2020.07.06 16:45:04.750000000 -- server {PID} reopened previous="cserver.jsonl.1" '
            "ratio=0.5",
        ]

    def test_text_time_digits_as_written(self):
        """
        The nanoseconds come from the time's digits in the file, not through a
        float: the C original's example line, exactly.
        """
        path = str(self.directory / "j.jsonl")
        write(path, [message("arijort", "lalala", 1594053897.2708236)])
        assert b'"time":1594053897.2708237,' in lines(path)[0]
        assert run("text", "--utc", path)[1] == (
            f'2020.07.06 16:44:57.270823700 -- server {PID} recvd message "lalala" '
            "from user arijort\n"
        ).encode()

    def test_text_local_time_by_default(self):
        """
        Without --utc, times are local (here TZ=Asia/Kolkata, UTC+05:30).
        """
        journal = self.six_records()
        old = os.environ.get("TZ")
        os.environ["TZ"] = "Asia/Kolkata"
        time.tzset()
        try:
            out = run("text", journal)[1]
        finally:
            if old is None:
                del os.environ["TZ"]
            else:
                os.environ["TZ"] = old
            time.tzset()
        assert out.startswith(b"2020.07.06 22:14:57.250000000 -- server ")

    def test_text_nasty_texts_stay_one_line(self):
        """
        Quotes, backslashes, newlines, controls and line separators are
        escaped, so each record is one line (for grep and for
        splitlines) and the text reads back exactly; other Unicode is kept.
        Names with spaces or quotes are quoted too.
        """
        path = str(self.directory / "j.jsonl")
        write(path, [message("zoë", text) for text in NASTY]
              + [message('o"dd user', "x", peer="a b"),
                 record("auth_failed", user="new\nline", peer="1.2.3.4:5")])
        status, out, _err = run("text", "--utc", path)
        assert status == 0
        text = out.decode("utf-8")
        rows = text.splitlines()
        assert len(rows) == len(NASTY) + 2 == text.count("\n")
        for row, expected in zip(rows, NASTY, strict=False):
            match = re.fullmatch(r'.* -- server \d+ recvd message (".*") from user zoë', row)
            assert unescape(match.group(1)) == expected
        assert "中文" in text and "😀🎉" in text
        assert rows[-2].endswith(r'recvd message "x" from user "o\"dd user"')
        assert rows[-1].endswith(r'auth failed for user "new\nline" from 1.2.3.4:5')

    def test_text_lone_surrogate(self):
        """
        A lone surrogate (valid as a JSON escape, though the server never
        writes one) is printed escaped rather than breaking the UTF-8 output.
        """
        path = str(self.directory / "j.jsonl")
        with open(path, "wb") as f:
            f.write(b'{"seq":1,"time":1.5,"event":"message","pid":7,"user":"u",'
                    b'"text":"a\\ud800b","peer":"p"}\n')
        assert run("verify", path)[0] == 0
        assert run("text", "--utc", path)[1] == (
            b'1970.01.01 00:00:01.500000000 -- server 7 recvd message "a\\ud800b" from user u\n'
        )

    def test_text_reports_bad_lines(self):
        """
        A line that is not a record is reported with its byte offset (exit
        status 1); the records around it are still printed.
        """
        journal = self.six_records()
        data = lines(journal)
        data.insert(2, b"garbage")
        with open(journal, "wb") as f:
            f.write(b"\n".join(data) + b"\n" + b'{"seq":8')
        status, out, err = run("text", journal)
        assert status == 1
        assert len(out.splitlines()) == 6
        offset = len(data[0]) + len(data[1]) + 2
        torn = sum(len(line) + 1 for line in data)
        assert err.splitlines() == [
            f"{journal}: not a valid record at byte {offset}: not JSON",
            f"{journal}: not a valid record at byte {torn}: no newline at the end (a torn tail)",
        ]


class StatsTests(CliCase, SynchronousTestCase):
    """``stats``: the figures of a journal, as JSON and for a person."""

    def test_stats_json(self):
        """
        ``stats --json``: one object with records, seq range, first and last
        time, records per event kind and messages per user, most first.
        """
        journal = self.six_records()
        status, out, _err = run("stats", "--json", journal)
        assert status == 0
        assert json.loads(out) == {
            "path": journal,
            "bytes": os.path.getsize(journal),
            "records": 6,
            "first_seq": 1,
            "last_seq": 6,
            "first_time": T0,
            "last_time": T0 + 5,
            "events": {"message": 3, "auth_failed": 1, "start": 1, "stop": 1},
            "messages": 3,
            "users": {"alice": 2, "bob": 1},
            "torn_bytes": 0,
        }
        assert list(json.loads(out)["users"]) == ["alice", "bob"]

    def test_stats_text(self):
        """
        ``stats`` prints the same figures for a person, times in the journal's
        time format.
        """
        journal = self.six_records()
        status, out, _err = run("stats", "--utc", journal)
        assert status == 0
        assert out.decode().splitlines() == [
            f"{journal}: 6 records, {os.path.getsize(journal)} bytes",
            "seq: 1-6",
            "first: 2020.07.06 16:44:57.250000000",
            "last: 2020.07.06 16:45:02.250000000",
            "events:",
            "           3  message",
            "           1  auth_failed",
            "           1  start",
            "           1  stop",
            "messages per user (2 users):",
            "           2  alice",
            "           1  bob",
        ]

    def test_stats_many_records_and_users(self):
        """
        Counts over a journal written in several batches agree with the
        records; users are sorted by count, then by name; a message text that
        looks like another event's record is not counted as one.
        """
        path = str(self.directory / "j.jsonl")
        fake = '{"seq":1,"time":1,"event":"stop","pid":1}'
        events = [message(["ann", "bo", "cy"][n % 3] if n % 5 else "zed", fake, T0 + n)
                  for n in range(1000)]
        write(path, events[:500])
        write(path, events[500:] + [record("stop", T0 + 2000, served=1000, total=1000)])
        report = journal_cli.stats(path)
        assert report["records"] == 1001
        assert report["events"] == {"message": 1000, "stop": 1}
        assert report["users"] == {"ann": 267, "bo": 267, "cy": 266, "zed": 200}
        assert (report["first_time"], report["last_time"]) == (T0, T0 + 2000)

    def test_stats_torn_and_damaged(self):
        """
        A torn tail is reported and not counted (exit status 0); damage before
        the end makes stats fail with the offset (exit status 1).
        """
        journal = self.six_records()
        with open(journal, "ab") as f:
            f.write(b"{")
        status, out, _err = run("stats", "--json", journal)
        assert status == 0
        assert (json.loads(out)["records"], json.loads(out)["torn_bytes"]) == (6, 1)
        with open(journal, "r+b") as f:
            f.write(b"X")
        status, out, err = run("stats", journal)
        assert (status, out) == (1, b"")
        assert err.startswith(f"{journal}: damaged at byte 0: ")
