"""TLS end to end: ``twistd -n cserver --port ssl:...`` with ``cserver-client
--endpoint tls:...``, over a self-signed certificate made for the test.

End-to-end layer."""

import datetime
import ipaddress
import os
import subprocess
import sys

import pytest

from ..server_process import ServerProcess

x509 = pytest.importorskip("cryptography.x509")
pytest.importorskip("OpenSSL")
pytest.importorskip("service_identity")


def make_certificate(directory):
    """
    A self-signed certificate for localhost and 127.0.0.1; returns the paths
    of the key and of the certificate (PEM), the certificate alone in
    ``directory/trust`` (a client's trust roots).
    """
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    os.makedirs(os.path.join(directory, "trust"), exist_ok=True)
    key_path = os.path.join(directory, "server.key")
    cert_path = os.path.join(directory, "trust", "server.pem")
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.TraditionalOpenSSL,
                                  serialization.NoEncryption()))
    with open(cert_path, "wb") as f:
        f.write(certificate.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


def client(*args):
    return subprocess.run(
        [sys.executable, "-m", "cserver.client", *args],
        capture_output=True, text=True, timeout=60,
    )


def test_auth_and_msg_over_tls(tmp_path):
    """AUTH and MSG over ssl:/tls: endpoints are acked and journaled; plain TCP gets nothing."""
    key, cert = make_certificate(str(tmp_path))
    process = ServerProcess(
        tmp_path, "--users", "alice",
        "--port", f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}",
    )
    # ServerProcess passes a tcp --port first; the later --port wins.
    process.start()
    try:
        endpoint = f"tls:localhost:{process.port}:trustRoots={tmp_path / 'trust'}"
        done = client("send", "--endpoint", endpoint, "--user", "alice", "over tls")
        assert done.returncode == 0, done.stderr
        seq = int(done.stdout.strip())
        done = client("stats", "--endpoint", endpoint, "--user", "alice")
        assert done.returncode == 0, done.stderr
        assert "user_total=1" in done.stdout
        plain = client("send", "--port", str(process.port), "--user", "alice", "--timeout",
                       "5", "in clear")
        assert plain.returncode != 0
    finally:
        assert process.stop() == 0
    from ..server_process import read_journal

    texts = {r["seq"]: r["text"] for r in read_journal(process.journal)
             if r["event"] == "message"}
    assert texts == {seq: "over tls"}


def test_tls_client_refuses_an_untrusted_server(tmp_path):
    """Without the server's certificate among its trust roots, the client refuses to talk."""
    key, cert = make_certificate(str(tmp_path))
    other = tmp_path / "other"
    other.mkdir()
    make_certificate(str(other))
    process = ServerProcess(
        tmp_path, "--users", "alice",
        "--port", f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}",
    )
    process.start()
    try:
        done = client("send", "--endpoint",
                      f"tls:localhost:{process.port}:trustRoots={other / 'trust'}",
                      "--user", "alice", "--timeout", "10", "x")
        assert done.returncode != 0
    finally:
        assert process.stop() == 0
    assert not any(r["event"] == "message" for r in _records(process.journal))


def _records(path):
    from ..server_process import read_journal

    return read_journal(path) if os.path.exists(path) else []
