"""Transitional: moved to :mod:`cserver.journal.header`."""

from cserver.journal.header import HEADER_FIELDS, SLOT_FIELDS, Shared  # noqa: F401
