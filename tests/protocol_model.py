"""A reference model of the protocol, and the checks of the real one against it.

Shared by the hypothesis tests (tests/unit/test_fuzz.py) and the atheris harness
(fuzz/fuzz_protocol.py): connections to one factory (an in-memory journal on a
``task.Clock``, the allow-list portal) are fed byte chunks, with journal
flushes -- some of them failing -- in between, and a small model of
docs/protocol.rst predicts, line by line, what each connection must be
answered.  :class:`Run` compares the replies and the journal with it.

Imports nothing but Twisted, cserver and tests/common.py (no test framework),
so that the fuzz harness can import it.
"""

import errno
import re

from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher

from cserver import __version__
from cserver.dedup import KEY
from cserver.server import Limits

from .common import make_factory

USERS = ("alice", "bob")
MAX_LINE = 100
#: Journal turns: none, a flush that succeeds, fails to write, fails to sync.
TURNS = (None, None, "ok", "ok", "write", "sync")
_VERBS = {b"MSG", b"PUT", b"AUTH", b"STATS", b"QUIT"}
_REPLY = re.compile(rb"(HELLO cserver \S+( proto=\S+)?|OK( [^\n]*)?|ERR [a-z]+( [^\n]*)?)\r\n\Z")


class Slot:
    """A MSG (or a new PUT, with its ``key``) taken by the journal: its reply is
    OK <seq> or ERR unavailable."""

    def __init__(self, connection, text, key=None):
        self.connection = connection
        self.text = text
        self.key = key
        self.result = None


class Dup:
    """A PUT whose key was in the window with the same text: answered as the
    first (``slot``) was, OK <its seq> dup, or the same ERR unavailable."""

    def __init__(self, slot):
        self.slot = slot


class ModelConnection:
    """What docs/protocol.rst says one connection answers, line by line."""

    def __init__(self, model):
        self.model = model
        self.buffer = b""
        self.user = None
        self.failures = 0
        self.closed = False
        self.expected = []

    def feed(self, data):
        if self.closed:
            return
        self.buffer += data
        while not self.closed:
            end = self.buffer.find(b"\n")
            if end < 0:
                break
            raw, self.buffer = self.buffer[:end], self.buffer[end + 1:]
            if len(raw) > MAX_LINE:
                self._close(("ERR", "toolong"))
            else:
                self._line(raw)
        if not self.closed and len(self.buffer) > MAX_LINE:
            self._close(("ERR", "toolong"))

    def _close(self, reply):
        self.expected.append(reply)
        self.closed = True
        self.buffer = b""

    def _line(self, raw):
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        if not raw:
            return
        word, _, arg = raw.partition(b" ")
        verb = word.upper()
        if verb not in _VERBS:
            self.expected.append(("ERR", "encoding" if _undecodable(word) else "unknown"))
        elif verb == b"QUIT":
            self._close(("OK", "bye"))
        elif verb == b"STATS":
            self.expected.append(("STATS", self.user or "-"))
        elif verb == b"MSG":
            self._msg(arg)
        elif verb == b"PUT":
            self._put(arg)
        else:
            self._auth(arg)

    def _put(self, arg):
        key, _, text = arg.partition(b" ")
        if self.user is None:
            self.expected.append(("ERR", "noauth"))
        elif not KEY.fullmatch(key.decode("ascii", "replace")):
            self.expected.append(("ERR", "syntax"))
        elif _undecodable(text):
            self.expected.append(("ERR", "encoding"))
        elif not text:
            self.expected.append(("ERR", "syntax"))
        else:
            text, key = text.decode("utf-8"), key.decode("ascii")
            first = self.model.window.get((self.user, key))
            if first is None:
                slot = Slot(self, text, key)
                self.model.window[(self.user, key)] = slot
                self.expected.append(slot)
                self.model.take(slot)
            elif first.text != text:
                self.expected.append(("ERR", "conflict"))
            else:
                self.expected.append(Dup(first))

    def _msg(self, arg):
        if self.user is None:
            self.expected.append(("ERR", "noauth"))
        elif _undecodable(arg):
            self.expected.append(("ERR", "encoding"))
        elif not arg:
            self.expected.append(("ERR", "syntax"))
        else:
            slot = Slot(self, arg.decode("utf-8"))
            self.expected.append(slot)
            self.model.take(slot)

    def _auth(self, arg):
        if self.user is not None:
            self.expected.append(("ERR", "state"))
        elif _undecodable(arg):
            self.expected.append(("ERR", "encoding"))
        else:
            name = arg.decode("utf-8").partition(" ")[0]
            if not name:
                self.expected.append(("ERR", "syntax"))
            elif name in USERS:
                self.user = name
                self.expected.append(("OK", name))
            else:
                self.failures += 1
                if self.failures >= 3:
                    self._close(("ERR", "auth"))
                else:
                    self.expected.append(("ERR", "auth"))


class Model:
    """The connections, and the MSGs the journal holds, in the order taken."""

    def __init__(self, count):
        self.connections = [ModelConnection(self) for _ in range(count)]
        self.pending = []
        self.taken = []
        self.broken = False
        #: The PUT keys in the window: (user, key) -> the first Slot.
        self.window = {}

    def take(self, slot):
        self.taken.append(slot)
        if self.broken:
            self._refused(slot)
        else:
            self.pending.append(slot)

    def _refused(self, slot):
        slot.result = "unavailable"
        if slot.key is not None:  # a refused first PUT leaves the window
            self.window.pop((slot.connection.user, slot.key), None)

    def flush(self, failure):
        """A journal turn: its batch is written, or fails (``write``, ``sync``)."""
        for slot in self.pending:
            if failure is None:
                slot.result = "ok"
            else:
                self._refused(slot)
        if failure == "sync":
            self.broken = True
        self.pending = []


def _undecodable(data):
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def connect(factory, index):
    """A connection from its own host, so that AUTH throttling per host stays out of play."""
    address = IPv4Address("TCP", f"127.0.0.{index + 1}", 40000 + index)
    protocol = factory.buildProtocol(address)
    transport = StringTransport(peerAddress=address)
    protocol.makeConnection(transport)
    return protocol, transport


class Run:
    """The real protocol next to the model, fed the same chunks and flushes."""

    def __init__(self, count):
        self.factory = make_factory(users=USERS, limits=Limits(max_line=MAX_LINE))
        self.clock = self.factory.clock
        self.journal = self.factory.journal
        self.connections = [connect(self.factory, i) for i in range(count)]
        self.output = [b""] * count
        self.model = Model(count)
        self.failures = []

    def observe(self, event):
        if "log_failure" in event:
            self.failures.append(event["log_failure"])

    def feed(self, index, chunk):
        protocol, _transport = self.connections[index]
        protocol.dataReceived(chunk)
        self.model.connections[index].feed(chunk)

    def flush(self, failure=None):
        journal = self.journal
        journal.fail_writes = OSError(errno.ENOSPC, "No space") if failure == "write" else None
        journal.fail_syncs = OSError(errno.EIO, "I/O error") if failure == "sync" else None
        if failure is not None and journal.broken is None and not journal._bodies:
            failure = None  # nothing to write this turn, so nothing fails
        if journal.broken is not None:
            failure = "sync"
        self.clock.advance(0)
        journal.fail_writes = journal.fail_syncs = None
        self.model.flush(failure)

    def finish(self):
        """Flush what is owed, then check everything against the model."""
        self.flush()
        assert not self.failures, self.failures
        records = self.journal.records()
        assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
        by_seq = {r["seq"]: r for r in records if r["event"] == "message"}
        acked = {}
        self.dups = []
        for index, ((protocol, transport), expected) in enumerate(
            zip(self.connections, (c.expected for c in self.model.connections), strict=True)
        ):
            self._check_connection(index, transport, expected, by_seq, acked)
            assert transport.disconnecting == self.model.connections[index].closed
            protocol.connectionLost(None)
        # Every message record is one acked MSG of an authenticated connection.
        assert set(by_seq) == set(acked)
        # A duplicate PUT is told the seq its first was journaled at.
        for seq, slot in self.dups:
            assert acked.get(seq) is slot, (seq, slot.text)
        # The journal holds acked MSGs in the order the server took them.
        ok_slots = [slot for slot in self.model.taken if slot.result == "ok"]
        seq_of = {id(slot): seq for seq, slot in acked.items()}
        seqs = [seq_of[id(slot)] for slot in ok_slots]
        assert seqs == sorted(seqs)
        assert self.factory.connections == 0
        assert self.factory.inflight == 0

    def _check_connection(self, index, transport, expected, by_seq, acked):
        data = transport.value()
        assert data.endswith(b"\r\n"), data
        lines = [line + b"\r\n" for line in data.split(b"\r\n")[:-1]]
        for line in lines:
            assert _REPLY.match(line), line
        assert lines[0] == b"HELLO cserver %s proto=1.1\r\n" % (__version__.encode("ascii"),)
        actual = lines[1:]
        assert len(actual) == len(expected), (actual, expected)
        peer = f"127.0.0.{index + 1}:{40000 + index}"
        last_seq = 0
        for line, want in zip(actual, expected, strict=True):
            text = line[:-2].decode("utf-8", "replace")
            if isinstance(want, Dup):
                if want.slot.result == "ok":
                    match = re.fullmatch(r"OK (\d+) dup", text)
                    assert match, (text, want.slot.text)
                    self.dups.append((int(match.group(1)), want.slot))
                else:
                    assert text.startswith("ERR unavailable "), (text, want.slot.result)
            elif isinstance(want, Slot):
                if want.result == "ok":
                    match = re.fullmatch(r"OK (\d+)", text)
                    assert match, (text, want.text)
                    seq = int(match.group(1))
                    assert seq > last_seq, "replies out of order"
                    last_seq = seq
                    record = by_seq.get(seq)
                    assert record is not None, f"OK {seq} but no such message record"
                    user = self.model.connections[index].user
                    assert (record["text"], record["user"], record["peer"],
                            record.get("key")) == (want.text, user, peer, want.key)
                    acked[seq] = want
                else:
                    assert text.startswith("ERR unavailable "), (text, want.result)
            elif want[0] == "STATS":
                assert text.startswith("OK "), text
                fields = dict(item.split("=", 1) for item in text[3:].split(" "))
                assert fields["user"] == want[1]
            else:
                assert text.split(" ")[:2] == list(want), (text, want)


def play(count, steps):
    """
    Feed ``count`` connections the ``(index, chunk, turn)`` steps -- ``chunk``
    to connection ``index``, then the journal turn ``turn`` (one of
    :data:`TURNS`) -- then check the replies and the journal against the
    model; an ``AssertionError`` says what differs.  A failure logged on the
    way (an exception the protocol or a Deferred swallowed) fails the check.
    """
    run = Run(count)
    globalLogPublisher.addObserver(run.observe)
    try:
        for index, chunk, turn in steps:
            run.feed(index, chunk)
            if turn is not None:
                run.flush(None if turn == "ok" else turn)
        run.finish()
    finally:
        globalLogPublisher.removeObserver(run.observe)
