"""Tests for cserver.journal.recovery: counting a journal, cutting a torn tail to a side
file, and refusing a journal damaged before its end, on real files.

Unit layer: journals in temporary directories."""

import json
import os
import pathlib
import tempfile
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from cserver.journal import EVENT, FIELDS, FileJournal
from cserver.journal.recovery import CHUNK, JournalDamaged, Recovery, recover
from cserver.testing import MemoryJournal

from .base import JournalCase
from .test_journal import Cases

HEAD = ("seq", "time", "event", "pid")


ODD_NAMES = ['q"uote', "back\\slash", "zoë", "😀", "tab\tname", "nul\x00", "a\u2028b", "\\u0041"]


def line(seq, event="message", **fields):
    """
    One record as the journal writes it: compact JSON, the head first,
    non-ASCII as UTF-8, LF-terminated.
    """
    record = {"seq": seq, "time": 1700000000.5, "event": event, "pid": 4242}
    if event == "message":
        record.update(user="alice", text="hello", peer="tcp:127.0.0.1:40000")
    record.update(fields)
    return (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode()


def lines(first, last, **fields):
    """Message records ``first`` .. ``last``, as bytes."""
    return b"".join(line(seq, **fields) for seq in range(first, last + 1))


def write(path, data):
    with open(path, "wb") as f:
        f.write(data)


def read(path):
    with open(path, "rb") as f:
        return f.read()


def others(path):
    """The files next to the journal at ``path``, other than itself."""
    directory, name = os.path.split(path)
    return sorted(entry for entry in os.listdir(directory) if entry != name)


_names = st.text(st.characters(codec="utf-8"), max_size=8)


_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(st.characters(codec="utf-8"), max_size=10),
)


# Tails after the last valid record that hold no valid record, by name.
TAILS = {
    "zeros": b"\x00" * 4096,
    "garbage-line": b"garbage\n",
    "garbage-lines": b"garbage\nmore garbage\n{\n",
    "empty-line": b"\n",
    "empty-lines": b"\n\n\n",
    "cut-then-newline": b'{"seq":3,"time":1.5,"event":"mess\n',
    "short-record-then-zeros": b'{"seq":3,"time":1.5}\n\x00\x00',
    "no-newline": line(3)[:-1],
    "cut-then-zeros": line(3)[:40] + b"\x00" * 100,
}


def _bad_utf8(seq):
    return line(seq, text="XY").replace(b'"XY"', b'"\xff\xfe"')


R1, R2, R3, R4 = line(1), line(2, user="bob"), line(3), line(4)


DAMAGED = {
    "garbage-line": (R1 + b"garbage\n" + R2, len(R1), "not a valid record"),
    "truncated-line": (R1 + R2[:25] + b"\n" + R3, len(R1), "not a valid record"),
    "truncated-line-glued": (R1 + R2[:25] + R3 + R4, len(R1), "not a valid record"),
    "empty-line": (R1 + b"\n" + R2, len(R1), "not a valid record"),
    "zeros-line": (R1 + b"\x00" * 10 + b"\n" + R2, len(R1), "not a valid record"),
    "crlf": (R1[:-1] + b"\r\n" + R2, 0, "not a valid record"),
    "seq-zero": (line(0) + R1, 0, "not a valid record"),
    "bad-json": (R1 + R2.replace(b'"user":', b'"user";') + R3, len(R1), "not a valid record"),
    "no-time": (R1 + R2.replace(b'"time":', b'"when":') + R3, len(R1), "not a valid record"),
    "seq-a-string": (R1 + R2.replace(b'"seq":2', b'"seq":"2"') + R3, len(R1),
                     "not a valid record"),
    "event-not-a-name": (R1 + R2.replace(b'"event":"message"', b'"event":"Message!"') + R3,
                         len(R1), "not a valid record"),
    "pid-negative": (R1 + R2.replace(b'"pid":', b'"pid":-') + R3, len(R1), "not a valid record"),
    "seq-gap": (R1 + R2 + R4, len(R1 + R2), "seq 4 where 3 was expected"),
    "duplicate-seq": (R1 + R2 + R2, len(R1 + R2), "seq 2 where 3 was expected"),
    "seq-backwards": (R1 + R2 + R3 + R2, len(R1 + R2 + R3), "seq 2 where 4 was expected"),
    "invalid-utf8": (R1 + _bad_utf8(2) + R3, len(R1), "not a valid record"),
    "damage-then-torn": (R1 + b"junk\n" + R2 + R3[:10], len(R1), "not a valid record"),
}


def _varied(count):
    users = ["alice", "bob", "zoë", 'q"', "😀"]
    return b"".join(
        line(seq, user=users[seq % 5], text="x" * (seq % 97) + "é" * (seq % 7) + "\n" * (seq % 3))
        for seq in range(1, count + 1)
    )


class CountingTests(JournalCase, SynchronousTestCase):
    """Counting a journal: records, messages, users, last_seq; what is valid."""

    def test_missing_file_is_reported_created_and_not_made(self):
        """A journal that does not exist recovers as created=True with nothing in it; recover()
        itself creates nothing."""
        path = self.path
        assert recover(path) == Recovery(created=True)
        assert not os.path.exists(path)

    def test_empty_file_is_an_empty_journal(self):
        """An empty file is a valid journal with no records."""
        path = self.path
        write(path, b"")
        assert recover(path) == Recovery()
        assert read(path) == b""

    def test_counts_records_messages_and_users(self):
        """records counts every record, messages only message records, users messages per user
        (names with quotes, backslashes and non-ASCII included), last_seq the last seq."""
        path = self.path
        data = [line(1, "start", version="1.0", records=0, last_seq=0, torn_file=None)]
        users = ["alice", "bob", "alice", *ODD_NAMES, "zoë"]
        for user in users:
            data.append(line(len(data) + 1, user=user))
        data.append(line(len(data) + 1, "auth_failed", user="mallory", peer="tcp:1.2.3.4:5"))
        data.append(line(len(data) + 1, "stop", served=12, total=12))
        write(path, b"".join(data))
        result = recover(path)
        assert result == Recovery(
            created=False,
            size=len(b"".join(data)),
            records=len(data),
            last_seq=len(data),
            messages=len(users),
            users=dict(Counter(users)),
            torn_bytes=0,
            torn_path=None,
        )

    def test_record_like_text_is_not_counted(self):
        """A message whose text or user looks like records is one record of its own user."""
        path = self.path
        fake = line(7, user="mallory").decode() + line(8).decode()
        write(path, line(1, text=fake, user='x","user":"mallory'))
        result = recover(path)
        assert (result.records, result.last_seq, result.messages) == (1, 1, 1)
        assert result.users == {'x","user":"mallory': 1}

    def test_every_json_value_in_other_records_is_accepted(self):
        """Non-message records may carry strings, integers, floats, true, false and null."""
        path = self.path
        data = line(1, "start", a="s", b=-12, c=0.5, d=1e-07, e=-2.5e300, f=True, g=False,
                    h=None, i=10**30)
        write(path, data + line(2))
        result = recover(path)
        assert (result.records, result.messages, result.torn_bytes) == (2, 1, 0)

    def test_valid_journal_is_left_untouched(self):
        """Recovering a whole journal changes nothing on disk and makes no side file."""
        path = self.path
        data = lines(1, 50)
        write(path, data)
        stat = os.stat(path)
        result = recover(path)
        assert (result.records, result.size) == (50, len(data))
        assert read(path) == data
        assert os.stat(path).st_mtime_ns == stat.st_mtime_ns
        assert others(path) == []

    def test_a_rotated_journal_may_start_past_one(self):
        """A journal whose first record has seq > 1 (a rotated file) is accepted as it is."""
        path = self.path
        write(path, lines(1001, 1005))
        result = recover(path)
        assert (result.records, result.last_seq, result.messages) == (5, 1005, 5)
        assert recover(path, chunk_size=7) == result

    def test_records_written_by_file_journal_recover_exactly(self):
        """What a FileJournal wrote, over several batches, recovers to its exact figures."""
        path = self.path
        clock = Clock()
        journal = FileJournal.open(path, clock)
        journal({EVENT: "start", FIELDS: {"version": "1.0", "torn_file": None}, "log_time": 1.0})
        users = Counter()
        for batch in range(5):
            for i, user in enumerate(["alice", "bob", *ODD_NAMES]):
                if (batch + i) % 3:
                    journal({EVENT: "message", "log_time": 2.0, "user": user,
                             "text": f"m{batch}.{i} \"\\\n", "peer": "tcp:127.0.0.1:1"})
                    users[user] += 1
            journal({EVENT: "auth_failed", FIELDS: {"user": "eve", "peer": "p"}, "log_time": 3.0})
            clock.advance(0)
        journal({EVENT: "stop", FIELDS: {"served": 1, "total": 2}, "log_time": 4.0})
        journal.close()
        result = recover(path)
        assert result.last_seq == journal.last_seq == result.records
        assert result.messages == sum(users.values())
        assert result.users == dict(users)
        assert (result.size, result.torn_bytes) == (os.path.getsize(path), 0)

    @settings(max_examples=60, deadline=None)
    @given(st.lists(st.tuples(_names, st.text(st.characters(codec="utf-8"))), max_size=30))
    def test_any_messages_recover_to_their_counts(self, messages):
        """For any users and texts the journal writes, recovery counts exactly what was written."""
        clock = Clock()
        journal = MemoryJournal(clock)
        for user, text in messages:
            journal({EVENT: "message", "log_time": 1.5, "user": user, "text": text, "peer": "p"})
        clock.advance(0)
        with tempfile.TemporaryDirectory() as directory:
            path = os.path.join(directory, "journal.jsonl")
            write(path, journal.data)
            result = recover(path)
            small = recover(path, chunk_size=13)
        assert (result.records, result.last_seq, result.messages) == (len(messages),) * 3
        assert result.users == dict(Counter(user for user, _text in messages))
        assert (result.torn_bytes, result.size) == (0, len(journal.data))
        assert small == result

    @settings(max_examples=60, deadline=None)
    @given(
        st.lists(
            st.tuples(
                st.sampled_from(["start", "stop", "auth_failed"]),
                st.dictionaries(
                    st.text(st.characters(codec="utf-8"), max_size=6).filter(
                        lambda key: key not in HEAD
                    ),
                    _values,
                    max_size=5,
                ),
            ),
            min_size=1,
            max_size=10,
        )
    )
    def test_any_flat_fields_the_journal_writes_recover(self, records):
        """Every start, stop or auth_failed record with flat fields the journal writes is a
        valid record to recovery, not damage."""
        clock = Clock()
        journal = MemoryJournal(clock)
        for kind, fields in records:
            journal({EVENT: kind, FIELDS: fields, "log_time": 1.5})
        clock.advance(0)
        with tempfile.TemporaryDirectory() as directory:
            path = os.path.join(directory, "journal.jsonl")
            write(path, journal.data)
            result = recover(path)
        assert (result.records, result.last_seq, result.messages) == (
            len(records), len(records), 0)
        assert result.torn_bytes == 0

    def test_users_count_one_name_however_it_is_escaped(self):
        """A user written once as raw UTF-8 and once \\u-escaped (both valid JSON) counts twice."""
        path = self.path
        data = line(1, user="é") + line(2).replace(b'"user":"alice"', b'"user":"\\u00e9"')
        write(path, data)
        result = recover(path)
        assert result.messages == 2
        assert result.users == {"é": 2}


class TornTailTests(Cases, JournalCase, SynchronousTestCase):
    """A torn tail: cut off the journal and kept in a side file."""

    def test_a_torn_last_record_is_cut_at_every_byte(self):
        """Cut inside its last record at any byte (mid UTF-8 character included), a journal
        recovers to the records before it, the cut bytes saved to a side file, the journal
        truncated."""
        tmp_path = pathlib.Path(self.temp_dir())
        kept = lines(1, 2)
        last = line(3, user="é", text="ü😀", peer="p")
        for cut in range(1, len(last)):
            directory = tmp_path / f"cut{cut}"
            directory.mkdir()
            path = str(directory / "journal.jsonl")
            write(path, kept + last[:cut])
            result = recover(path)
            assert (result.records, result.last_seq, result.messages) == (2, 2, 2), cut
            assert (result.size, result.torn_bytes) == (len(kept), cut)
            assert os.path.dirname(result.torn_path) == str(directory)
            assert os.path.basename(result.torn_path).startswith("journal.jsonl.torn")
            assert read(result.torn_path) == last[:cut]
            assert read(path) == kept
            assert recover(path) == Recovery(size=len(kept), records=2, last_seq=2, messages=2,
                                             users={"alice": 2})

    def test_a_tail_holding_no_valid_record_is_torn(self):
        """Bytes after the last valid record that hold no valid record are cut to a side file."""
        for name, tail in TAILS.items():
            with self.case(name):
                path = self.temp_path()
                kept = lines(1, 2)
                write(path, kept + tail)
                result = recover(path)
                assert (result.records, result.last_seq, result.size) == (2, 2, len(kept))
                assert result.torn_bytes == len(tail)
                assert read(result.torn_path) == tail
                assert read(path) == kept

    def test_a_journal_of_only_a_torn_record_recovers_empty(self):
        """A journal holding nothing but the start of a record recovers to no records."""
        path = self.path
        write(path, line(1)[:30])
        result = recover(path)
        assert (result.records, result.last_seq, result.size, result.torn_bytes) == (0, 0, 0, 30)
        assert read(path) == b""

    def test_a_second_torn_tail_at_the_same_offset_gets_its_own_side_file(self):
        """Torn twice at the same offset, the journal's side files are distinct; neither is lost."""
        path = self.path
        kept = lines(1, 3)
        first_tail, second_tail = b'{"seq":4,"ti', b'{"seq":4,"time":17'
        write(path, kept + first_tail)
        first = recover(path)
        write(path, kept + second_tail)
        second = recover(path)
        write(path, kept + first_tail)
        third = recover(path)
        paths = {first.torn_path, second.torn_path, third.torn_path}
        assert len(paths) == 3
        assert read(first.torn_path) == first_tail
        assert read(second.torn_path) == second_tail
        assert read(third.torn_path) == first_tail
        assert others(path) == sorted(os.path.basename(p) for p in paths)

    def test_a_valid_record_after_damage_on_the_same_line_is_damage(self):
        """Zeros (or garbage) that swallowed a newline before a complete record are damage in
        the middle, not a torn tail: the start stops and the file is left untouched."""
        path = self.path
        data = lines(1, 2) + b"\x00" * 40 + line(3)
        write(path, data)
        with self.assertRaises(JournalDamaged) as caught:
            recover(path)
        assert caught.exception.offset == len(lines(1, 2))
        assert read(path) == data


class DamageTests(Cases, JournalCase, SynchronousTestCase):
    """Damage before the end: refused with its offset, the file untouched."""

    def test_damage_before_the_end_stops_with_its_offset_and_touches_nothing(self):
        """A damaged record followed by a valid one raises JournalDamaged naming the byte offset
        of the damage (whatever the chunk size); the file is left byte for byte as it was."""
        for case, (data, offset, why) in DAMAGED.items():
            for chunk_size in (CHUNK, 7, 64, 100):
                with self.case(f"{case}, chunk_size={chunk_size}"):
                    path = self.temp_path()
                    write(path, data)
                    with self.assertRaises(JournalDamaged) as caught:
                        recover(path, chunk_size=chunk_size)
                    error = caught.exception
                    assert (error.path, error.offset) == (path, offset)
                    assert why in error.why
                    assert read(path) == data
                    assert others(path) == []

    def test_damage_deep_in_a_large_journal_names_its_offset(self):
        """A seq gap after many records, past several chunks, is found at its exact offset."""
        path = self.path
        before = lines(1, 500)
        write(path, before + lines(502, 510))
        for chunk_size in (CHUNK, 4096, 333):
            with self.assertRaises(JournalDamaged) as caught:
                recover(path, chunk_size=chunk_size)
            assert caught.exception.offset == len(before)

    def test_a_record_in_another_json_spelling_is_a_record(self):
        """A line the server would have written more compactly -- spaces between tokens, its
        keys after seq in another order -- is still a valid record (the server writes only the
        compact form; recovery reads any JSON object with the four keys)."""
        path = self.path
        spaced = R2.replace(b'"user":', b'"user" : ').replace(b'"pid":', b'"pid": ')
        reordered = R3.replace(b'"time":', b'"x":').replace(b'"event":', b'"time":1.5,"event":')
        write(path, R1 + spaced + reordered)
        result = recover(path)
        assert (result.records, result.last_seq, result.messages) == (3, 3, 3)
        assert result.torn_bytes == 0

    def test_journal_damaged_message_names_path_offset_and_reassures(self):
        """The error reads: journal PATH is damaged at byte N: why; the file was left as it is."""
        path = self.path
        write(path, R1 + b"oops\n" + R2)
        with self.assertRaises(JournalDamaged) as caught:
            recover(path)
        message = str(caught.exception)
        assert message.startswith(f"journal {path} is damaged at byte {len(R1)}: ")
        assert "b'oops'" in message
        assert message.endswith("the file was left as it is")


class ChunkBoundaryTests(Cases, JournalCase, SynchronousTestCase):
    """Records across the boundaries of the chunks recovery reads."""

    def test_chunk_size_does_not_change_the_result(self):
        """Records of varied lengths counted with any chunk size give the default's result."""
        for chunk_size in (1, 7, 64, 100, 1000, 4096):
            with self.case(f"chunk_size={chunk_size}"):
                path = self.temp_path()
                write(path, _varied(400))
                expected = recover(path)
                assert expected.records == 400
                assert recover(path, chunk_size=chunk_size) == expected

    def test_chunk_size_does_not_change_a_torn_tail(self):
        """A torn tail is found and cut the same way with any chunk size."""
        for chunk_size in (7, 64, 100, 4096):
            with self.case(f"chunk_size={chunk_size}"):
                data = _varied(300)
                tail = line(301, text="long " * 50)[:-20]
                path = self.temp_path()
                write(path, data + tail)
                result = recover(path, chunk_size=chunk_size)
                assert (result.records, result.last_seq, result.size) == (300, 300, len(data))
                assert read(result.torn_path) == tail
                assert read(path) == data
