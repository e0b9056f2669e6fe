"""Unit tests for cserver.journal.stream_cli (``cserver-journal`` on a
``nats://`` stream): the check of each stream message, and verify, stats,
tail and export run through ``main(session)`` against a stand-in for a
JetStream server (tests/unit/test_nats_consumer.FakeClient answering the
stream and consumer API) on a task.Clock; usage and connection errors; the
dispatch from cserver.journal.cli.  No socket: the real cluster is in
tests/e2e/test_stream_cli.py."""

import argparse
import json
import os
from io import BytesIO, StringIO

from twisted.internet.defer import Deferred, ensureDeferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from cserver.journal import cli, stream_cli
from cserver.journal.record import message_body, numbered, record_body
from cserver.journal.stream_cli import Scan, Session
from cserver.journal.stream_url import parse_stream_url
from cserver.nats.wire import Msg, NoResponders, Refused

from .base import Temporary
from .test_nats_consumer import FakeClient

T0 = 1594053897.25
URL = "nats://127.0.0.1:4222/S"


def bodies():
    """Six record bodies: start, three messages (alice twice), an auth
    failure, a stop."""
    return [
        record_body(T0, "start", 7, {"version": "0.1.0"}, node="a"),
        message_body(T0 + 1, 7, "alice", "hello", "127.0.0.1:5000", node="a"),
        message_body(T0 + 2, 7, "bob", 'say "hi"\n', "127.0.0.1:5001", key="k1", node="a"),
        message_body(T0 + 3, 7, "alice", "zoë 😀", "127.0.0.1:5000", node="b"),
        record_body(T0 + 4, "auth_failed", 7, {"user": "mallory", "peer": "10.0.0.1:4000"}),
        record_body(T0 + 5, "stop", 7, {"served": 3}, node="a"),
    ]


class FakeStream(FakeClient):
    """
    A NATSClient stand-in with a JetStream stream ``S`` behind it: stream
    info, and ordered consumers that deliver each message after a tick of
    the clock (``step`` seconds apart) with its seqs and pending count, then
    what :meth:`append` adds while they follow.
    """

    def __init__(self, messages, step=0.0, info=None):
        super().__init__(MemoryReactorClock())
        self.messages = dict(messages)  # seq -> payload
        self.step = step
        self.info = info
        self.consumers = []
        self.answer = self._answer
        self.last_error = None
        self.ready = succeed(None)
        self.closed = False

    def start(self):
        return self.ready

    def close(self):
        self.closed = True
        return succeed(None)

    def state(self):
        seqs = sorted(self.messages)
        last = max(seqs, default=0)
        return {"messages": len(seqs), "bytes": sum(map(len, self.messages.values())),
                "first_seq": seqs[0] if seqs else last + 1, "last_seq": last}

    def _answer(self, subject, payload):
        if subject == "$JS.API.STREAM.INFO.S":
            info = self.info or {"config": {"name": "S", "storage": "file", "num_replicas": 3},
                                 "state": self.state(),
                                 "cluster": {"leader": "n1", "replicas": []}}
            return succeed(({}, json.dumps(info).encode()))
        if subject.startswith("$JS.API.STREAM.INFO."):
            return succeed(({}, b'{"error":{"code":404,"err_code":10059,'
                                b'"description":"stream not found"}}'))
        if subject == "$JS.API.CONSUMER.CREATE.S":
            config = json.loads(payload)["config"]
            consumer = {"name": f"C{len(self.consumers) + 1}", "config": config,
                        "next": config.get("opt_start_seq", 1), "cseq": 0}
            self.consumers.append(consumer)
            self._schedule(consumer)
            return succeed(({}, json.dumps({"name": consumer["name"]}).encode()))
        return succeed(({}, b'{"success":true}'))

    def _schedule(self, consumer, delay=0.0):
        self.reactor.callLater(delay, self._deliver, consumer)

    def _deliver(self, consumer):
        """Deliver the consumer's next message (if any), then the next."""
        seqs = [seq for seq in sorted(self.messages) if seq >= consumer["next"]]
        callback = next((cb for subject, cb in self.subscriptions.values()
                         if subject == consumer["config"]["deliver_subject"]), None)
        if not seqs or callback is None:
            return
        seq = seqs[0]
        consumer["next"], consumer["cseq"] = seq + 1, consumer["cseq"] + 1
        reply = f"$JS.ACK.S.{consumer['name']}.1.{seq}.{consumer['cseq']}.1.{len(seqs) - 1}"
        callback(Msg("cserver.S", reply, {"Nats-Msg-Id": str(seq)}, self.messages[seq]))
        self._schedule(consumer, self.step)

    def append(self, payload):
        """Store a new message; following consumers get it."""
        self.messages[max(self.messages, default=0) + 1] = payload
        for consumer in self.consumers:
            self._schedule(consumer)


def stream_of(payloads, **options):
    """A FakeStream of ``payloads`` at seqs 1, 2, 3..."""
    return FakeStream(enumerate(payloads, 1), **options)


class StreamCase(Temporary, SynchronousTestCase):
    def run_command(self, client, *argv, pump=60.0):
        """
        Run the command line ``argv`` on the stream of ``client`` through
        ``main(session)``, advancing the clock (up to ``pump`` seconds) until
        it ends: (exit status, stdout bytes, stderr text).
        """
        args = cli.parser().parse_args(list(argv))
        out, err = BytesIO(), StringIO()
        session = Session(args, parse_stream_url(args.path), out, err, client, client.reactor,
                          stats_text=cli.stats_text)
        self.session = session
        d = ensureDeferred(stream_cli.main(session))
        waited = 0.0
        while not d.called and waited < pump:
            client.reactor.advance(0.1)
            waited += 0.1
        return self.successResultOf(d), out.getvalue(), err.getvalue()

    def expected_lines(self, payloads, first=1):
        return b"".join(numbered(seq, body) for seq, body in enumerate(payloads, first))


class ScanTests(SynchronousTestCase):
    def test_counts_records_as_recovery_does(self):
        """Valid records are counted: records, first and last, events other
        than messages, and messages per user; each gives its journal line."""
        scan = Scan()
        lines = [scan.take(seq, body) for seq, body in enumerate(bodies(), 1)]
        self.assertEqual(lines, [numbered(seq, body) for seq, body in enumerate(bodies(), 1)])
        self.assertEqual((scan.records, scan.first.seq, scan.last.seq, scan.messages),
                         (6, 1, 6, 3))
        self.assertEqual(scan.users, {"alice": 2, "bob": 1})
        self.assertEqual(scan.events, {"start": 1, "auth_failed": 1, "stop": 1})
        self.assertEqual((scan.damage, scan.problems), (0, []))

    def test_payloads_that_are_not_records(self):
        """Not JSON, not an object, an object without the record's keys, two
        lines, a seq of its own, a carriage return, bad UTF-8: each is a bad
        message, by seq, and no line."""
        good = bodies()[1]
        bad = [b"", b"not json", b"[1,2]", b"{}", b'{"time":1}', good + b"\n" + good,
               b'{"seq":99,' + good[1:], good[:-1] + b',"x":"\r"}', good.replace(b"hello",
                                                                                 b"\xff")]
        scan = Scan()
        self.assertEqual([scan.take(seq, body) for seq, body in enumerate(bad, 1)],
                         [None] * len(bad))
        self.assertEqual([problem.split(":")[0] for problem in scan.problems],
                         [f"seq {seq}" for seq in range(1, len(bad) + 1)])
        self.assertEqual((scan.records, scan.damage), (0, len(bad)))
        self.assertEqual(scan.problems[1], "seq 2: not a valid record: b'not json'")
        self.assertEqual(scan.why, scan.problems[-1])

    def test_gaps(self):
        """Seqs skipped are a gap, one entry per run: ``seq 3-4 missing``."""
        scan = Scan(expected=1)
        for seq in (1, 2, 5, 7):
            scan.take(seq, bodies()[1])
        self.assertEqual(scan.problems, ["seq 3-4 missing (deleted from the stream)",
                                         "seq 6 missing (deleted from the stream)"])
        self.assertEqual((scan.damage, scan.records), (2, 4))

    def test_problems_kept_are_bounded(self):
        """Only the first MAX_PROBLEMS problems are kept as lines; all are
        counted."""
        scan = Scan()
        for seq in range(1, 1001):
            scan.take(seq, b"x")
        self.assertEqual((scan.damage, len(scan.problems)), (1000, stream_cli.MAX_PROBLEMS))


class VerifyTests(StreamCase):
    def test_verify_ok(self):
        """A stream of valid records: 0, and one line with the counts, the seq
        range, the bytes, the storage and the replicas."""
        client = stream_of(bodies())
        status, out, err = self.run_command(client, "verify", URL)
        self.assertEqual((status, err), (0, ""))
        size = sum(map(len, bodies()))
        self.assertEqual(out, f"{URL}: OK, 6 records (3 messages), seq 1-6, {size} bytes, "
                              "file storage, 3 replicas\n".encode())
        self.assertTrue(client.closed)

    def test_verify_empty_stream(self):
        """An empty stream is valid: 0 records, no consumer made."""
        client = stream_of([])
        status, out, _ = self.run_command(client, "verify", URL)
        self.assertEqual(status, 0)
        self.assertIn(b"OK, 0 records (0 messages), 0 bytes", out)
        self.assertEqual(client.consumers, [])

    def test_verify_from_a_later_first_seq(self):
        """A stream whose first messages are gone (first_seq 11) is valid from
        there on."""
        client = FakeStream({10 + seq: body for seq, body in enumerate(bodies(), 1)})
        status, out, _ = self.run_command(client, "verify", URL)
        self.assertEqual(status, 0)
        self.assertIn(b"seq 11-16", out)

    def test_verify_gap_is_damage(self):
        """Messages deleted inside the stream (or at its end) are damage: 1,
        one line per gap on stderr, with the seqs."""
        client = stream_of(bodies())
        del client.messages[3], client.messages[4]
        info_last = {"config": {"storage": "file", "num_replicas": 3},
                     "state": {**client.state(), "last_seq": 8}}
        client.info = info_last
        status, out, err = self.run_command(client, "verify", URL)
        self.assertEqual((status, out), (1, b""))
        self.assertEqual(err, f"{URL}: damaged: seq 3-4 missing (deleted from the stream)\n"
                              f"{URL}: damaged: seq 7-8 missing (deleted from the stream)\n")

    def test_verify_bad_payload_is_damage(self):
        """A message that is not a record: 1, its seq and a preview on stderr;
        the messages after it are read and checked too."""
        payloads = bodies()
        payloads[2] = b"garbage"
        payloads[4] = b"{}"
        status, _, err = self.run_command(stream_of(payloads), "verify", URL)
        self.assertEqual(status, 1)
        self.assertEqual(err.splitlines(), [
            f"{URL}: damaged: seq 3: not a valid record: b'garbage'",
            f"{URL}: damaged: seq 5: not a valid record: b'{{}}'"])

    def test_many_problems_are_counted(self):
        """Past 20 problems, the rest are one line: how many more."""
        status, _, err = self.run_command(stream_of([b"x"] * 25), "verify", URL)
        lines = err.splitlines()
        self.assertEqual((status, len(lines), lines[-1]), (1, 21, f"{URL}: damaged: 5 more"))


class StatsTests(StreamCase):
    def test_stats_json_agrees_with_the_exported_file(self):
        """``stats --json`` of a stream says what that of its export says of
        the file (records, seqs, times, events, users), plus the stream's
        name, storage, replicas and leader."""
        status, out, _ = self.run_command(stream_of(bodies()), "stats", "--json", URL)
        self.assertEqual(status, 0)
        report = json.loads(out)
        target = self.temp_path("export.jsonl")
        self.assertEqual(self.run_command(stream_of(bodies()), "export", URL, target)[0], 0)
        file_out = BytesIO()
        self.assertEqual(cli.main(["stats", "--json", target], stdout=file_out), 0)
        file_report = json.loads(file_out.getvalue())
        for key in ("path", "bytes"):
            del report[key], file_report[key]
        extra = {key: report.pop(key) for key in ("stream", "storage", "replicas", "leader")}
        self.assertEqual(report, file_report)
        self.assertEqual(extra, {"stream": "S", "storage": "file", "replicas": 3,
                                 "leader": "n1"})

    def test_stats_text(self):
        """``stats`` as text: the file's lines, then the stream's storage,
        replicas and leader."""
        status, out, _ = self.run_command(stream_of(bodies()), "stats", "--utc", URL)
        text = out.decode()
        self.assertEqual(status, 0)
        self.assertTrue(text.startswith(f"{URL}: 6 records, "))
        self.assertIn("seq: 1-6\nfirst: 2020.07.06 16:44:57.250000000\n", text)
        self.assertIn("           2  alice\n", text)
        self.assertTrue(text.endswith("stream: S, file storage, 3 replicas (leader n1)\n"))

    def test_stats_damaged(self):
        """A damaged stream: 1 and the problems, no report."""
        status, out, err = self.run_command(stream_of([b"x"]), "stats", URL)
        self.assertEqual((status, out), (1, b""))
        self.assertIn("seq 1: not a valid record", err)


class TailTests(StreamCase):
    def test_tail_last_records(self):
        """``tail -n 3``: the last three records as file journal lines."""
        status, out, _ = self.run_command(stream_of(bodies()), "tail", "-n", "3", URL)
        self.assertEqual(status, 0)
        self.assertEqual(out, self.expected_lines(bodies()[3:], first=4))

    def test_tail_more_than_there_are(self):
        """``tail -n 100`` of six records prints the six; ``-n 0`` nothing."""
        self.assertEqual(self.run_command(stream_of(bodies()), "tail", "-n", "100", URL)[1],
                         self.expected_lines(bodies()))
        status, out, _ = self.run_command(stream_of(bodies()), "tail", "-n", "0", URL)
        self.assertEqual((status, out), (0, b""))

    def test_tail_follow(self):
        """``tail -n 1 -f --for 5``: the last record, then one stored after the
        start, in order; it ends after five seconds with 0."""
        client = stream_of(bodies())
        client.reactor.callLater(2.0, client.append, bodies()[1])
        status, out, _ = self.run_command(client, "tail", "-n", "1", "-f", "--for", "5", URL)
        self.assertEqual(status, 0)
        self.assertEqual(out, numbered(6, bodies()[5]) + numbered(7, bodies()[1]))
        self.assertLess(abs(client.reactor.seconds() - 5.0), 0.15)

    def test_tail_does_not_verify_seqs(self):
        """Messages deleted among the last ones are no error for ``tail``: it
        prints those there are, 0."""
        client = stream_of(bodies())
        del client.messages[5]
        status, out, err = self.run_command(client, "tail", "-n", "3", URL)
        self.assertEqual((status, err), (0, ""))
        self.assertEqual(out, numbered(4, bodies()[3]) + numbered(6, bodies()[5]))

    def test_tail_bad_record(self):
        """A message that is not a record is left out, said on stderr, and
        the exit status is 1."""
        status, out, err = self.run_command(stream_of([bodies()[0], b"x"]), "tail", URL)
        self.assertEqual((status, out), (1, numbered(1, bodies()[0])))
        self.assertEqual(err, f"{URL}: seq 2: not a valid record: b'x'\n")


class ExportTests(StreamCase):
    def test_export_is_the_file_journal(self):
        """``export``: every record, as the numbered lines a file journal holds,
        byte for byte; no .part left; a line on stdout with the count and the
        seqs; the file verifies as a file journal."""
        target = self.temp_path("export.jsonl")
        status, out, _ = self.run_command(stream_of(bodies()), "export", URL, target)
        self.assertEqual(status, 0)
        with open(target, "rb") as f:
            self.assertEqual(f.read(), self.expected_lines(bodies()))
        self.assertFalse(os.path.exists(target + ".part"))
        self.assertTrue(out.startswith(f"{URL}: exported 6 records (seq 1-6) to {target} in "
                                       .encode()))
        verify_out = BytesIO()
        self.assertEqual(cli.main(["verify", target], stdout=verify_out), 0)

    def test_export_shows_progress(self):
        """A long export says every second on stderr how many records of the
        stream's are done."""
        target = self.temp_path("export.jsonl")
        status, _, err = self.run_command(stream_of(bodies(), step=0.5), "export", URL, target)
        self.assertEqual(status, 0)
        self.assertEqual(err.splitlines()[:2], [f"{URL}: 2/6 records exported",
                                                f"{URL}: 4/6 records exported"])

    def test_export_refuses_to_overwrite(self):
        """An existing FILE is left as it is: 2, one line, no consumer made."""
        target = self.temp_path("export.jsonl")
        with open(target, "wb") as f:
            f.write(b"mine\n")
        client = stream_of(bodies())
        status, out, err = self.run_command(client, "export", URL, target)
        self.assertEqual((status, out), (2, b""))
        self.assertEqual(err, f"cserver-journal: {target} exists: not overwritten\n")
        with open(target, "rb") as f:
            self.assertEqual(f.read(), b"mine\n")
        self.assertEqual(client.consumers, [])

    def test_export_of_a_damaged_stream(self):
        """A payload that is not a record, or a gap, stops the export: 1, the
        problem said, FILE not made and FILE.part removed."""
        for damage in ("payload", "gap"):
            target = self.temp_path("export.jsonl")
            client = stream_of(bodies())
            if damage == "payload":
                client.messages[4] = b'{"no":"record"}'
            else:
                del client.messages[4]
            status, out, err = self.run_command(client, "export", URL, target)
            self.assertEqual((status, out), (1, b""), damage)
            self.assertIn("seq 4", err.splitlines()[0])
            self.assertTrue(err.endswith(f"not exported ({target}.part removed)\n"))
            self.assertEqual(os.listdir(os.path.dirname(target)), [])

    def test_export_to_a_directory_that_is_not_there(self):
        """FILE.part cannot be made: 2, one line."""
        target = os.path.join(self.temp_dir(), "no", "such.jsonl")
        status, _, err = self.run_command(stream_of(bodies()), "export", URL, target)
        self.assertEqual(status, 2)
        self.assertEqual(err, f"cserver-journal: cannot write {target}.part: "
                              "No such file or directory\n")


class ErrorTests(StreamCase):
    def test_no_such_stream(self):
        """A stream that is not there: 2 and one line naming it."""
        status, out, err = self.run_command(stream_of(bodies()), "verify",
                                            "nats://127.0.0.1:4222/T")
        self.assertEqual((status, out), (2, b""))
        self.assertEqual(err, 'cserver-journal: no stream "T" at nats://127.0.0.1:4222/T\n')

    def test_no_jetstream(self):
        """No responders to the stream API (JetStream off): 2, one line."""
        client = stream_of(bodies())
        client.answer = lambda subject, payload: fail(NoResponders("no responders"))
        status, _, err = self.run_command(client, "verify", URL)
        self.assertEqual((status, err), (2, f"cserver-journal: no JetStream at {URL}: "
                                            "no responders\n"))

    def test_connection_refused(self):
        """Every server refusing the connection: 2 and one line, within half a
        second, the client closed."""
        client = stream_of(bodies())
        client.ready = Deferred()
        client.last_error = ConnectionRefusedError()
        status, _, err = self.run_command(client, "verify", URL)
        self.assertEqual(status, 2)
        self.assertEqual(err, f"cserver-journal: cannot reach NATS at {URL}: "
                              "connection refused\n")
        self.assertLessEqual(client.reactor.seconds(), 1.0)
        self.assertTrue(client.closed)

    def test_connect_refused_by_the_server(self):
        """A CONNECT refused (bad credentials): 2, what the server said."""
        client = stream_of(bodies())
        client.ready = Deferred()
        client.last_error = Refused("Authorization Violation")
        status, _, err = self.run_command(client, "verify", URL)
        self.assertEqual((status, err), (2, f"cserver-journal: cannot reach NATS at {URL}: "
                                            "Authorization Violation\n"))

    def test_no_answer(self):
        """No server ready within the connect timeout: 2, one line."""
        client = stream_of(bodies())
        client.ready = Deferred()
        status, _, err = self.run_command(client, "verify", URL)
        self.assertEqual((status, err), (2, f"cserver-journal: cannot reach NATS at {URL}: "
                                            "no answer\n"))
        self.assertLess(abs(client.reactor.seconds() - stream_cli.CONNECT_TIMEOUT), 0.2)

    def test_bad_url(self):
        """A malformed stream URL: 2 and one line, before any reactor runs."""
        args = argparse.Namespace(command="verify", path="nats://host/S")
        err = StringIO()
        self.assertEqual(stream_cli.run(args, BytesIO(), err), 2)
        self.assertIn("is not HOST:PORT", err.getvalue())

    def test_interrupted(self):
        """The reactor stopped (a signal) before the command ends: 130, but 0
        for ``tail -f``."""
        for argv, status in ((["verify", URL], 130), (["tail", "-f", URL], 0)):
            args = cli.parser().parse_args(argv)
            self.assertEqual(stream_cli.run(args, BytesIO(), StringIO(),
                                            reactor=MemoryReactorClock()), status)


class DispatchTests(Temporary, SynchronousTestCase):
    def run_cli(self, *argv):
        out, err = BytesIO(), StringIO()
        return cli.main(list(argv), stdout=out, stderr=err), out.getvalue(), err.getvalue()

    def test_text_of_a_stream(self):
        """``text`` takes only a file: a stream URL gets 2 and one line."""
        status, _, err = self.run_cli("text", URL)
        self.assertEqual((status, err), (2, "cserver-journal: text reads a file: "
                                            "cserver-journal export URL FILE first\n"))

    def test_export_of_a_file(self):
        """``export`` of a file journal: 2 and one line."""
        path = self.temp_path()
        status, _, err = self.run_cli("export", path, path + ".copy")
        self.assertEqual(status, 2)
        self.assertTrue(err.startswith("cserver-journal: export reads a stream"))
