"""Unit tests for the hashed password store: cserver.hashfile's hashes and
checker (with an injected thread runner), the hashfile: cred plugin, and
cserver-passwd run in-process on temporary files; no real socket or process.
``python -m cserver.passwd``, a directory made unwritable with chattr, and a real
``twistd cserver --auth hashfile:PATH`` are tested in the end-to-end layer,
tests/e2e/test_hashfile.py."""

import io
import os
import pathlib
import stat
import sys

from twisted.cred import strcred
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from cserver import fs, hashfile, passwd
from cserver.auth import IUser, password_portal
from cserver.hashfile import BadHash, HashFileChecker, ScryptHash, hash_password, verify_password

from .base import Temporary

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


def no_prompt(text):
    """A getpass stand-in for runs that must stop before asking for the password."""
    raise AssertionError(f"prompted for the password: {text!r}")


class Files(Temporary):
    """``self.tmp_path()``: a new empty directory as a pathlib.Path (what pytest's
    tmp_path gave); ``self.capture()``: sys.stdout and sys.stderr replaced, for the
    rest of the test, by StringIOs it returns (what pytest's capsys gave)."""

    def tmp_path(self):
        return pathlib.Path(self.temp_dir())

    def capture(self):
        stdout, stderr = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", stdout)
        self.patch(sys, "stderr", stderr)
        return stdout, stderr


class HashTests(SynchronousTestCase):
    """The scrypt hashes: their format, verification, the RFC vector, bad hashes."""

    def test_hash_format_and_verification(self):
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

    def test_known_scrypt_vector(self):
        """The hash is RFC 7914's scrypt (its test vector with n=16, r=1, p=1)."""
        expected = bytes.fromhex(
            "77d6576238657b203b19ca42c18a0497f16b4844e3074ae8dfdffa3fede21442"
            "fcd0069ded0948f8326a753a0fc81f17e8d3e0fb2e0d3628cf35e20c38d18906"
        )
        assert ScryptHash(16, 1, 1, b"x", expected).derive(b"") != expected  # salt matters
        assert ScryptHash(16, 1, 1, b"", expected).derive(b"") == expected

    def test_bad_hashes_are_refused(self):
        """Malformed hashes, odd n, unknown parameters or huge memory needs are BadHash
        (each of the hashes below)."""
        for bad in ["plain", "md5$x$y$z", "scrypt$n=16,r=8$c2FsdA==$a2V5",
                    "scrypt$n=15,r=8,p=1$c2FsdA==$a2V5", "scrypt$n=16,r=8,p=1$!!$a2V5",
                    "scrypt$n=16,r=8,p=1,q=2$c2FsdA==$a2V5",
                    "scrypt$n=1073741824,r=8,p=1$c2FsdA==$a2V5"]:
            # Were BadHash not raised, the failure would show the ScryptHash parsed.
            with self.assertRaises(BadHash):
                ScryptHash.parse(bad)


class CheckerTests(Files, SynchronousTestCase):
    """HashFileChecker: who it lets in, what a login costs, where the hash runs,
    reloading the file, and through cserver's password portal."""

    def test_checker_accepts_right_password_str_or_bytes(self):
        """The right password logs in, as str or bytes; the avatar id is the str name."""
        path = self.tmp_path() / "hashes"
        write_hashes(path, alice="pw one", bob="sécret")
        checker = HashFileChecker(path, run_in_thread=inline)
        assert result_of(checker.requestAvatarId(UsernamePassword("alice", "pw one"))) == "alice"
        assert result_of(checker.requestAvatarId(
            UsernamePassword(b"bob", "sécret".encode()))) == "bob"

    def test_wrong_password_and_unknown_user_are_unauthorized(self):
        """A wrong password and an unknown user both fail with UnauthorizedLogin, and
        both cost one hash (the unknown user's against a dummy)."""
        path = self.tmp_path() / "hashes"
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

    def test_hash_runs_in_the_thread_runner(self):
        """The hash runs through the injected thread runner, not inline: until the
        runner's Deferred fires, the login has no result."""
        path = self.tmp_path() / "hashes"
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

    def test_default_runner_is_defer_to_thread(self):
        """Without an injected runner the hash goes to twisted's deferToThread
        (the reactor's thread pool)."""
        path = self.tmp_path() / "hashes"
        write_hashes(path, alice="pw")
        seen = []

        def spy(f, *args):
            seen.append(f)
            return defer.succeed(f(*args))

        self.patch(hashfile, "deferToThread", spy)
        checker = HashFileChecker(path)
        assert result_of(checker.requestAvatarId(UsernamePassword("alice", "pw"))) == "alice"
        assert len(seen) == 1 and seen[0].__name__ == "matches"

    def test_reloads_after_cserver_passwd(self):
        """The checker sees users added and passwords changed by cserver-passwd without a
        restart."""
        self.capture()
        path = self.tmp_path() / "hashes"
        assert add_user(path, "alice", "old") == 0
        checker = HashFileChecker(path, run_in_thread=inline)

        def login(u, p):
            return result_of(checker.requestAvatarId(UsernamePassword(u, p)))

        assert login("alice", "old") == "alice"
        assert login("bob", "b").check(UnauthorizedLogin)
        assert add_user(path, "bob", "b") == 0
        assert add_user(path, "alice", "new") == 0
        assert login("bob", "b") == "bob"
        assert login("alice", "new") == "alice"
        assert login("alice", "old").check(UnauthorizedLogin)

    def test_missing_or_malformed_file_lets_nobody_in(self):
        """No file means no users; malformed lines are skipped, good ones still count."""
        path = self.tmp_path() / "hashes"
        checker = HashFileChecker(path, run_in_thread=inline)
        assert result_of(checker.requestAvatarId(UsernamePassword("alice", "pw"))).check(
            UnauthorizedLogin)
        path.write_text(f"# comment\n\nalice:pw\nbob\ncarol:{hash_password('c', n=N)}\n")
        assert result_of(checker.requestAvatarId(UsernamePassword("alice", "pw"))).check(
            UnauthorizedLogin)
        assert result_of(checker.requestAvatarId(UsernamePassword("carol", "c"))) == "carol"

    def test_through_the_server_portal(self):
        """Through cserver's password portal (which wraps checkers in
        TextOrBytesChecker) the right password gives an IUser, a wrong one fails."""
        path = self.tmp_path() / "hashes"
        write_hashes(path, alice="pw")
        portal = password_portal([HashFileChecker(path, run_in_thread=inline)])
        ok = result_of(portal.login(UsernamePassword("alice", "pw"), None, IUser))
        assert ok[1].name == "alice"
        bad = result_of(portal.login(UsernamePassword("alice", "x"), None, IUser))
        assert bad.check(UnauthorizedLogin)


class PluginTests(Files, SynchronousTestCase):
    """The hashfile: cred plugin, as strcred finds it."""

    def test_plugin_is_found_by_strcred(self):
        """strcred finds the hashfile checker factory, and hashfile:PATH makes a
        HashFileChecker on that path."""
        factory = strcred.findCheckerFactory("hashfile")
        assert factory.authType == "hashfile"
        path = self.tmp_path() / "hashes"
        path.write_text("")
        checker = strcred.makeChecker(f"hashfile:{path}")
        assert isinstance(checker, HashFileChecker) and checker.path == str(path)


class PasswdTests(Files, SynchronousTestCase):
    """cserver-passwd on a file: adding and changing users, the file's mode, bad user
    names, the password prompt."""

    def test_passwd_adds_changes_and_keeps_others(self):
        """cserver-passwd adds a user, changes one in place, and keeps every other
        line (comments included) as it was."""
        stdout, _stderr = self.capture()
        path = self.tmp_path() / "hashes"
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
        out = stdout.getvalue()
        assert "added alice" in out and "changed alice" in out

    def test_passwd_file_mode_and_no_plaintext(self):
        """The file is 0600, even if it was world-readable, has no leftover
        temporary file, and never holds the plaintext password."""
        self.capture()
        tmp_path = self.tmp_path()
        path = tmp_path / "hashes"
        path.write_text("")
        path.chmod(0o644)
        assert add_user(path, "alice", "plaintext-pw") == 0
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert b"plaintext-pw" not in path.read_bytes()
        assert os.listdir(tmp_path) == ["hashes"]

    def test_passwd_refuses_bad_user_names(self):
        """User names with ':' or whitespace (or none) are refused; the file is untouched
        (each of the names below)."""
        for user in ["a:b", "a b", "tab\there", "", "new\nline"]:
            _stdout, stderr = self.capture()
            path = self.tmp_path() / "hashes"
            path.write_text("keep\n")
            assert add_user(path, user, "pw") == 1, repr(user)
            assert path.read_text() == "keep\n", repr(user)
            assert "cserver-passwd:" in stderr.getvalue(), repr(user)

    def test_passwd_prompts_twice(self):
        """Without --stdin the password is asked twice (getpass); a mismatch or an
        empty password changes nothing."""
        self.capture()
        path = self.tmp_path() / "hashes"
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


class PasswdPathTests(Files, SynchronousTestCase):
    """cserver-passwd's PATH: each way it can be unusable is one line on stderr and
    exit 1, said before the password is asked for, with nothing created."""

    def test_passwd_names_a_missing_directory_before_prompting(self):
        """A PATH in a directory that does not exist fails with one line naming the
        directory and the mkdir that fixes it, exit 1, before the password is asked
        for, and creates nothing."""
        _stdout, stderr = self.capture()
        tmp_path = self.tmp_path()
        directory = tmp_path / "etc" / "cserver"
        assert passwd.main([str(directory / "passwd"), "alice"], prompt=no_prompt) == 1
        assert stderr.getvalue() == (
            f"cserver-passwd: the directory {directory} does not exist "
            f"(create it first: mkdir -p {directory})\n")
        assert os.listdir(tmp_path) == []

    def test_passwd_refuses_a_directory_as_path_before_prompting(self):
        """A PATH that is a directory fails with one line saying so and suggesting a
        file in it, exit 1, before the password is asked for; the directory stays
        empty."""
        _stdout, stderr = self.capture()
        directory = self.tmp_path() / "cserver"
        directory.mkdir()
        assert passwd.main([str(directory), "alice"], prompt=no_prompt) == 1
        assert stderr.getvalue() == (
            f"cserver-passwd: {directory} is a directory, not a hash file "
            f"(name a file in it, e.g. {directory / 'passwd'})\n")
        assert os.listdir(directory) == []

    def test_passwd_refuses_a_path_under_a_file_before_prompting(self):
        """A PATH whose directory is a file, or lies under one, fails with one line
        naming that file, exit 1, before the password is asked for; the file is
        untouched (each of the two PATHs)."""
        for under in (["passwd"], ["cserver", "passwd"]):
            _stdout, stderr = self.capture()
            tmp_path = self.tmp_path()
            (tmp_path / "etc").write_text("keep\n")
            path = tmp_path.joinpath("etc", *under)
            assert passwd.main([str(path), "alice"], prompt=no_prompt) == 1, under
            assert stderr.getvalue() == (
                f"cserver-passwd: {tmp_path / 'etc'} is not a directory\n"), under
            assert (tmp_path / "etc").read_text() == "keep\n", under

    def test_passwd_names_the_directory_when_the_temporary_file_fails(self):
        """If making the temporary file fails after the checks passed (the directory
        changed meanwhile, a read-only mount...), the one line names the directory and
        the reason, never the temporary file's name."""
        _stdout, stderr = self.capture()
        tmp_path = self.tmp_path()

        def refuse(**kwargs):
            raise PermissionError(13, "Permission denied",
                                  os.path.join(kwargs["dir"], ".cserver-passwd-x1y2"))

        self.patch(fs.tempfile, "mkstemp", refuse)
        assert add_user(tmp_path / "passwd", "alice", "pw") == 1
        assert stderr.getvalue() == (
            f"cserver-passwd: cannot create a file in the directory {tmp_path}: "
            "Permission denied\n")
        assert os.listdir(tmp_path) == []
