"""Transitional: moved to :mod:`cserver.journal.recovery` and :mod:`cserver.fs`."""

from cserver.fs import FILE_MODE, create_durably, create_private, fsync_directory  # noqa: F401
from cserver.journal.recovery import CHUNK, JournalDamaged, Recovery, check, recover  # noqa: F401
