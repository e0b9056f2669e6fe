"""End-to-end tests for the hashed password store: ``python -m cserver.passwd`` in a
child process, cserver-passwd against a directory made unwritable (chattr +i when
root), and a real ``twistd cserver --auth hashfile:PATH`` on loopback.  The hashes,
the checker, the cred plugin and cserver-passwd run in-process are tested in the
unit layer, tests/unit/test_hashfile.py."""

import io
import os
import subprocess
import sys

import pytest

from cserver import passwd
from cserver.hashfile import verify_password

from ..server_process import ServerProcess

#: scrypt's cost in these tests: fast, and still a real scrypt.
N = 16


def add_user(path, user, password, *extra):
    """Run cserver-passwd in-process with the password on stdin; its exit status."""
    return passwd.main([str(path), user, "--stdin", "--scrypt-n", str(N), *extra],
                       stdin=io.StringIO(password + "\n"))


def no_prompt(text):
    """A getpass stand-in for runs that must stop before asking for the password."""
    raise AssertionError(f"prompted for the password: {text!r}")


@pytest.fixture
def unwritable(tmp_path):
    """A directory this process cannot create files in: mode 0555, or for root (whom
    modes do not stop) the immutable attribute, where chattr can set it."""
    directory = tmp_path / "ro"
    directory.mkdir()
    if os.geteuid() == 0:
        done = subprocess.run(["chattr", "+i", str(directory)], capture_output=True)
        if done.returncode != 0:
            pytest.skip("running as root and chattr +i is not available")
        yield directory
        subprocess.run(["chattr", "-i", str(directory)], check=True)
    else:
        directory.chmod(0o555)
        yield directory
        directory.chmod(0o755)


def test_passwd_names_an_unwritable_directory_before_prompting(unwritable, capsys):
    """A PATH in a directory this user cannot write to fails with one line naming
    the directory (not a temporary file), exit 1, before the password is asked
    for."""
    path = unwritable / "passwd"
    assert passwd.main([str(path), "alice"], prompt=no_prompt) == 1
    assert capsys.readouterr().err == (
        f"cserver-passwd: cannot write to the directory {unwritable} "
        "(the file is replaced by a new one made there): permission denied\n")
    assert os.listdir(unwritable) == []


def test_passwd_command_reads_stdin(tmp_path):
    """`python -m cserver.passwd PATH USER --stdin` hashes the first stdin line
    (its line end dropped) and the result verifies."""
    path = tmp_path / "hashes"
    subprocess.run(
        [sys.executable, "-m", "cserver.passwd", str(path), "dave", "--stdin",
         "--scrypt-n", str(N)],
        input="with space\n", text=True, check=True, capture_output=True,
    )
    user, hashed = path.read_text().strip().split(":", 1)
    assert user == "dave" and verify_password("with space", hashed)


def test_end_to_end_twistd(tmp_path):
    """A real twistd cserver --auth hashfile:PATH: the right password gets OK,
    a wrong one and an unknown user ERR auth, and a password changed by
    cserver-passwd works without a restart; neither file holds a plaintext."""
    path = tmp_path / "hashes"
    assert add_user(path, "carol", "s3cret pw") == 0
    process = ServerProcess(tmp_path, "--auth", f"hashfile:{path}").start()
    try:
        client = process.connect()
        assert client.request("AUTH carol wrong").startswith("ERR auth ")
        assert client.request("AUTH mallory s3cret pw").startswith("ERR auth ")
        assert client.request("AUTH carol s3cret pw") == "OK carol"
        assert client.request("MSG hello").startswith("OK ")
        client.close()
        assert add_user(path, "carol", "n3w") == 0
        client = process.connect()
        assert client.request("AUTH carol s3cret pw").startswith("ERR auth ")
        assert client.request("AUTH carol n3w") == "OK carol"
        client.close()
        assert process.stop() == 0
    finally:
        if process.process.poll() is None:
            process.kill()
    for secret in (b"s3cret", b"n3w"):
        assert secret not in path.read_bytes()
        assert secret not in open(process.journal, "rb").read()
