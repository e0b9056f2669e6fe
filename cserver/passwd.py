"""``cserver-passwd PATH USER``: add a user to a hash file, or change a
user's password, for ``--auth hashfile:PATH``.

The password is prompted for twice without echo, or read from the first
line of standard input with ``--stdin``.  The file is rewritten atomically
(a temporary file in the same directory, fsynced, renamed over it) with
mode 0600; the other users' lines are kept as they were.

Before the password is asked for, the destination is checked: PATH must
not be a directory, and its directory must exist and be writable; each
problem is one line on stderr and exit status 1, with nothing created.
"""

import argparse
import getpass
import os
import stat
import sys

from cserver.fs import TemporaryFileError, replace_atomically
from cserver.hashfile import DEFAULT_N, BadHash, check_parameters, hash_password


class PasswdError(Exception):
    """
    A reason to stop without changing the file.
    """


def check_user(user):
    """
    Raise :class:`PasswdError` for a user name the file or AUTH cannot hold:
    empty, or with ':' or whitespace.
    """
    if not user:
        raise PasswdError("the user name is empty")
    if ":" in user or any(c.isspace() for c in user):
        raise PasswdError(f"the user name {user!r} has ':' or whitespace")
    if not user.isprintable():
        raise PasswdError(f"the user name {user!r} has unprintable characters")


def check_destination(path):
    """
    Raise :class:`PasswdError` unless the file at ``path`` can be written the
    way :func:`write_atomically` does: ``path`` is no directory, and its
    directory exists and lets this user create files in it.
    """
    directory = os.path.dirname(os.path.abspath(path))
    try:
        is_directory = stat.S_ISDIR(os.stat(directory).st_mode)
    except FileNotFoundError:
        raise PasswdError(f"the directory {directory} does not exist "
                          f"(create it first: mkdir -p {directory})") from None
    except NotADirectoryError:
        is_directory = False
    if not is_directory:
        raise PasswdError(f"{_file_in_the_way(directory)} is not a directory")
    if os.path.isdir(path):
        raise PasswdError(f"{path} is a directory, not a hash file "
                          f"(name a file in it, e.g. {os.path.join(path, 'passwd')})")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise PasswdError(f"cannot write to the directory {directory} "
                          "(the file is replaced by a new one made there): permission denied")


def _file_in_the_way(directory):
    """
    The part of ``directory`` that exists but is a file: ``directory``
    itself, or the nearest of its parents that exists.
    """
    while not os.path.lexists(directory):
        directory = os.path.dirname(directory)
    return directory


def set_user(path, user, hashed):
    """
    Write ``user:hashed`` into the file at ``path`` -- replacing the line of
    ``user`` if there is one, else appending -- atomically, mode 0600.
    Returns True if the user was added, False if changed.
    """
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        lines = []
    entry = f"{user}:{hashed}"
    added = True
    kept = []
    for line in lines:
        name, colon, _ = line.strip().partition(":")
        if colon and name == user and not line.lstrip().startswith("#"):
            if added:
                kept.append(entry)
                added = False
            continue
        kept.append(line)
    if added:
        kept.append(entry)
    write_atomically(path, "".join(line + "\n" for line in kept))
    return added


def write_atomically(path, text):
    """
    Replace the file at ``path`` with ``text``: a 0600 temporary file in
    the same directory, fsynced, then renamed over it
    (:func:`cserver.fs.replace_atomically`).
    """
    try:
        replace_atomically(path, text.encode("utf-8"), prefix=".cserver-passwd-")
    except TemporaryFileError as e:
        raise PasswdError(
            f"cannot create a file in the directory {e.directory}: {e.strerror}") from None


def read_password(use_stdin, stdin=None, prompt=getpass.getpass):
    """
    The new password: the first line of ``stdin`` (without its line end),
    or typed twice at ``prompt``.
    """
    if use_stdin:
        stdin = sys.stdin if stdin is None else stdin
        password = stdin.readline()
        if password.endswith("\n"):
            password = password[:-1]
        if password.endswith("\r"):
            password = password[:-1]
    else:
        password = prompt("New password: ")
        if prompt("Retype new password: ") != password:
            raise PasswdError("the passwords do not match")
    if not password:
        raise PasswdError("the password is empty")
    return password


def _power_of_two(value):
    n = int(value)
    try:
        check_parameters(n, 8, 1)
    except BadHash as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return n


def parser():
    p = argparse.ArgumentParser(
        prog="cserver-passwd",
        description="Add a user to a cserver hash file (--auth hashfile:PATH), "
        "or change a user's password.",
    )
    p.add_argument("path", metavar="PATH", help="The hash file (created if missing).")
    p.add_argument("user", metavar="USER", help="The user name (no ':' or whitespace).")
    p.add_argument("--stdin", action="store_true",
                   help="Read the password from the first line of standard input "
                   "instead of prompting.")
    p.add_argument("--scrypt-n", type=_power_of_two, default=DEFAULT_N, metavar="N",
                   help=f"scrypt's cost, a power of 2 (default {DEFAULT_N}; lower only "
                   "for tests).")
    return p


def main(argv=None, stdin=None, prompt=getpass.getpass):
    args = parser().parse_args(argv)
    try:
        check_user(args.user)
        check_destination(args.path)
        password = read_password(args.stdin, stdin, prompt)
        added = set_user(args.path, args.user, hash_password(password, n=args.scrypt_n))
    except PasswdError as e:
        print(f"cserver-passwd: {e}", file=sys.stderr)
        return 1
    except (EOFError, KeyboardInterrupt):
        print("cserver-passwd: no password given; nothing changed", file=sys.stderr)
        return 1
    except (OSError, UnicodeDecodeError) as e:
        print(f"cserver-passwd: {args.path}: {e}", file=sys.stderr)
        return 1
    print(f"cserver-passwd: {'added' if added else 'changed'} {args.user} in {args.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
