"""A hashed password store: ``--auth hashfile:PATH``.

The file has one ``user:hash`` line per user (blank lines and ``#``
comments are skipped), each hash an scrypt one that carries its own
parameters and random salt::

    alice:scrypt$n=16384,r=8,p=1$<salt, base64>$<key, base64>

``cserver-passwd PATH USER`` (:mod:`cserver.passwd`) writes it.  The
checker re-reads the file when it changes, and runs scrypt -- slow on
purpose -- in a thread, never on the reactor's; an unknown user costs the
same hash, against a dummy, as a known one, and keys are compared with
:func:`hmac.compare_digest`.
"""

import base64
import hashlib
import hmac
import os
import secrets

import attrs
from twisted.cred import error
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.internet import defer
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from zope.interface import implementer

from cserver.auth import as_text

#: scrypt's defaults for new hashes: about 16 MiB and 50 ms each.
DEFAULT_N = 16384
DEFAULT_R = 8
DEFAULT_P = 1
SALT_BYTES = 16
KEY_BYTES = 32
#: A hash whose parameters need more memory than this is refused, so a
#: mistyped or hostile line cannot exhaust the server's memory.
MAX_MEMORY = 256 * 1024 * 1024
SCHEME = "scrypt"


class BadHash(ValueError):
    """
    A hash string that is not ``scrypt$n=N,r=R,p=P$<salt>$<key>``.
    """


@attrs.frozen
class ScryptHash:
    """
    A parsed scrypt hash: the parameters, the salt and the derived key.
    """

    n: int
    r: int
    p: int
    salt: bytes
    key: bytes

    @classmethod
    def parse(cls, text):
        """
        Parse ``scrypt$n=N,r=R,p=P$<salt b64>$<key b64>``; raise
        :class:`BadHash` for anything else.
        """
        parts = text.strip().split("$")
        if len(parts) != 4 or parts[0] != SCHEME:
            raise BadHash(f"not {SCHEME}$<parameters>$<salt>$<key>")
        try:
            params = dict(item.split("=", 1) for item in parts[1].split(","))
            n, r, p = int(params.pop("n")), int(params.pop("r")), int(params.pop("p"))
        except (KeyError, ValueError):
            raise BadHash("the parameters are not n=N,r=R,p=P") from None
        if params:
            raise BadHash(f"unknown parameters {', '.join(sorted(params))}")
        check_parameters(n, r, p)
        try:
            salt = base64.b64decode(parts[2], validate=True)
            key = base64.b64decode(parts[3], validate=True)
        except ValueError:
            raise BadHash("the salt or key is not base64") from None
        if not salt or not key:
            raise BadHash("an empty salt or key")
        return cls(n, r, p, salt, key)

    def format(self):
        """
        The hash string: the inverse of :meth:`parse`.
        """
        salt = base64.b64encode(self.salt).decode("ascii")
        key = base64.b64encode(self.key).decode("ascii")
        return f"{SCHEME}$n={self.n},r={self.r},p={self.p}${salt}${key}"

    def derive(self, password):
        """
        The key that ``password`` (bytes) gives with this hash's parameters
        and salt.  Slow on purpose: call it off the reactor thread.
        """
        return _scrypt(password, self.salt, self.n, self.r, self.p, len(self.key))

    def matches(self, password):
        """
        Whether ``password`` (bytes) gives this hash's key; constant-time
        comparison.
        """
        return hmac.compare_digest(self.derive(password), self.key)

    def dummy(self):
        """
        A hash with the same parameters and a fresh random salt and key,
        which no password matches in practice: unknown users are hashed
        against it so that they cost as much time as known ones.
        """
        return attrs.evolve(
            self, salt=secrets.token_bytes(len(self.salt)), key=secrets.token_bytes(len(self.key))
        )


def check_parameters(n, r, p):
    """
    Raise :class:`BadHash` unless ``n`` is a power of 2 above 1, ``r`` and
    ``p`` are at least 1, and the memory they need is at most
    :data:`MAX_MEMORY`.
    """
    if n < 2 or n & (n - 1):
        raise BadHash(f"n={n} is not a power of 2 above 1")
    if r < 1 or p < 1:
        raise BadHash("r and p must be at least 1")
    if _memory(n, r, p) > MAX_MEMORY:
        raise BadHash(f"n={n},r={r},p={p} needs more than {MAX_MEMORY} bytes")


def _memory(n, r, p):
    return 128 * r * (n + p + 2)


def _scrypt(password, salt, n, r, p, length):
    return hashlib.scrypt(
        password, salt=salt, n=n, r=r, p=p, dklen=length, maxmem=_memory(n, r, p) + 1024 * 1024
    )


def hash_password(password, n=DEFAULT_N, r=DEFAULT_R, p=DEFAULT_P, salt=None):
    """
    The hash string of ``password`` (str or bytes) with a random salt (or
    ``salt``).
    """
    check_parameters(n, r, p)
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    password = _bytes(password)
    return ScryptHash(n, r, p, salt, _scrypt(password, salt, n, r, p, KEY_BYTES)).format()


def verify_password(password, hashed):
    """
    Whether ``password`` (str or bytes) matches the hash string ``hashed``.
    Slow on purpose: call it off the reactor thread.
    """
    return ScryptHash.parse(hashed).matches(_bytes(password))


def parse_lines(text):
    """
    The ``user: hash string`` dict of a hash file's text, and a list of
    ``(line number, reason)`` for the lines that were skipped.
    """
    users, bad = {}, []
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        user, colon, hashed = stripped.partition(":")
        if not colon or not user:
            bad.append((number, "not user:hash"))
            continue
        try:
            users[user] = ScryptHash.parse(hashed)
        except BadHash as e:
            bad.append((number, str(e)))
    return users, bad


def _bytes(value):
    return value.encode("utf-8") if isinstance(value, str) else value


def _default_run_in_thread(f, *args):
    return deferToThread(f, *args)


#: The dummy's parameters while the file has no hash to copy them from.
_DEFAULT_DUMMY = ScryptHash(DEFAULT_N, DEFAULT_R, DEFAULT_P, b"\0" * SALT_BYTES, b"\0" * KEY_BYTES)


@implementer(ICredentialsChecker)
class HashFileChecker:
    """
    Check :class:`IUsernamePassword` credentials (str or bytes) against a
    hash file, re-read whenever its inode, size or mtime change.

    :param path: the hash file.
    :param run_in_thread: ``f(function, *args) -> Deferred`` that runs the
        hash away from the reactor thread (default:
        :func:`twisted.internet.threads.deferToThread`).
    """

    credentialInterfaces = (IUsernamePassword,)
    #: Takes str and bytes alike: wrapping it in auth.TextOrBytesChecker,
    #: which retries a refused login as bytes, would hash a wrong password twice.
    accepts_text_or_bytes = True
    log = Logger()

    def __init__(self, path, run_in_thread=_default_run_in_thread):
        self.path = os.fspath(path)
        self.run_in_thread = run_in_thread
        self._users = {}
        self._dummy = _DEFAULT_DUMMY.dummy()
        self._stamp = None

    def users(self):
        """
        The current ``user: ScryptHash`` dict, re-reading the file first if
        it changed.  A file that cannot be read gives no users.
        """
        try:
            st = os.stat(self.path)
            stamp = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        except OSError as e:
            stamp = ("missing", e.errno)
        if stamp != self._stamp:
            self._load(stamp)
        return self._users

    def _load(self, stamp):
        try:
            with open(self.path, "rb") as f:
                text = f.read().decode("utf-8")
        except (OSError, UnicodeDecodeError) as e:
            if self._stamp != stamp:
                self.log.error("cannot read the hash file {path}: {error}; no one can log in",
                               path=self.path, error=e)
            users, bad = {}, []
        else:
            users, bad = parse_lines(text)
        for number, reason in bad:
            self.log.warn("{path}, line {number}: skipped ({reason})",
                          path=self.path, number=number, reason=reason)
        self._users, self._stamp = users, stamp
        if users:
            # Unknown users cost what the first known user costs.
            self._dummy = next(iter(users.values())).dummy()

    def requestAvatarId(self, credentials):
        try:
            user = as_text(credentials.username)
            password = _bytes(credentials.password)
        except UnicodeDecodeError:
            user, password = None, b""
        known = self.users().get(user) if user is not None else None
        target = known if known is not None else self._dummy
        d = defer.maybeDeferred(self.run_in_thread, target.matches, password)

        def decide(matched):
            if matched and known is not None:
                return user
            raise error.UnauthorizedLogin("wrong user or password")

        return d.addCallback(decide)
