"""A first hour without tracebacks: each mistake a new user makes starting
``twistd cserver`` ends in one line naming the option or the fix, exit status
1, and no file left behind; a clean stop logs no error.

End-to-end layer: real ``twistd cserver`` processes and loopback ports."""

import os
import re
import socket

import pytest

from ..server_process import ServerProcess, run_twistd
from .test_workers import _wait_serving


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def one_line_failure(tmp_path, *args, env=None):
    """Run twistd cserver with ``args`` in an empty directory: it must exit 1 printing one
    line on stderr (nothing on stdout) and leave the directory empty; the line."""
    done = run_twistd(tmp_path, "--journal", str(tmp_path / "j.jsonl"), *args, env=env)
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert os.listdir(tmp_path) == []
    return lines[0]


@pytest.mark.parametrize("args, expected", [
    (["--port", "garbage"],
     r"^cserver: --port 'garbage' is not a server endpoint description \(Unknown endpoint "
     r"type: 'garbage'\); for example: tcp:31337:interface=127\.0\.0\.1, "),
    (["--port", "tcp:99999"], r"^cserver: --port tcp:99999: the port must be 0-65535, not 99999"),
    (["--port", "tcp:80:nosuch=1"], r"^cserver: --port 'tcp:80:nosuch=1' is not a server "
     r"endpoint description \(tcp: takes no parameter nosuch\)"),
    (["--port", "ssl:0:privateKey=/no/such.pem"],
     r"^cserver: --port ssl:0:privateKey=/no/such\.pem: cannot read /no/such\.pem: No such file"),
    (["--workers", "0"], r"^cserver: --workers must be at least 1, not 0$"),
    (["--max-line", "abc"], r"^cserver: --max-line must be a whole number, not 'abc'$"),
    (["--idle-timeout", "-3"], r"^cserver: --idle-timeout must be at least 0 s, not -3$"),
    (["--fsync", "sometimes"], r"^cserver: --fsync must be one of always, interval, never"),
    (["--metrics", "nonsense"], r"^cserver: --metrics 'nonsense' is not a server endpoint"),
    (["--nosuchoption"], r"^cserver: option --nosuchoption not recognized \(twistd cserver "
     r"--help lists the options\)$"),
], ids=lambda value: value if isinstance(value, str) else " ".join(value))
def test_bad_options_end_in_one_line_naming_the_option(tmp_path, args, expected):
    """A bad option value ends the start in one line naming the option and what is wrong
    (no traceback, no usage text), exit status 1, no file made."""
    assert re.search(expected, one_line_failure(tmp_path, *args))


@pytest.mark.parametrize("workers", [(), ("--workers", "2")], ids=["single", "workers"])
def test_a_port_in_use_ends_in_one_line_and_leaves_no_file(tmp_path, workers):
    """A --port already in use: one line naming the port, the option and the likely cause;
    no journal (not even an empty one), no lock file."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        line = one_line_failure(tmp_path, "--port", f"tcp:{port}:interface=127.0.0.1",
                                *workers)
    assert line == (f"cserver: cannot listen on tcp:{port}:interface=127.0.0.1:backlog=4096 "
                    "(--port): the address is already in use (is another server running "
                    "there?)")


@pytest.mark.parametrize("workers", [(), ("--workers", "2")], ids=["single", "workers"])
def test_a_metrics_port_in_use_ends_in_one_line_and_leaves_no_file(tmp_path, workers):
    """A --metrics port already in use: one line naming it and --metrics; the journal the
    start created is removed again (with --workers too), the lock let go."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        line = one_line_failure(tmp_path, "--port", "tcp:0:interface=127.0.0.1",
                                "--metrics", f"tcp:{port}:interface=127.0.0.1", *workers)
    assert line == (f"cserver: cannot listen on tcp:{port}:interface=127.0.0.1:backlog=4096 "
                    "(--metrics): the address is already in use (is another server running "
                    "there?)")


def test_ssl_without_the_tls_libraries_names_the_extra(tmp_path):
    """--port ssl:... where pyOpenSSL is not installed names the extra to install."""
    hide = tmp_path.parent / f"{tmp_path.name}-no-openssl"
    (hide / "OpenSSL").mkdir(parents=True)
    (hide / "OpenSSL" / "__init__.py").write_text("raise ImportError('No module named OpenSSL')\n")
    line = one_line_failure(tmp_path, "--port", "ssl:0", env={"PYTHONPATH": str(hide)})
    assert line == "cserver: --port ssl:... needs the TLS libraries: pip install 'cserver[tls]'"


def test_a_bare_port_number_listens_on_loopback(tmp_path):
    """--port 41412 (a bare number) means tcp:41412:interface=127.0.0.1."""
    port = free_port()
    process = ServerProcess(tmp_path, "--users", "alice", "--port", str(port)).start()
    try:
        assert process.port == port
        client = process.connect()
        assert client.request("AUTH alice") == "OK alice"
        client.close()
    finally:
        assert process.stop() == 0


def test_a_missing_journal_directory_is_named(tmp_path):
    """--journal in a directory that does not exist: one line naming that directory."""
    line = one_line_failure(tmp_path, "--journal", str(tmp_path / "nope" / "j.jsonl"))
    assert line == (f"cserver: cannot open journal {tmp_path / 'nope' / 'j.jsonl'}: the "
                    f"directory {tmp_path / 'nope'} does not exist")


def test_the_version_is_printed(tmp_path):
    """``twistd cserver --version`` prints the server's version and exits 0."""
    from cserver import __version__

    done = run_twistd(tmp_path, "--version")
    assert (done.returncode, done.stdout) == (0, f"cserver {__version__}\n")


_ERRORS = re.compile(r"Traceback|Unhandled|#error\]|#critical\]|ReactorNotRunning")


@pytest.mark.parametrize("workers", [(), ("--workers", "2")], ids=["single", "workers"])
def test_a_clean_stop_logs_no_error(tmp_path, workers):
    """Start, serve a MSG, SIGTERM: exit 0, and nothing in the whole log is an error (the
    workers' parent watch used to log ReactorNotRunning on every clean stop)."""
    process = ServerProcess(tmp_path, "--users", "alice", *workers).start()
    if workers:
        _wait_serving(process)
    client = process.connect()
    client.request("AUTH alice")
    assert client.request("MSG hello").startswith("OK ")
    client.close()
    assert process.stop() == 0
    process.wait_for("never printed", timeout=2)  # read the output to its end
    log = "".join(process.output)
    assert "cserver stopped" in log
    assert not _ERRORS.search(log), log
