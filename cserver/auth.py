"""Authentication through twisted.cred: credentials, checkers and the realm.

Two ways to log in, chosen by the server's options:

- the seed's model (the default): ``AUTH <user>`` succeeds when ``<user>``
  is in an allow-list -- :class:`Username` credentials checked by
  :class:`AllowListChecker`;
- ``--auth`` checkers (``memory:``, ``file:``, ...): ``AUTH <user>
  <password>`` as ``IUsernamePassword`` credentials.  The stock checkers
  disagree on str and bytes (``memory:`` keeps str, ``file:`` bytes), so each
  one is wrapped in :class:`TextOrBytesChecker`.
"""

import hmac

import attrs
from twisted.cred import error
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import ICredentials, IUsernamePassword, UsernamePassword
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface, implementer


class IUsername(ICredentials):
    """
    A user name alone, for servers that trust an allow-list of names.
    """

    username = Attribute("The user name, a str.")


@implementer(IUsername)
@attrs.define
class Username:
    """
    Credentials that name a user and prove nothing else.
    """

    username: str


class IUser(Interface):
    """
    The avatar of an authenticated client.
    """

    name = Attribute("The user name, a str.")


@implementer(IUser)
@attrs.define
class User:
    """
    An authenticated user.
    """

    name: str


@implementer(ICredentialsChecker)
@attrs.frozen
class AllowListChecker:
    """
    Accept :class:`IUsername` credentials whose name is in ``users``.
    """

    users: frozenset = attrs.field(converter=frozenset)
    credentialInterfaces = (IUsername,)

    def check(self, credentials):
        """
        The avatar id ``requestAvatarId`` would give, at once: the name, or
        None for a name not in the list.
        """
        name = credentials.username
        return name if name in self.users else None

    def requestAvatarId(self, credentials):
        name = self.check(credentials)
        if name is None:
            return defer.fail(error.UnauthorizedLogin("unknown user"))
        return defer.succeed(name)


@implementer(ICredentialsChecker)
@attrs.frozen
class TextOrBytesChecker:
    """
    Give a password checker the username and password as str, and if it
    refuses them, as UTF-8 bytes: stock checkers store one or the other.
    """

    checker: object
    credentialInterfaces = (IUsernamePassword,)

    @defer.inlineCallbacks
    def requestAvatarId(self, credentials):
        as_str = ConstantTimeUsernamePassword(
            as_text(credentials.username), as_text(credentials.password)
        )
        try:
            avatar_id = yield self.checker.requestAvatarId(as_str)
        except error.UnauthorizedLogin:
            as_bytes = ConstantTimeUsernamePassword(
                as_str.username.encode("utf-8"), as_str.password.encode("utf-8")
            )
            avatar_id = yield self.checker.requestAvatarId(as_bytes)
        return as_text(avatar_id)


class ConstantTimeUsernamePassword(UsernamePassword):
    """
    Username and password credentials whose ``checkPassword`` -- which the
    stock ``memory:`` and ``file:`` checkers call with the stored password --
    compares in constant time.
    """

    def checkPassword(self, password):
        mine, theirs = self.password, password
        if isinstance(mine, str):
            mine = mine.encode("utf-8")
        if isinstance(theirs, str):
            theirs = theirs.encode("utf-8")
        return hmac.compare_digest(mine, theirs)


def as_text(value: str | bytes) -> str:
    """
    A cred value as str: ``memory:`` checkers hold str and ``file:`` ones
    bytes (twisted#12558); both are UTF-8.
    """
    return value.decode("utf-8") if isinstance(value, bytes) else value


@implementer(IRealm)
class UserRealm:
    """
    Every authenticated name is an :class:`IUser` with that name.
    """

    def requestAvatar(self, avatarId, mind, *interfaces):
        if IUser not in interfaces:
            raise NotImplementedError("cserver's realm only gives IUser avatars")
        return IUser, User(as_text(avatarId)), lambda: None


def allow_list_portal(users):
    """
    The default portal: any name in ``users``, no password.
    """
    return Portal(UserRealm(), [AllowListChecker(users)])


def immediate_checker(portal):
    """
    The ``check(credentials)`` of the portal's only checker when it answers
    at once and the realm is :class:`UserRealm` (the allow-list portal): the
    protocol then logs in without the Portal's Deferreds, with the same
    result -- the avatar of an accepted name is that name.  None otherwise.
    """
    checkers = set(portal.checkers.values())
    if len(checkers) != 1 or not isinstance(portal.realm, UserRealm):
        return None
    return getattr(checkers.pop(), "check", None)


def password_portal(checkers):
    """
    A portal over ``--auth`` password checkers: a user is in when any of
    them accepts (:class:`AnyChecker`; ``--auth`` may be given more than
    once).  The stock ones are wrapped in :class:`TextOrBytesChecker`;
    checkers that take either already (``accepts_text_or_bytes``, like
    cserver's ``hashfile:``) are not -- wrapping would check a wrong
    password twice.
    """
    wrapped = [
        c if getattr(c, "accepts_text_or_bytes", False) else TextOrBytesChecker(c)
        for c in checkers
    ]
    checker = wrapped[0] if len(wrapped) == 1 else AnyChecker(wrapped)
    return Portal(UserRealm(), [checker])


@implementer(ICredentialsChecker)
@attrs.frozen
class AnyChecker:
    """
    Ask each checker in turn; the first that accepts the credentials wins.

    A Portal keeps one checker per credentials interface, so several
    ``--auth`` checkers registered one by one would leave only the last.
    A checker failing with anything but ``UnauthorizedLogin`` (an
    unreadable file...) does not stop the others; if none accepts, the
    first such failure is the result, else ``UnauthorizedLogin``.
    """

    checkers: tuple = attrs.field(converter=tuple)
    credentialInterfaces = (IUsernamePassword,)

    @defer.inlineCallbacks
    def requestAvatarId(self, credentials):
        unexpected = None
        for checker in self.checkers:
            try:
                avatar_id = yield checker.requestAvatarId(credentials)
            except error.UnauthorizedLogin:
                continue
            except Exception:
                unexpected = unexpected or Failure()
                continue
            return avatar_id
        if unexpected is not None:
            unexpected.raiseException()
        raise error.UnauthorizedLogin("no checker accepts these credentials")


def describe_checkers(descriptions, users):
    """
    How AUTH is checked, for the log at start: the ``--auth`` checkers
    (each one's type, and its file or its user names -- never a password),
    or else the allow-list of ``--users``.
    """
    if not descriptions:
        return f"AUTH <user> for the names in --users: {', '.join(users)} (no password)"
    parts = []
    for description in descriptions:
        kind, _, argument = description.partition(":")
        if kind == "memory":
            names = argument.split(":")[::2]
            parts.append(f"memory (users {', '.join(names)})")
        elif kind in ("file", "hashfile"):
            parts.append(f"{kind} {argument}")
        else:
            parts.append(kind)
    return ("AUTH <user> <password>, accepted when any of these accepts: "
            + "; ".join(parts))


def credentials_for(interfaces, user, password):
    """
    The credentials that ``AUTH user [password]`` offers a portal that takes
    ``interfaces`` (its ``listCredentialsInterfaces()``), or None when it
    needs a password that was not given.
    """
    if IUsername in interfaces:
        return Username(user)
    if password is None:
        return None
    return UsernamePassword(user, password)
