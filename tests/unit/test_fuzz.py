"""Unit tests (property-based) of the protocol state machine, without sockets.

Connections to one factory (an in-memory journal on a ``task.Clock``) are fed
byte streams cut into random chunks and interleaved at random, with journal
flushes -- some of them failing -- in between.  A small reference model of
docs/protocol.rst predicts, line by line, what each connection must be
answered; the tests compare the replies and the journal with it.  The model
and those checks are in tests/protocol_model.py, which the atheris harness
(fuzz/fuzz_protocol.py) shares.
"""

import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from cserver.auth import IUsername, UserRealm
from cserver.server import Limits

from ..common import make_factory
from ..protocol_model import MAX_LINE, TURNS, USERS, Model, connect, play

_FUZZ = settings(
    max_examples=int(os.environ.get("CSERVER_FUZZ_EXAMPLES", "200")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _lines():
    """Request lines: valid verbs, near-misses, junk, invalid UTF-8, long lines."""
    text = st.text(st.characters(blacklist_characters="\n", blacklist_categories=("Cs",)),
                   max_size=12)
    verb = st.sampled_from(["MSG", "msg", "Msg", "PUT", "put", "AUTH", "auth", "STATS",
                            "stats", "QUIT"])
    return st.one_of(
        st.tuples(st.just("msg"), st.sampled_from(["MSG", "msg"]), text),
        # PUTs of a few keys and texts: new, duplicates (the same key and
        # text again), conflicts (the same key, another text), bad keys.
        st.tuples(st.just("put"), st.sampled_from(["PUT", "put"]),
                  st.sampled_from(["k1", "k2", "a.b:c", "", "b!d", "k" * 129]),
                  st.sampled_from(["one", "two", "", "t w o"])),
        st.tuples(st.just("auth"), st.sampled_from(["AUTH", "auth"]),
                  st.sampled_from(["alice", "bob", "mallory", "", " alice", "alice pw"])),
        st.tuples(st.just("plain"), st.sampled_from(["STATS", "stats", "MSG", "MSG ", "AUTH",
                                                     "", "\r", "QUIT", "HELLO", "OK 1"])),
        st.tuples(st.just("raw"), verb, st.binary(max_size=16)),
        st.tuples(st.just("raw"), st.just(""), st.binary(max_size=24)),
        st.tuples(st.just("raw"), st.sampled_from(["MSG", "AUTH", ""]),
                  st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf4\x90\x80\x80",
                                   b"\x00", b"\x00\x00\r", b"a\rb", b"\xe2\x82"])),
        st.tuples(st.just("long"), st.sampled_from(["MSG", "AUTH", "X"]),
                  st.integers(MAX_LINE - 40, MAX_LINE + 8)),
    )


def _render(line, serial):
    """The bytes of one request line (no terminator); MSG texts are made distinct."""
    kind = line[0]
    if kind == "msg":
        return f"{line[1]} {line[2]}#{serial}".encode()
    if kind == "auth":
        return f"{line[1]} {line[2]}".encode()
    if kind == "put":
        return f"{line[1]} {line[2]} {line[3]}".encode()
    if kind == "plain":
        return line[1].encode()
    if kind == "raw":
        verb, body = line[1], line[2].replace(b"\n", b"")
        return (verb.encode() + b" " + body) if verb else body
    return line[1].encode() + b" " + b"x" * line[2]


@st.composite
def _streams(draw, max_connections=3):
    """Per connection: a byte stream of request lines, the last one maybe unfinished."""
    count = draw(st.integers(1, max_connections))
    streams = []
    serial = 0
    for _ in range(count):
        parts = []
        if draw(st.booleans()):
            parts.append(b"AUTH " + draw(st.sampled_from(USERS)).encode() + b"\n")
        for line in draw(st.lists(_lines(), max_size=25)):
            serial += 1
            parts.append(_render(line, serial) + draw(st.sampled_from([b"\n", b"\r\n"])))
        if draw(st.booleans()):
            parts.append(draw(st.binary(max_size=8)).replace(b"\n", b""))
        streams.append(b"".join(parts))
    return streams


def _chunks(draw, stream):
    """``stream`` cut at random places."""
    cuts = sorted(draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    edges = [0, *cuts, len(stream)]
    return [stream[a:b] for a, b in zip(edges, edges[1:], strict=False) if b > a]


def _play(data, streams):
    """Feed every chunk of every stream, interleaved at random, with journal turns."""
    queues = [_chunks(data.draw, stream) for stream in streams]

    def steps():
        while any(queues):
            index = data.draw(st.sampled_from([i for i, q in enumerate(queues) if q]))
            yield index, queues[index].pop(0), data.draw(st.sampled_from(TURNS))

    play(len(streams), steps())


class _SlowChecker:
    """A checker that answers when the test says so (a slow hash in a thread, say)."""

    credentialInterfaces = (IUsername,)

    def __init__(self):
        self.pending = []

    def requestAvatarId(self, credentials):
        d = Deferred()
        self.pending.append((d, credentials.username))
        return d


_PAUSED_TOOLONG = (
    "bug: while a connection is not being read (MSGs unanswered up to max_pending, "
    "an AUTH being checked, or replies unsent), CServerProtocol.dataReceived compares "
    "max_line with the whole unprocessed buffer -- complete lines included -- and "
    "answers ERR toolong to a client whose every line is short"
)


class ModelPropertyTests(SynchronousTestCase):
    """The protocol against the reference model, for generated inputs; and the model itself."""

    @_FUZZ
    @given(st.data(), _streams())
    def test_protocol_matches_the_model_for_any_chunking(self, data, streams):
        """For request streams mixing valid verbs, junk, CR/LF, invalid UTF-8 and
        over-long lines, cut into random chunks and interleaved over connections,
        with journal turns that succeed, fail to write or fail to sync: the
        protocol never raises or logs a failure, every reply is a well-formed
        CRLF-terminated HELLO/OK/ERR line, each connection gets exactly one reply
        per non-empty complete line until it is closed, in request order, as
        docs/protocol.rst says; the close happens when the model closes; every
        message record was acked to an authenticated connection with its user,
        text and peer, and seqs follow the order the MSGs were taken."""
        _play(data, streams)

    @_FUZZ
    @given(st.data(), st.lists(st.binary(max_size=300), min_size=1, max_size=3))
    def test_arbitrary_bytes_never_break_the_protocol(self, data, streams):
        """Arbitrary bytes (no structure at all), cut and interleaved at random:
        the protocol never raises, answers each non-empty line with a well-formed
        reply, and journals no message (no connection ever authenticates, short
        of a random 'AUTH alice')."""
        _play(data, streams)

    def test_model_agrees_on_a_known_conversation(self):
        """The reference model itself: a hand-checked conversation gives the replies
        docs/protocol.rst lists (so a wrong model cannot make the properties vacuous)."""
        model = Model(1)
        connection = model.connections[0]
        connection.feed(b"MSG early\nAUTH mallory\r\nAUTH alice\nAUTH bob\nMSG \nMSG hi\n"
                        b"\xff\nfoo\nSTATS\n\n\r\n" + b"x" * (MAX_LINE + 1))
        model.flush(None)
        replies = [w if isinstance(w, tuple) else ("MSG", w.result) for w in connection.expected]
        assert replies == [
            ("ERR", "noauth"), ("ERR", "auth"), ("OK", "alice"), ("ERR", "state"),
            ("ERR", "syntax"), ("MSG", "ok"), ("ERR", "encoding"), ("ERR", "unknown"),
            ("STATS", "alice"), ("ERR", "toolong"),
        ]
        assert connection.closed


class PausedReadingLineLengthTests(SynchronousTestCase):
    """Lines waiting while the connection is not read are not one over-long line."""

    def test_lines_waiting_while_msgs_are_unanswered_are_not_too_long(self):
        """With max_pending 2 and max_line 64, 20 pipelined 7-byte MSGs in one read
        are all acked: the connection stops being read after two, and the 18
        waiting lines are not one line over max_line."""
        factory = make_factory(users=USERS, limits=Limits(max_line=64, max_pending=2))
        protocol, transport = connect(factory, 0)
        protocol.dataReceived(b"AUTH alice\n" + b"".join(b"MSG m%02d\n" % i for i in range(20)))
        for _ in range(20):
            factory.clock.advance(0)
        lines = transport.value().split(b"\r\n")[:-1]
        assert lines[2:] == [b"OK %d" % seq for seq in range(1, 21)]

    def test_lines_waiting_while_auth_is_checked_are_not_too_long(self):
        """A checker that takes its time (as a slow password hash in a thread does):
        AUTH then 20 pipelined MSGs in one read, 160 bytes with max_line 64, are
        answered OK alice and 20 acks once the check succeeds."""
        checker = _SlowChecker()
        factory = make_factory(limits=Limits(max_line=64),
                               portal=Portal(UserRealm(), [checker]))
        protocol, transport = connect(factory, 0)
        protocol.dataReceived(b"AUTH alice\n" + b"".join(b"MSG m%02d\n" % i for i in range(20)))
        for d, name in checker.pending:
            d.callback(name)
        for _ in range(5):
            factory.clock.advance(0)
        lines = transport.value().split(b"\r\n")[:-1]
        assert lines[1:] == [b"OK alice"] + [b"OK %d" % seq for seq in range(1, 21)]
