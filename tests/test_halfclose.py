"""Half-closed clients get every reply they are owed: a client that sends its
lines and then shuts down its sending side (``shutdown(SHUT_WR)``, ``nc -N``)
is answered in full before the server closes; over TLS too."""

import os
import shutil
import socket
import subprocess
import threading

import pytest

from cserver.server import Limits

from .common import connect, make_factory, replies, send
from .server_process import ServerProcess, read_journal

# -- the protocol alone --------------------------------------------------------------------


def test_end_of_file_waits_for_the_acks_owed_then_closes():
    """After the client's EOF the connection stays open until every MSG it sent is
    acknowledged, then closes; the replies go out in order."""
    factory = make_factory()
    protocol, transport = connect(factory)
    send(protocol, "AUTH alice", "MSG one", "MSG two")
    protocol.readConnectionLost()
    assert not transport.disconnecting
    factory.clock.advance(0)
    assert replies(transport)[1:] == ["OK alice", "OK 1", "OK 2"]
    assert transport.disconnecting


def test_end_of_file_with_nothing_owed_closes_at_once():
    """EOF when every reply is out closes the connection at once, sending nothing more."""
    factory = make_factory()
    protocol, transport = connect(factory)
    send(protocol, "AUTH alice")
    replies(transport)
    protocol.readConnectionLost()
    assert transport.value() == b""
    assert transport.disconnecting


def test_lines_waiting_while_reading_was_paused_are_answered_after_end_of_file():
    """Lines still buffered because the connection hit its bound of unanswered MSGs (over
    TLS they can arrive with the EOF) are taken once the acks come, answered, and only then
    is the connection closed; the transport is never asked to read again."""
    factory = make_factory(limits=Limits(max_pending=2))
    protocol, transport = connect(factory)
    send(protocol, "AUTH alice", *[f"MSG m{i}" for i in range(7)])
    assert protocol.paused
    protocol.readConnectionLost()
    transport.producerState = "sentinel"  # a resumeProducing() would overwrite it
    for _ in range(6):
        factory.clock.advance(0)
    assert replies(transport)[1:] == ["OK alice"] + [f"OK {n}" for n in range(1, 8)]
    assert transport.disconnecting
    assert transport.producerState == "sentinel"
    assert [r["text"] for r in factory.journal.records()] == [f"m{i}" for i in range(7)]


def test_end_of_file_during_a_login_answers_it_then_closes():
    """EOF while an AUTH's check is under way (a password checker answering later): the
    AUTH is answered, the lines after it too, and then the connection closes."""
    from twisted.cred import strcred
    from twisted.internet import defer

    from cserver.auth import password_portal

    checker = strcred.makeChecker("memory:alice:pw")
    waiting = defer.Deferred()

    class Later:
        credentialInterfaces = checker.credentialInterfaces

        def requestAvatarId(self, credentials):
            return waiting.addCallback(lambda _: checker.requestAvatarId(credentials))

    factory = make_factory(portal=password_portal([Later()]))
    protocol, transport = connect(factory)
    send(protocol, "AUTH alice pw", "MSG after auth")
    protocol.readConnectionLost()
    assert not transport.disconnecting
    waiting.callback(None)
    factory.clock.advance(0)
    assert replies(transport)[1:] == ["OK alice", "OK 1"]
    assert transport.disconnecting


def test_an_unfinished_last_line_is_not_a_request():
    """Bytes after the last LF when the client's EOF comes are no request: not journaled."""
    factory = make_factory()
    protocol, transport = connect(factory)
    protocol.dataReceived(b"AUTH alice\nMSG whole\nMSG cut sho")
    protocol.readConnectionLost()
    factory.clock.advance(0)
    assert replies(transport)[1:] == ["OK alice", "OK 1"]
    assert [r["text"] for r in factory.journal.records()] == ["whole"]


def test_end_of_file_twice_changes_nothing():
    """Twisted may report the EOF a second time; the connection ends once."""
    factory = make_factory()
    protocol, transport = connect(factory)
    send(protocol, "AUTH alice", "MSG one")
    protocol.readConnectionLost()
    protocol.readConnectionLost()
    factory.clock.advance(0)
    assert replies(transport)[1:] == ["OK alice", "OK 1"]


# -- end to end ----------------------------------------------------------------------------

def half_close(port, data):
    """Send ``data``, shut down the sending side, read until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return received.decode("utf-8").split("\r\n")[:-1]


@pytest.mark.parametrize("options", [("--sync", "thread"), ("--work-delay", "0.2"), ()],
                         ids=["sync-thread", "work-delay", "defaults"])
def test_twenty_half_closed_clients_each_get_every_reply(tmp_path, options):
    """Twenty clients at once, each sending AUTH, MSG and QUIT then shutdown(SHUT_WR), each
    get all four lines (the greeting, OK alice, OK <seq>, OK bye); every MSG is journaled
    once."""
    process = ServerProcess(tmp_path, "--users", "alice", *options).start()
    try:
        results = [None] * 20

        def client(n):
            results[n] = half_close(process.port, f"AUTH alice\nMSG m{n}\nQUIT\n".encode())

        threads = [threading.Thread(target=client, args=(n,)) for n in range(20)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        for lines in results:
            assert lines[:2] == [lines[0], "OK alice"] and lines[0].startswith("HELLO")
            assert lines[2].startswith("OK ") and lines[3:] == ["OK bye"]
        assert sorted(int(lines[2][3:]) for lines in results) == list(range(2, 22))
    finally:
        assert process.stop() == 0
    texts = [r["text"] for r in read_journal(process.journal) if r["event"] == "message"]
    assert sorted(texts) == sorted(f"m{n}" for n in range(20))


def test_a_half_closed_pipeline_past_the_bound_of_unanswered_msgs_is_answered(tmp_path):
    """2500 pipelined MSGs without QUIT, then EOF (the server pauses reading at 1000
    unanswered; the syncs in their thread answer after the EOF is read): 2500
    acknowledgements in order, then the server closes."""
    process = ServerProcess(tmp_path, "--users", "alice", "--sync", "thread").start()
    try:
        data = b"AUTH alice\n" + b"".join(b"MSG p%d\n" % i for i in range(2500))
        lines = half_close(process.port, data)
        assert lines[1] == "OK alice"
        assert lines[2:] == [f"OK {seq}" for seq in range(2, 2502)]
    finally:
        assert process.stop() == 0


@pytest.mark.skipif(shutil.which("nc") is None, reason="needs nc (netcat-openbsd)")
def test_nc_with_end_of_file_shutdown_gets_every_reply(tmp_path):
    """``printf 'AUTH u\\nMSG x\\nQUIT\\n' | nc -N 127.0.0.1 PORT`` prints every reply."""
    process = ServerProcess(tmp_path, "--users", "alice", "--sync", "thread").start()
    try:
        done = subprocess.run(["nc", "-N", "127.0.0.1", str(process.port)],
                              input=b"AUTH alice\nMSG from nc\nQUIT\n", capture_output=True,
                              timeout=30)
        lines = done.stdout.decode().split("\r\n")
        assert lines[1:] == ["OK alice", "OK 2", "OK bye", ""]
    finally:
        assert process.stop() == 0


@pytest.mark.parametrize("end", ["fin", "close_notify"])
def test_a_half_closed_tls_client_gets_every_reply(tmp_path, end):
    """Over TLS 1.3 a client that sends its lines and then a bare FIN, or a close_notify
    and keeps reading, gets every reply, then the server's close_notify."""
    pytest.importorskip("OpenSSL")
    from .test_tls import make_certificate
    from .test_tls_halfclose import tls_client

    key, cert = make_certificate(str(tmp_path))
    process = ServerProcess(
        tmp_path, "--users", "alice", "--sync", "thread",
        "--port", f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}",
    ).start()
    try:
        version, received, ended, tcp_eof = tls_client(
            process.port, os.path.join(str(tmp_path), "trust", "server.pem"), end,
            lines=[b"AUTH alice", b"MSG one", b"MSG two"])
        assert version == "TLSv1.3"
        assert received.decode().split("\r\n")[1:] == ["OK alice", "OK 2", "OK 3", ""]
        assert (ended, tcp_eof) == ("close_notify", True)
    finally:
        assert process.stop() == 0
