"""End-to-end tests: half-closed clients get every reply they are owed: a
client that sends its lines and then shuts down its sending side
(``shutdown(SHUT_WR)``, ``nc -N``) is answered in full by a real ``twistd -n
cserver`` on loopback before it closes; over TLS too.  The protocol alone is
tested in the unit layer, tests/unit/test_halfclose.py."""

import os
import shutil
import socket
import subprocess
import threading

import pytest

from ..server_process import ServerProcess, read_journal


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
