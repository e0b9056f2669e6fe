"""Unit tests for cserver.auth: allow-list and password checkers through a Portal.
A real server with several --auth checkers is tested in the end-to-end layer,
tests/e2e/test_auth.py."""

import pathlib

from twisted.cred import strcred
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword, UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from cserver.auth import (
    IUser,
    Username,
    allow_list_portal,
    credentials_for,
    immediate_checker,
    password_portal,
)

from .base import Temporary


def login(portal, credentials):
    """The user name a login gives, or the failure it raises (synchronous checkers)."""
    results = []
    portal.login(credentials, None, IUser).addBoth(results.append)
    [result] = results
    if isinstance(result, tuple):
        return result[1].name
    return result



class AllowListTests(SynchronousTestCase):
    """The allow-list portal: listed names, its immediate check, no password."""

    def test_allow_list_accepts_listed_names(self):
        """The default portal accepts exactly the names on its list."""
        portal = allow_list_portal(["alice", "bob"])
        assert login(portal, Username("alice")) == "alice"
        assert login(portal, Username("carol")).check(UnauthorizedLogin)

    def test_allow_list_portal_has_an_immediate_check_that_agrees_with_login(self):
        """The allow-list portal offers a check that answers at once, and it accepts and
        refuses the names its Portal login does; password portals offer none."""
        portal = allow_list_portal(["alice", "bob"])
        check = immediate_checker(portal)
        for name in ("alice", "bob", "carol", "Alice", ""):
            result = login(portal, Username(name))
            expected = result if isinstance(result, str) else None
            assert check(Username(name)) == expected
        assert immediate_checker(password_portal([strcred.makeChecker("memory:alice:pw")])) is None

    def test_allow_list_credentials_ignore_password(self):
        """Against an allow-list, AUTH's optional password is not needed."""
        interfaces = allow_list_portal(["alice"]).listCredentialsInterfaces()
        assert credentials_for(interfaces, "alice", None) == Username("alice")
        assert credentials_for(interfaces, "alice", "anything") == Username("alice")


class PasswordCheckerTests(Temporary, SynchronousTestCase):
    """Password checkers: memory:, file:, text avatars, constant-time comparison."""

    def test_password_portal_needs_password(self):
        """Against password checkers, no password means no credentials."""
        portal = password_portal([strcred.makeChecker("memory:alice:pw")])
        interfaces = portal.listCredentialsInterfaces()
        assert credentials_for(interfaces, "alice", None) is None
        assert isinstance(credentials_for(interfaces, "alice", "pw"), UsernamePassword)

    def test_memory_checker_stores_text(self):
        """memory: (str usernames and passwords) checks the right password, refuses the wrong
        one."""
        portal = password_portal([strcred.makeChecker("memory:alice:pw:bob:x")])
        assert login(portal, UsernamePassword("alice", "pw")) == "alice"
        assert login(portal, UsernamePassword("bob", "x")) == "bob"
        assert login(portal, UsernamePassword("alice", "x")).check(UnauthorizedLogin)

    def test_file_checker_stores_bytes(self):
        """file: (bytes from the file) works with the str credentials the protocol makes."""
        path = pathlib.Path(self.temp_dir()) / "passwd"
        path.write_text("alice:pw\ncarol:sécret\n", encoding="utf-8")
        portal = password_portal([strcred.makeChecker(f"file:{path}")])
        assert login(portal, UsernamePassword("alice", "pw")) == "alice"
        assert login(portal, UsernamePassword("carol", "sécret")) == "carol"
        assert login(portal, UsernamePassword("alice", "nope")).check(UnauthorizedLogin)
        assert login(portal, UsernamePassword("mallory", "pw")).check(UnauthorizedLogin)

    def test_avatar_name_is_text(self):
        """The avatar's name is always str, whatever the checker returned."""
        for name in ("alice", "bob"):
            portal = password_portal([strcred.makeChecker("memory:alice:pw:bob:pw")])
            result = login(portal, UsernamePassword(name, "pw"))
            assert isinstance(result, str) and result == name, name

    def test_password_checks_compare_in_constant_time(self):
        """The stock checkers' password comparison goes through hmac.compare_digest."""
        import hmac

        calls = []
        real = hmac.compare_digest
        self.patch(hmac, "compare_digest", lambda a, b: calls.append((a, b)) or real(a, b))
        portal = password_portal([strcred.makeChecker("memory:alice:pw")])
        assert login(portal, UsernamePassword("alice", "pw")) == "alice"
        assert login(portal, UsernamePassword("alice", "nope")).check(UnauthorizedLogin)
        assert (b"pw", b"pw") in calls and (b"nope", b"pw") in calls


class SeveralCheckersTests(Temporary, SynchronousTestCase):
    """Several --auth checkers: the users of any one are accepted."""

    def test_two_memory_checkers_both_apply(self):
        """--auth memory:... twice: the users of either are accepted (each with its own
        password), not only the last checker's."""
        portal = password_portal([strcred.makeChecker("memory:alice:pw"),
                                  strcred.makeChecker("memory:bob:x")])
        assert login(portal, UsernamePassword("alice", "pw")) == "alice"
        assert login(portal, UsernamePassword("bob", "x")) == "bob"
        assert login(portal, UsernamePassword("bob", "pw")).check(UnauthorizedLogin)
        assert login(portal, UsernamePassword("carol", "pw")).check(UnauthorizedLogin)

    def test_memory_and_file_checkers_both_apply(self):
        """--auth memory:... and --auth file:...: users of either are accepted, in either
        order."""
        path = pathlib.Path(self.temp_dir()) / "passwd"
        path.write_text("carol:sécret\n", encoding="utf-8")
        for checkers in (["memory:alice:pw", f"file:{path}"], [f"file:{path}", "memory:alice:pw"]):
            portal = password_portal([strcred.makeChecker(c) for c in checkers])
            assert login(portal, UsernamePassword("alice", "pw")) == "alice"
            assert login(portal, UsernamePassword("carol", "sécret")) == "carol"
            assert login(portal, UsernamePassword("carol", "pw")).check(UnauthorizedLogin)

    def test_memory_and_hashfile_checkers_both_apply(self):
        """--auth memory:... and --auth hashfile:...: users of either are accepted."""
        from cserver.hashfile import HashFileChecker, hash_password

        path = pathlib.Path(self.temp_dir()) / "hashes"
        path.write_text(f"dave:{hash_password('d', n=16)}\n")
        portal = password_portal([strcred.makeChecker("memory:alice:pw"),
                                  HashFileChecker(str(path), run_in_thread=lambda f, *a:
                                                  defer.maybeDeferred(f, *a))])
        assert login(portal, UsernamePassword("alice", "pw")) == "alice"
        assert login(portal, UsernamePassword("dave", "d")) == "dave"
        assert login(portal, UsernamePassword("dave", "pw")).check(UnauthorizedLogin)

    def test_a_failing_checker_does_not_stop_the_others(self):
        """A checker failing unexpectedly (an unreadable file...) does not keep the next one
        from accepting; when none accepts, that unexpected failure is the result."""

        @implementer(ICredentialsChecker)
        class Broken:
            credentialInterfaces = (IUsernamePassword,)
            accepts_text_or_bytes = True

            def requestAvatarId(self, credentials):
                return defer.fail(OSError("cannot read"))

        portal = password_portal([Broken(), strcred.makeChecker("memory:alice:pw")])
        assert login(portal, UsernamePassword("alice", "pw")) == "alice"
        assert login(portal, UsernamePassword("alice", "no")).check(OSError)


class DescribeCheckersTests(SynchronousTestCase):
    """What the start log says of the checkers."""

    def test_the_start_log_says_how_auth_is_checked_never_a_password(self):
        """describe_checkers names the allow-list's users, or each --auth checker's type and
        its file or user names; a memory: checker's passwords never appear."""
        from cserver.auth import describe_checkers

        assert describe_checkers(None, ["alice", "bob"]) == (
            "AUTH <user> for the names in --users: alice, bob (no password)")
        text = describe_checkers(["memory:alice:s3cret:bob:hunter2", "file:/etc/pw",
                                  "hashfile:/etc/cserver/passwd", "unix"], [])
        assert text == ("AUTH <user> <password>, accepted when any of these accepts: "
                        "memory (users alice, bob); file /etc/pw; hashfile /etc/cserver/passwd; "
                        "unix")
        assert "s3cret" not in text and "hunter2" not in text
