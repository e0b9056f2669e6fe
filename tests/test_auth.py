"""Tests for cserver.auth: allow-list and password checkers through a Portal."""

import pytest
from twisted.cred import strcred
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin

from cserver.auth import (
    IUser,
    Username,
    allow_list_portal,
    credentials_for,
    immediate_checker,
    password_portal,
)


def login(portal, credentials):
    """The user name a login gives, or the failure it raises (synchronous checkers)."""
    results = []
    portal.login(credentials, None, IUser).addBoth(results.append)
    [result] = results
    if isinstance(result, tuple):
        return result[1].name
    return result


def test_allow_list_accepts_listed_names():
    """The default portal accepts exactly the names on its list."""
    portal = allow_list_portal(["alice", "bob"])
    assert login(portal, Username("alice")) == "alice"
    assert login(portal, Username("carol")).check(UnauthorizedLogin)


def test_allow_list_portal_has_an_immediate_check_that_agrees_with_login():
    """The allow-list portal offers a check that answers at once, and it accepts and
    refuses the names its Portal login does; password portals offer none."""
    portal = allow_list_portal(["alice", "bob"])
    check = immediate_checker(portal)
    for name in ("alice", "bob", "carol", "Alice", ""):
        result = login(portal, Username(name))
        expected = result if isinstance(result, str) else None
        assert check(Username(name)) == expected
    assert immediate_checker(password_portal([strcred.makeChecker("memory:alice:pw")])) is None


def test_allow_list_credentials_ignore_password():
    """Against an allow-list, AUTH's optional password is not needed."""
    interfaces = allow_list_portal(["alice"]).listCredentialsInterfaces()
    assert credentials_for(interfaces, "alice", None) == Username("alice")
    assert credentials_for(interfaces, "alice", "anything") == Username("alice")


def test_password_portal_needs_password():
    """Against password checkers, no password means no credentials."""
    portal = password_portal([strcred.makeChecker("memory:alice:pw")])
    interfaces = portal.listCredentialsInterfaces()
    assert credentials_for(interfaces, "alice", None) is None
    assert isinstance(credentials_for(interfaces, "alice", "pw"), UsernamePassword)


def test_memory_checker_stores_text():
    """memory: (str usernames and passwords) checks the right password, refuses the wrong one."""
    portal = password_portal([strcred.makeChecker("memory:alice:pw:bob:x")])
    assert login(portal, UsernamePassword("alice", "pw")) == "alice"
    assert login(portal, UsernamePassword("bob", "x")) == "bob"
    assert login(portal, UsernamePassword("alice", "x")).check(UnauthorizedLogin)


def test_file_checker_stores_bytes(tmp_path):
    """file: (bytes from the file) works with the str credentials the protocol makes."""
    path = tmp_path / "passwd"
    path.write_text("alice:pw\ncarol:sécret\n", encoding="utf-8")
    portal = password_portal([strcred.makeChecker(f"file:{path}")])
    assert login(portal, UsernamePassword("alice", "pw")) == "alice"
    assert login(portal, UsernamePassword("carol", "sécret")) == "carol"
    assert login(portal, UsernamePassword("alice", "nope")).check(UnauthorizedLogin)
    assert login(portal, UsernamePassword("mallory", "pw")).check(UnauthorizedLogin)


@pytest.mark.parametrize("name", ["alice", "bob"])
def test_avatar_name_is_text(name):
    """The avatar's name is always str, whatever the checker returned."""
    portal = password_portal([strcred.makeChecker("memory:alice:pw:bob:pw")])
    result = login(portal, UsernamePassword(name, "pw"))
    assert isinstance(result, str) and result == name


def test_password_checks_compare_in_constant_time(monkeypatch):
    """The stock checkers' password comparison goes through hmac.compare_digest."""
    import hmac

    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: calls.append((a, b)) or real(a, b))
    portal = password_portal([strcred.makeChecker("memory:alice:pw")])
    assert login(portal, UsernamePassword("alice", "pw")) == "alice"
    assert login(portal, UsernamePassword("alice", "nope")).check(UnauthorizedLogin)
    assert (b"pw", b"pw") in calls and (b"nope", b"pw") in calls
