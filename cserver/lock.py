"""Transitional: moved to :mod:`cserver.journal.lock`."""

from cserver.journal.lock import SUFFIX, JournalInUse, JournalLock, lock_path_for  # noqa: F401
