"""Tests for the hashed password store: cserver.hashfile, the hashfile: cred
plugin and cserver-passwd."""

import io
import os
import stat
import subprocess
import sys

import pytest
from twisted.cred import strcred
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer

from cserver import passwd
from cserver.auth import IUser, password_portal
from cserver.hashfile import BadHash, HashFileChecker, ScryptHash, hash_password, verify_password

from .server_process import ServerProcess

#: scrypt's cost in these tests: fast, and still a real scrypt.
N = 16


def inline(f, *args):
    """A thread runner that runs in the calling thread, counting its calls."""
    inline.calls.append(f)
    return defer.maybeDeferred(f, *args)


inline.calls = []


def result_of(d):
    """The result of a Deferred that has fired: a value or a Failure."""
    results = []
    d.addBoth(results.append)
    [result] = results
    return result


def write_hashes(path, **users):
    path.write_text("".join(f"{u}:{hash_password(pw, n=N)}\n" for u, pw in users.items()))


def add_user(path, user, password, *extra):
    """Run cserver-passwd in-process with the password on stdin; its exit status."""
    return passwd.main([str(path), user, "--stdin", "--scrypt-n", str(N), *extra],
                       stdin=io.StringIO(password + "\n"))


def test_hash_format_and_verification():
    """A hash is scrypt$n=..,r=..,p=..$salt$key, salted at random, and verifies
    the right password only (str or bytes)."""
    hashed = hash_password("s3cret", n=N)
    scheme, params, salt, key = hashed.split("$")
    assert (scheme, params) == ("scrypt", f"n={N},r=8,p=1")
    parsed = ScryptHash.parse(hashed)
    assert len(parsed.salt) == 16 and len(parsed.key) == 32
    assert parsed.format() == hashed
    assert "s3cret" not in hashed
    assert hash_password("s3cret", n=N) != hashed
    assert verify_password("s3cret", hashed)
    assert verify_password(b"s3cret", hashed)
    assert not verify_password("s3cret ", hashed)
    assert not verify_password("wrong", hashed)


def test_known_scrypt_vector():
    """The hash is RFC 7914's scrypt (its test vector with n=16, r=1, p=1)."""
    expected = bytes.fromhex(
        "77d6576238657b203b19ca42c18a0497f16b4844e3074ae8dfdffa3fede21442"
        "fcd0069ded0948f8326a753a0fc81f17e8d3e0fb2e0d3628cf35e20c38d18906"
    )
    assert ScryptHash(16, 1, 1, b"x", expected).derive(b"") != expected  # salt matters
    assert ScryptHash(16, 1, 1, b"", expected).derive(b"") == expected


@pytest.mark.parametrize("bad", [
    "plain", "md5$x$y$z", "scrypt$n=16,r=8$c2FsdA==$a2V5",
    "scrypt$n=15,r=8,p=1$c2FsdA==$a2V5", "scrypt$n=16,r=8,p=1$!!$a2V5",
    "scrypt$n=16,r=8,p=1,q=2$c2FsdA==$a2V5", "scrypt$n=1073741824,r=8,p=1$c2FsdA==$a2V5",
])
def test_bad_hashes_are_refused(bad):
    """Malformed hashes, odd n, unknown parameters or huge memory needs are BadHash."""
    with pytest.raises(BadHash):
        ScryptHash.parse(bad)


def test_checker_accepts_right_password_str_or_bytes(tmp_path):
    """The right password logs in, as str or bytes; the avatar id is the str name."""
    path = tmp_path / "hashes"
    write_hashes(path, alice="pw one", bob="sécret")
    checker = HashFileChecker(path, run_in_thread=inline)
    assert result_of(checker.requestAvatarId(UsernamePassword("alice", "pw one"))) == "alice"
    assert result_of(checker.requestAvatarId(
        UsernamePassword(b"bob", "sécret".encode()))) == "bob"


def test_wrong_password_and_unknown_user_are_unauthorized(tmp_path):
    """A wrong password and an unknown user both fail with UnauthorizedLogin, and
    both cost one hash (the unknown user's against a dummy)."""
    path = tmp_path / "hashes"
    write_hashes(path, alice="pw")
    checker = HashFileChecker(path, run_in_thread=inline)
    inline.calls.clear()
    assert result_of(checker.requestAvatarId(UsernamePassword("alice", "nope"))).check(
        UnauthorizedLogin)
    assert result_of(checker.requestAvatarId(UsernamePassword("mallory", "pw"))).check(
        UnauthorizedLogin)
    assert len(inline.calls) == 2
    # The dummy has the known users' parameters, so it costs the same.
    dummy = inline.calls[1].__self__
    assert (dummy.n, dummy.r, dummy.p) == (N, 8, 1)
    assert dummy.key != ScryptHash.parse(path.read_text().split(":", 1)[1]).key


def test_hash_runs_in_the_thread_runner(tmp_path):
    """The hash runs through the injected thread runner, not inline: until the
    runner's Deferred fires, the login has no result."""
    path = tmp_path / "hashes"
    write_hashes(path, alice="pw")
    pending = []

    def runner(f, *args):
        d = defer.Deferred()
        pending.append((d, f, args))
        return d

    checker = HashFileChecker(path, run_in_thread=runner)
    results = []
    checker.requestAvatarId(UsernamePassword("alice", "pw")).addBoth(results.append)
    assert results == [] and len(pending) == 1
    d, f, args = pending.pop()
    d.callback(f(*args))
    assert results == ["alice"]


def test_default_runner_is_defer_to_thread(tmp_path):
    """Without an injected runner the hash goes to twisted's deferToThread
    (the reactor's thread pool)."""
    from twisted.internet import threads

    path = tmp_path / "hashes"
    write_hashes(path, alice="pw")
    seen = []
    real = threads.deferToThread

    def spy(f, *args):
        seen.append(f)
        return defer.succeed(f(*args))

    threads.deferToThread = spy
    try:
        checker = HashFileChecker(path)
        assert result_of(checker.requestAvatarId(UsernamePassword("alice", "pw"))) == "alice"
    finally:
        threads.deferToThread = real
    assert len(seen) == 1 and seen[0].__name__ == "matches"


def test_reloads_after_cserver_passwd(tmp_path):
    """The checker sees users added and passwords changed by cserver-passwd without a restart."""
    path = tmp_path / "hashes"
    assert add_user(path, "alice", "old") == 0
    checker = HashFileChecker(path, run_in_thread=inline)
    login = lambda u, p: result_of(checker.requestAvatarId(UsernamePassword(u, p)))  # noqa: E731
    assert login("alice", "old") == "alice"
    assert login("bob", "b").check(UnauthorizedLogin)
    assert add_user(path, "bob", "b") == 0
    assert add_user(path, "alice", "new") == 0
    assert login("bob", "b") == "bob"
    assert login("alice", "new") == "alice"
    assert login("alice", "old").check(UnauthorizedLogin)


def test_missing_or_malformed_file_lets_nobody_in(tmp_path):
    """No file means no users; malformed lines are skipped, good ones still count."""
    path = tmp_path / "hashes"
    checker = HashFileChecker(path, run_in_thread=inline)
    assert result_of(checker.requestAvatarId(UsernamePassword("alice", "pw"))).check(
        UnauthorizedLogin)
    path.write_text(f"# comment\n\nalice:pw\nbob\ncarol:{hash_password('c', n=N)}\n")
    assert result_of(checker.requestAvatarId(UsernamePassword("alice", "pw"))).check(
        UnauthorizedLogin)
    assert result_of(checker.requestAvatarId(UsernamePassword("carol", "c"))) == "carol"


def test_through_the_server_portal(tmp_path):
    """Through cserver's password portal (which wraps checkers in
    TextOrBytesChecker) the right password gives an IUser, a wrong one fails."""
    path = tmp_path / "hashes"
    write_hashes(path, alice="pw")
    portal = password_portal([HashFileChecker(path, run_in_thread=inline)])
    ok = result_of(portal.login(UsernamePassword("alice", "pw"), None, IUser))
    assert ok[1].name == "alice"
    bad = result_of(portal.login(UsernamePassword("alice", "x"), None, IUser))
    assert bad.check(UnauthorizedLogin)


def test_passwd_adds_changes_and_keeps_others(tmp_path, capsys):
    """cserver-passwd adds a user, changes one in place, and keeps every other
    line (comments included) as it was."""
    path = tmp_path / "hashes"
    path.write_text("# cserver users\ncarol:scrypt$n=16,r=8,p=1$c2FsdA==$a2V5\n")
    assert add_user(path, "alice", "one") == 0
    assert add_user(path, "bob", "two") == 0
    before = path.read_text().splitlines()
    assert add_user(path, "alice", "three") == 0
    after = path.read_text().splitlines()
    assert after[:2] == ["# cserver users", "carol:scrypt$n=16,r=8,p=1$c2FsdA==$a2V5"]
    assert after[3] == before[3] and after[3].startswith("bob:")
    assert after[2].startswith("alice:") and after[2] != before[2]
    assert len(after) == 4
    assert verify_password("three", after[2].split(":", 1)[1])
    out = capsys.readouterr().out
    assert "added alice" in out and "changed alice" in out


def test_passwd_file_mode_and_no_plaintext(tmp_path):
    """The file is 0600, even if it was world-readable, has no leftover
    temporary file, and never holds the plaintext password."""
    path = tmp_path / "hashes"
    path.write_text("")
    path.chmod(0o644)
    assert add_user(path, "alice", "plaintext-pw") == 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert b"plaintext-pw" not in path.read_bytes()
    assert os.listdir(tmp_path) == ["hashes"]


@pytest.mark.parametrize("user", ["a:b", "a b", "tab\there", "", "new\nline"])
def test_passwd_refuses_bad_user_names(tmp_path, user, capsys):
    """User names with ':' or whitespace (or none) are refused; the file is untouched."""
    path = tmp_path / "hashes"
    path.write_text("keep\n")
    assert add_user(path, user, "pw") == 1
    assert path.read_text() == "keep\n"
    assert "cserver-passwd:" in capsys.readouterr().err


def test_passwd_prompts_twice(tmp_path):
    """Without --stdin the password is asked twice (getpass); a mismatch or an
    empty password changes nothing."""
    path = tmp_path / "hashes"
    answers = iter(["pw", "pw", "a", "b", "", ""])
    prompts = []

    def prompt(text):
        prompts.append(text)
        return next(answers)

    argv = [str(path), "alice", "--scrypt-n", str(N)]
    assert passwd.main(argv, prompt=prompt) == 0
    assert len(prompts) == 2
    content = path.read_text()
    assert verify_password("pw", content.strip().split(":", 1)[1])
    assert passwd.main(argv, prompt=prompt) == 1
    assert passwd.main(argv, prompt=prompt) == 1
    assert path.read_text() == content


def no_prompt(text):
    """A getpass stand-in for runs that must stop before asking for the password."""
    raise AssertionError(f"prompted for the password: {text!r}")


def test_passwd_names_a_missing_directory_before_prompting(tmp_path, capsys):
    """A PATH in a directory that does not exist fails with one line naming the
    directory and the mkdir that fixes it, exit 1, before the password is asked
    for, and creates nothing."""
    directory = tmp_path / "etc" / "cserver"
    assert passwd.main([str(directory / "passwd"), "alice"], prompt=no_prompt) == 1
    assert capsys.readouterr().err == (
        f"cserver-passwd: the directory {directory} does not exist "
        f"(create it first: mkdir -p {directory})\n")
    assert os.listdir(tmp_path) == []


def test_passwd_refuses_a_directory_as_path_before_prompting(tmp_path, capsys):
    """A PATH that is a directory fails with one line saying so and suggesting a
    file in it, exit 1, before the password is asked for; the directory stays
    empty."""
    directory = tmp_path / "cserver"
    directory.mkdir()
    assert passwd.main([str(directory), "alice"], prompt=no_prompt) == 1
    assert capsys.readouterr().err == (
        f"cserver-passwd: {directory} is a directory, not a hash file "
        f"(name a file in it, e.g. {directory / 'passwd'})\n")
    assert os.listdir(directory) == []


@pytest.mark.parametrize("under", [["passwd"], ["cserver", "passwd"]])
def test_passwd_refuses_a_path_under_a_file_before_prompting(tmp_path, capsys, under):
    """A PATH whose directory is a file, or lies under one, fails with one line
    naming that file, exit 1, before the password is asked for; the file is
    untouched."""
    (tmp_path / "etc").write_text("keep\n")
    path = tmp_path.joinpath("etc", *under)
    assert passwd.main([str(path), "alice"], prompt=no_prompt) == 1
    assert capsys.readouterr().err == (
        f"cserver-passwd: {tmp_path / 'etc'} is not a directory\n")
    assert (tmp_path / "etc").read_text() == "keep\n"


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


def test_passwd_names_the_directory_when_the_temporary_file_fails(tmp_path, monkeypatch,
                                                                 capsys):
    """If making the temporary file fails after the checks passed (the directory
    changed meanwhile, a read-only mount...), the one line names the directory and
    the reason, never the temporary file's name."""
    def refuse(**kwargs):
        raise PermissionError(13, "Permission denied",
                              os.path.join(kwargs["dir"], ".cserver-passwd-x1y2"))

    monkeypatch.setattr(passwd.tempfile, "mkstemp", refuse)
    assert add_user(tmp_path / "passwd", "alice", "pw") == 1
    assert capsys.readouterr().err == (
        f"cserver-passwd: cannot create a file in the directory {tmp_path}: "
        "Permission denied\n")
    assert os.listdir(tmp_path) == []


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


def test_plugin_is_found_by_strcred(tmp_path):
    """strcred finds the hashfile checker factory, and hashfile:PATH makes a
    HashFileChecker on that path."""
    factory = strcred.findCheckerFactory("hashfile")
    assert factory.authType == "hashfile"
    path = tmp_path / "hashes"
    path.write_text("")
    checker = strcred.makeChecker(f"hashfile:{path}")
    assert isinstance(checker, HashFileChecker) and checker.path == str(path)


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
