"""Small file-system steps that durability rests on.

Every file the server creates holds messages or peer addresses, so it is
created with mode 0600 whatever the umask (:func:`create_private`); a new
file is made durable together with its directory entry
(:func:`create_durably`); a file is replaced atomically through a temporary
file in the same directory (:func:`replace_atomically`).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable

#: The mode of every file the server creates: the journal, the files a
#: reopen starts, torn-tail side files and the lock hold every message and
#: peer address, so only the server's own account may read them.
FILE_MODE = 0o600


def write_all(fd: int, data: bytes, write: Callable[[int, memoryview], int] = os.write) -> None:
    """
    Write all of ``data`` to ``fd``, however many calls ``write`` takes.

    :param write: the system call (``os.write`` by default; tests pass a
        failing one).
    """
    view = memoryview(data)
    while view:
        view = view[write(fd, view):]


def pwrite_all(fd: int, data: bytes, offset: int,
               pwrite: Callable[[int, memoryview, int], int] = os.pwrite) -> None:
    """
    Write all of ``data`` to ``fd`` at ``offset``, however many calls
    ``pwrite`` takes.
    """
    view = memoryview(data)
    while view:
        written = pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def fsync_directory(path: str) -> None:
    """
    Make the directory entry of ``path`` durable.
    """
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def create_private(path: str, flags: int) -> int:
    """
    Create the file ``path`` (it must not exist) with mode 0600 whatever the
    umask, open with ``flags``.

    :returns: its descriptor.
    """
    fd = os.open(path, flags | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
    except BaseException:
        os.close(fd)
        raise
    return fd


def create_durably(path: str, flags: int) -> int:
    """
    :func:`create_private`, then make the new file and its directory entry
    durable; if that fails, the file is removed again.

    :returns: its descriptor.
    """
    fd = create_private(path, flags)
    try:
        os.fsync(fd)
        fsync_directory(path)
    except BaseException:
        os.close(fd)
        try:
            os.unlink(path)
        except OSError:
            pass
        raise
    return fd


class TemporaryFileError(OSError):
    """
    :func:`replace_atomically` could not create its temporary file in
    ``directory`` (it does not exist, is not writable, is read-only...).
    """

    def __init__(self, directory: str, error: OSError) -> None:
        super().__init__(error.errno, error.strerror)
        self.directory = directory


def replace_atomically(path: str, data: bytes, prefix: str = ".cserver-") -> None:
    """
    Replace the file at ``path`` with ``data``: a 0600 temporary file in the
    same directory, fsynced, renamed over it, then the directory fsynced.
    Either the old file or the new one is at ``path`` whatever happens.

    :raises TemporaryFileError: the temporary file cannot be made.
    :raises OSError: it cannot be written (it is removed again), or the
        rename failed.
    """
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, temporary = tempfile.mkstemp(prefix=prefix, dir=directory)
    except OSError as e:
        raise TemporaryFileError(directory, e) from None
    try:
        try:
            os.fchmod(fd, FILE_MODE)
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise
    fsync_directory(path)
