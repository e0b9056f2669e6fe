"""Unit tests for cserver.client's bench: the barrier, phases, errors and open loop
(.bench, .bench_protocol), the report (.report), the split over processes
(.processes), the open-file limit (.local) and ``bench``'s exit statuses (.commands).

The bench runs on a MemoryReactorClock; its connections are completed one by one
with iosim.ConnectionCompleter against FakeServer, a small protocol v1 server
written here that logs every request line it receives, in order.  run_processes
with real child processes is tested in the end-to-end layer, tests/e2e/test_bench.py.
"""

import errno
import io
import json
import math
import resource
import sys

import attrs
from twisted.internet import error
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.protocols.basic import LineReceiver
from twisted.protocols.policies import WrappingFactory
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from cserver.client import commands
from cserver.client.bench import Bench, BenchConfig, RunResult
from cserver.client.bench_protocol import DONE, classify
from cserver.client.cli import build_parser
from cserver.client.local import ensure_open_files
from cserver.client.processes import split
from cserver.client.protocol import ServerError
from cserver.client.report import format_table, make_report, percentiles


class FakeServer(LineReceiver):
    """Protocol v1, just enough: HELLO/busy, AUTH, MSG (optionally held), STATS, QUIT."""

    delimiter = b"\n"

    def connectionMade(self):
        f = self.factory
        self.counted = f.max_connections is None or f.connections < f.max_connections
        if not self.counted:
            self.transport.write(b"ERR busy\r\n")
            self.transport.loseConnection()
            return
        f.connections += 1
        f.peak = max(f.peak, f.connections)
        self.id, f.next_id = f.next_id, f.next_id + 1
        self.user, self.mine = None, 0
        self.transport.write(b"HELLO cserver fake\r\n")

    def connectionLost(self, reason=None):
        if self.counted:
            self.factory.connections -= 1

    def reply(self, text):
        self.transport.write(text.encode() + b"\r\n")

    def lineReceived(self, line):
        f = self.factory
        verb, _, arg = line.rstrip(b"\r").decode().partition(" ")
        f.log.append((self.id, verb, arg))
        if verb == "AUTH":
            user = arg.split(" ")[0]
            if user in f.users:
                self.user = user
                self.reply(f"OK {user}")
            else:
                self.reply("ERR auth unknown user")
        elif verb == "MSG":
            if f.msg_error:
                self.reply(f"ERR {f.msg_error}")
                return
            f.seq += 1
            self.mine += 1
            if f.hold:
                f.held.append((self, f"OK {f.seq}"))
            else:
                self.reply(f"OK {f.seq}")
        elif verb == "STATS":
            self.reply(f"OK total={f.seq} served={f.seq} connections={f.connections} "
                       f"peak={f.peak} mine={self.mine} user={self.user or '-'}")
        elif verb == "QUIT":
            self.reply("OK bye")
            if f.close_on_quit:
                self.transport.loseConnection()
        else:
            self.reply(f"ERR unknown {verb}")


@attrs.define(eq=False)
class FakeServerFactory(Factory):
    protocol = FakeServer
    users: set = attrs.Factory(lambda: {"alice"})
    max_connections: int | None = None
    hold: bool = False
    msg_error: str | None = None
    close_on_quit: bool = True
    connections: int = 0
    peak: int = 0
    next_id: int = 0
    seq: int = 0
    log: list = attrs.Factory(list)
    held: list = attrs.Factory(list)

    def release(self):
        held, self.held = self.held, []
        for proto, text in held:
            proto.reply(text)

    def verbs(self, verb):
        return [entry for entry in self.log if entry[1] == verb]


class Net:
    """A memory reactor with FakeServer listening and the bench's pending connects."""

    def __init__(self, **server):
        self.reactor = MemoryReactorClock()
        self.server = FakeServerFactory(**server)
        self.reactor.listenTCP(31337, self.server)
        self.completer = iosim.ConnectionCompleter(self.reactor)
        self.pumps = []

    def start(self, **config):
        config.setdefault("endpoint", "tcp:host=127.0.0.1:port=31337")
        config.setdefault("user", "alice")
        self.bench = Bench(BenchConfig(**config), self.reactor, now=self.reactor.seconds)
        self.results = []
        self.bench.start().addBoth(self.results.append)
        return self.bench

    def complete(self, count=None):
        """Let ``count`` (default: all) pending connection attempts succeed."""
        while self.reactor.tcpClients and count != 0:
            self.pumps.append(self.completer.succeedOnce())
            count = None if count is None else count - 1
        self.pump()

    def pump(self):
        """Move data on every connection until nothing moves."""
        while any([p.pump() for p in self.pumps]):
            pass

    @property
    def result(self):
        assert self.results, "the bench has not finished"
        return self.results[0]


class SocketTransport(StringTransport):
    """Looks like a tcp.Client from outside: a ``socket``, empty write buffers."""

    def __init__(self):
        super().__init__()
        self.dataBuffer, self._tempDataBuffer = b"", []
        self.socket = self
        self.raw = []

    def send(self, data):
        self.raw.append(data)
        return len(data)


def sample_result(**kw):
    base = dict(requested=2, opened=2, authenticated=2, acked=2, peak=2,
                server_connections=2, t0=10.0, t1=10.1, t2=10.3, t3=10.4,
                latencies=[0.001, 0.003])
    return RunResult(**(base | kw))


class Captured:
    """``self.capture()``: sys.stdout and sys.stderr replaced, for the rest of the test, by
    StringIOs it returns (what pytest's capsys gave)."""

    def capture(self):
        stdout, stderr = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", stdout)
        self.patch(sys, "stderr", stderr)
        return stdout, stderr


class BarrierTests(SynchronousTestCase):
    """The barrier, the phases and what every session sends."""

    def test_barrier_holds_every_msg_until_all_sessions_authenticated(self):
        """No MSG (and no STATS) leaves any session before all N have authenticated."""
        net = Net()
        net.start(connections=5, messages=2)
        net.complete(4)
        assert len(net.server.verbs("AUTH")) == 4
        assert net.server.verbs("MSG") == [] and net.server.verbs("STATS") == []
        net.complete()
        verbs = [verb for _, verb, _ in net.server.log]
        last_auth = max(i for i, v in enumerate(verbs) if v == "AUTH")
        first_msg = verbs.index("MSG")
        assert last_auth < verbs.index("STATS") < first_msg
        assert net.result.acked == 10 and net.result.errors == {}

    def test_report_carries_server_peak_from_stats_at_the_barrier(self):
        """The server's peak and open connections, read at the barrier, are in the result."""
        net = Net()
        net.start(connections=6, messages=1)
        net.complete()
        assert (net.result.peak, net.result.server_connections) == (6, 6)
        report = make_report(net.bench.config, [net.result])
        assert report.ok and report.peak == 6 and report.acked == 6

    def test_every_session_quits_after_its_replies_and_the_run_ends_on_close(self):
        """Each session QUITs after its last ack; the run finishes when all have closed."""
        net = Net()
        net.start(connections=3, messages=4)
        net.complete()
        for session in range(3):
            mine = [verb for sid, verb, _ in net.server.log if sid == session]
            assert mine == ["AUTH"] + (["STATS"] if session == 0 else []) + ["MSG"] * 4 + ["QUIT"]
        result = net.result
        assert result.t0 <= result.t1 <= result.t2 <= result.t3
        assert net.server.connections == 0

    def test_message_texts_are_distinct(self):
        """Every MSG carries TEXT CONNECTION NUMBER, so all texts in a run differ."""
        net = Net()
        net.start(connections=3, messages=3, text="hi there")
        net.complete()
        texts = [arg for _, verb, arg in net.server.log if verb == "MSG"]
        assert len(texts) == 9 and len(set(texts)) == 9
        assert "hi there 2 1" in texts

    def test_pipeline_depth_keeps_d_messages_in_flight(self):
        """With -d 3 each session has exactly 3 MSGs outstanding while the server holds them."""
        net = Net(hold=True)
        net.start(connections=2, messages=5, pipeline=3)
        net.complete()
        assert len(net.server.verbs("MSG")) == 6
        per_session = [sum(1 for s, v, _ in net.server.log if v == "MSG" and s == i)
                       for i in (0, 1)]
        assert per_session == [3, 3]
        while not net.results:
            net.server.release()
            net.pump()
        assert net.result.acked == 10

    def test_zero_messages_just_connects_and_quits(self):
        """-n 0: sessions authenticate, pass the barrier and QUIT; nothing is sent."""
        net = Net()
        net.start(connections=2, messages=0)
        net.complete()
        assert net.server.verbs("MSG") == [] and len(net.server.verbs("QUIT")) == 2
        assert make_report(net.bench.config, [net.result]).ok


class ErrorTests(SynchronousTestCase):
    """Failed connects, busy servers, refused AUTHs and ERR replies, counted by code."""

    def test_refused_connections_are_reported_not_waited_for(self):
        """All connects refused: the run ends at once with errors refused=N and a note."""
        net = Net()
        net.start(connections=3)
        for _ in range(3):
            net.completer.failOnce(Failure(error.ConnectionRefusedError()))
        result = net.result
        assert result.errors == {"refused": 3} and result.authenticated == 0
        assert "could not open 3 sessions" in result.notes[0]
        report = make_report(net.bench.config, [result])
        assert not report.ok and any("refused" in note for note in report.notes)

    def test_one_failure_before_the_barrier_closes_the_others_and_sends_nothing(self):
        """If one session cannot open, the barrier can never pass: the rest are closed, no MSG."""
        net = Net()
        net.start(connections=3)
        net.complete(2)
        net.completer.failOnce(Failure(error.ConnectBindError(errno.EMFILE, "Too many open files")))
        net.pump()
        assert net.result.errors == {"limit": 1}
        assert net.server.verbs("MSG") == [] and net.server.connections == 0
        assert net.result.t1 is None

    def test_failure_before_others_authenticate_still_ends_the_run(self):
        """A session that fails first, before the others have authenticated, still ends
        the run once the rest are in: no wait for the watchdog."""
        net = Net()
        net.start(connections=3)
        net.completer.failOnce(Failure(error.ConnectionRefusedError()))
        assert not net.results
        net.complete()
        assert net.result.errors == {"refused": 1} and net.result.authenticated == 2
        assert net.server.verbs("MSG") == [] and net.server.connections == 0

    def test_busy_server_is_counted_as_busy(self):
        """Sessions refused with ``ERR busy`` are counted under busy."""
        net = Net(max_connections=2)
        net.start(connections=3)
        net.complete()
        assert net.result.errors == {"busy": 1} and net.result.authenticated == 2

    def test_refused_auth_is_counted_as_auth(self):
        """``ERR auth`` for every session: errors auth=N, nothing sent."""
        net = Net()
        net.start(connections=2, user="mallory")
        net.complete()
        assert net.result.errors == {"auth": 2} and net.server.verbs("MSG") == []

    def test_err_replies_to_msg_are_counted_by_code(self):
        """``ERR unavailable`` replies are counted by code, not acked; sessions still QUIT."""
        net = Net(msg_error="unavailable disk full")
        net.start(connections=2, messages=3)
        net.complete()
        result = net.result
        assert result.errors == {"unavailable": 6} and result.acked == 0
        assert len(net.server.verbs("QUIT")) == 2
        assert not make_report(net.bench.config, [result]).ok


class WatchdogTests(SynchronousTestCase):
    """The watchdog, the close after OK bye and abort(): every run ends."""

    def test_watchdog_ends_a_stalled_run(self):
        """A server that never answers: after --timeout seconds the run ends with timeout."""
        net = Net(hold=True)
        net.start(connections=2, messages=1, timeout=5)
        net.complete()
        for _ in range(10):
            net.reactor.advance(1)
            net.pump()
        result = net.result
        assert result.errors == {"timeout": 2}
        assert "no progress for 5 s" in result.notes[0]

    def test_watchdog_counts_stuck_sessions_once(self):
        """After the watchdog gives up, it stops: each stuck session is counted once as a
        timeout, even while the abort waits for connections that do not end."""
        net = Net()
        net.start(connections=2, timeout=3)
        for _ in range(12):
            net.reactor.advance(1)
        result = net.result
        assert result.errors == {"timeout": 2} and result.failed == 2
        assert not net.reactor.getDelayedCalls()

    def test_partial_reply_data_is_not_progress(self):
        """Bytes that complete no reply line do not count as progress: a server that
        trickles them without ever answering still ends the run by the watchdog."""
        net = Net(hold=True)
        net.start(connections=1, messages=1, timeout=3)
        net.complete()
        for _ in range(10):
            if net.results:
                break
            net.pumps[0].server.transport.write(b"O")
            net.pump()
            net.reactor.advance(1)
            net.pump()
        assert net.result.errors == {"timeout": 1}

    def test_session_closes_after_ok_bye_when_the_server_does_not(self):
        """After ``OK bye`` the bench closes the connection itself: a server that keeps
        it open does not turn fully acked sessions into timeouts."""
        net = Net(close_on_quit=False)
        net.start(connections=2, messages=1, timeout=5)
        net.complete()
        result = net.result
        assert result.errors == {} and result.acked == 2 and result.failed == 0
        assert net.server.connections == 0
        assert make_report(net.bench.config, [result]).ok

    def test_abort_closes_sessions_that_have_not_ended(self):
        """abort() closes every session whose connection has not ended, whatever its
        state -- one already done but still connected included -- so the run ends at once."""
        net = Net(hold=True)
        b = net.start(connections=2, messages=1, timeout=5)
        net.complete()
        b.sessions[0].state = DONE  # done, but its connection is still open
        b.abort("test")
        net.pump()
        assert net.server.connections == 0 and net.results


class OpenLoopTests(SynchronousTestCase):
    """--rate: the open loop's schedule, totals and latency."""

    def test_open_loop_at_a_low_rate_is_not_taken_for_stuck(self):
        """--rate 0.1: ten quiet seconds between MSGs while nothing is outstanding are not
        \"no progress\"; the watchdog only counts while replies are awaited."""
        net = Net()
        net.start(connections=1, rate=0.1, duration=30, timeout=5)
        net.complete()
        for _ in range(40):
            if net.results:
                break
            net.reactor.advance(1)
            net.pump()
        result = net.result
        assert result.errors == {} and result.acked == 3

    def test_open_loop_sends_an_explicit_total(self):
        """A process given ``total`` (its share of the MSGs) sends exactly that many."""
        net = Net()
        net.start(connections=1, rate=10 / 3, duration=1, total=4)
        net.complete()
        for _ in range(5):
            net.reactor.advance(0.5)
            net.pump()
        assert net.result.acked == 4 and len(net.server.verbs("MSG")) == 4

    def test_open_loop_measures_latency_from_the_intended_send_time(self):
        """--rate: MSGs go out on schedule even while the server stalls, and latency counts
        from each MSG's intended time (no coordinated omission)."""
        net = Net(hold=True)
        b = net.start(connections=2, rate=8.0, duration=0.5)
        net.complete()
        start = b.result.t1
        assert len(net.server.verbs("MSG")) == 1
        # The client's timer runs late (0.3 s): the two MSGs due by then go out together,
        # but each keeps its own intended time.
        net.reactor.advance(0.3)
        net.pump()
        assert len(net.server.verbs("MSG")) == 3
        net.reactor.advance(0.1)
        net.pump()
        assert len(net.server.verbs("MSG")) == 4
        net.reactor.advance(1.0)
        net.server.release()
        net.pump()
        result = net.result
        assert result.acked == 4
        ack_time = start + 1.4
        expected = sorted(ack_time - (start + k * 0.125) for k in range(4))
        latencies = sorted(result.latencies)
        assert len(latencies) == len(expected), (latencies, expected)
        for got, want in zip(latencies, expected, strict=True):
            assert math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-12), (latencies, expected)


class WrappedTransportTests(SynchronousTestCase):
    """Writes under a wrapping transport (TLS is one)."""

    def test_wrapping_transport_gets_the_bytes_not_the_raw_socket(self):
        """Under a wrapping transport (TLS is one), writes go through the wrapper, never
        straight to the socket found through the wrapper's attribute forwarding."""
        b = Bench(BenchConfig(endpoint="e", user="alice", connections=1), MemoryReactorClock())
        wrapper = WrappingFactory(b).buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        transport = SocketTransport()
        wrapper.makeConnection(transport)
        wrapper.dataReceived(b"HELLO cserver fake\r\n")
        assert transport.raw == [] and transport.value() == b"AUTH alice\n"


class ReportTests(SynchronousTestCase):
    """Percentiles, failure codes, and the JSON and table reports."""

    def test_percentiles_nearest_rank(self):
        """p50/p90/p99/p99.9 use the nearest rank; values are reported in ms."""
        values = [i / 1000 for i in range(1, 1001)]
        got = percentiles(list(reversed(values)))
        assert got == {"p50": 500.0, "p90": 900.0, "p99": 990.0, "p99.9": 999.0, "max": 1000.0}
        assert percentiles([0.002]) == {k: 2.0 for k in ("p50", "p90", "p99", "p99.9", "max")}
        assert set(percentiles([]).values()) == {None}

    def test_classify_names_connection_failures(self):
        """Failures map to the codes the report uses: refused, limit, reset, closed, ..."""
        assert classify(Failure(error.ConnectionRefusedError())) == "refused"
        assert classify(error.ConnectBindError(errno.EMFILE, "x")) == "limit"
        assert classify(error.ConnectError(errno.EADDRNOTAVAIL, "x")) == "ports"
        assert classify(error.ConnectionLost()) == "reset"
        assert classify(error.ConnectionDone()) == "closed"
        assert classify(error.TimeoutError()) == "timeout"
        assert classify(ServerError("busy")) == "busy"

    def test_report_json_shape(self):
        """The JSON report has the keys the README names, latency_ms with p50..max, and the
        phase times in ms."""
        config = BenchConfig(endpoint="tcp:host=127.0.0.1:port=1", user="u", connections=2)
        report = make_report(config, [sample_result()])
        data = json.loads(json.dumps(attrs.asdict(report)))
        for key in ("connections", "acked", "errors", "peak", "total_ms", "msg_per_s",
                    "latency_ms", "connect_ms", "messages_ms", "quit_ms"):
            assert key in data
        assert set(data["latency_ms"]) == {"p50", "p90", "p99", "p99.9", "max"}
        assert (data["connections"], data["acked"], data["errors"], data["peak"]) == (2, 2, {}, 2)
        assert math.isclose(data["total_ms"], 400.0) and math.isclose(data["connect_ms"], 100.0)
        assert math.isclose(data["messages_ms"], 200.0) and math.isclose(data["msg_per_s"], 10.0)
        assert data["ok"] is True

    def test_report_merges_processes(self):
        """Results of several processes add up; peak is the largest; phases span all."""
        config = BenchConfig(endpoint="e", user="u", connections=4)
        a = sample_result()
        b = sample_result(t0=9.9, t1=10.2, t2=10.5, t3=10.6, peak=4, errors={"unavailable": 1},
                          acked=1)
        report = make_report(config, [a, b], processes=2)
        assert (report.acked, report.peak, report.errors) == (3, 4, {"unavailable": 1})
        assert math.isclose(report.total_ms, 700.0) and math.isclose(report.connect_ms, 300.0)
        assert math.isclose(report.messages_ms, 400.0) and not report.ok

    def test_table_lists_phases_and_latency(self):
        """The human report names every phase, the throughput, the percentiles, the
        connections the server had open at the barrier, and its peak since it started."""
        config = BenchConfig(endpoint="e", user="u", connections=2)
        table = format_table(make_report(config, [sample_result(peak=7)]))
        for word in ("connect+auth", "messages", "quit", "total", "msg/s", "p99.9",
                     "2 connections open at the barrier", "peak 7 since server start"):
            assert word in table


class SplitTests(SynchronousTestCase):
    """--processes: how the run is split between the children."""

    def test_split_open_loop_counts_add_up(self):
        """--rate with --processes: the children's MSG counts add up to round(rate x
        duration), so the merged report can be ok."""
        for connections, processes, rate, duration in [
                (3, 3, 10.0, 1.0), (10, 3, 100.0, 0.35), (7, 4, 3.0, 2.5), (5, 2, 1.0, 0.5)]:
            case = (f"connections={connections} processes={processes} rate={rate} "
                    f"duration={duration}")
            config = BenchConfig(endpoint="e", user="u", connections=connections, rate=rate,
                                 duration=duration)
            parts = split(config, processes)
            assert sum(p.total_messages() for p in parts) == config.total_messages(), case

    def test_split_shares_connections_and_rate(self):
        """--processes: connections split evenly with distinct numbering, rate in proportion."""
        config = BenchConfig(endpoint="e", user="u", connections=10, rate=100.0)
        parts = split(config, 3)
        assert [(p.connections, p.first) for p in parts] == [(4, 0), (3, 4), (3, 7)]
        assert math.isclose(sum(p.rate for p in parts), 100.0, rel_tol=1e-6, abs_tol=1e-12)


class OpenFileLimitTests(SynchronousTestCase):
    """The open-file limit N connections need."""

    def test_open_file_limit_too_low_is_explained(self):
        """When the hard limit is below what N connections need, say so (no silent hang)."""
        calls = []
        self.patch(resource, "getrlimit", lambda what: (256, 512))
        self.patch(resource, "setrlimit", lambda what, limits: calls.append(limits))
        message = ensure_open_files(1000)
        assert calls == [(512, 512)]
        assert "1000 connections" in message and "ulimit -n" in message
        assert ensure_open_files(100) is None


class MainTests(Captured, SynchronousTestCase):
    """commands.run_bench: exit statuses and what it prints."""

    def test_main_refuses_more_processes_than_connections(self):
        """bench exits 2 with a message for --processes above --connections."""
        _stdout, stderr = self.capture()
        args = build_parser().parse_args(["bench", "-c", "2", "--processes", "3"])
        assert commands.run_bench(args) == 2
        assert "--processes" in stderr.getvalue()

    def test_main_reports_a_too_low_open_file_limit_as_json(self):
        """With --json, an open-file limit too low for N still ends in a JSON report with
        errors limit=N, and the exit status is 1."""
        stdout, stderr = self.capture()
        self.patch(commands, "ensure_open_files", lambda n: "limit too low")
        args = build_parser().parse_args(["bench", "-c", "30", "--json"])
        assert commands.run_bench(args) == 1
        out, err = stdout.getvalue(), stderr.getvalue()
        report = json.loads(out.splitlines()[-1])
        assert report["errors"] == {"limit": 30} and report["ok"] is False
        assert "limit too low" in err
