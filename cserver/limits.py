"""The per-server limits a user sets with options: what one connection and
the whole server may take (:class:`Limits`)."""

from __future__ import annotations

from typing import Any

import attrs

from cserver.config import Config

__all__ = ["Limits"]

#: The fields of :class:`cserver.config.Config`, whose defaults the limits share.
_OPTIONS = attrs.fields_dict(Config)


def _default(name: str) -> Any:
    return _OPTIONS[name].default


@attrs.frozen
class Limits:
    """
    The per-server limits a user sets with options (the defaults are the
    options' own: see :class:`cserver.config.Config`).

    :ivar max_connections: connections open at once; more get ``ERR busy``.
    :ivar idle_timeout: seconds without a line before ``ERR timeout`` (0: never).
    :ivar auth_timeout: seconds to authenticate (0: no limit).
    :ivar max_line: the longest request line, in bytes.
    :ivar work_delay: seconds each MSG waits before it is journaled.
    :ivar max_pending: unanswered MSGs a connection may have before the
        server stops reading from it.
    :ivar auth_throttle: failed AUTHs from one host address within
        ``auth_throttle_seconds`` after which its AUTHs are refused, unchecked,
        until that many seconds pass without a failure (0: never).
    :ivar auth_throttle_seconds: see ``auth_throttle``.
    :ivar dedup_window: seconds a ``PUT`` key is remembered (0: no ``PUT``).
    :ivar dedup_keys: the most keys remembered at once.
    """

    max_connections: int = _default("max_connections")
    idle_timeout: float = _default("idle_timeout")
    auth_timeout: float = _default("auth_timeout")
    max_line: int = _default("max_line")
    work_delay: float = _default("work_delay")
    max_pending: int = 1000
    auth_throttle: int = _default("auth_throttle")
    auth_throttle_seconds: float = 60.0
    dedup_window: float = _default("dedup_window")
    dedup_keys: int = _default("dedup_keys")

    @classmethod
    def from_config(cls, config: Config) -> Limits:
        """
        :returns: the limits ``config`` sets (the others at their defaults).
        """
        return cls(
            max_connections=config.max_connections,
            idle_timeout=config.idle_timeout,
            auth_timeout=config.auth_timeout,
            max_line=config.max_line,
            work_delay=config.work_delay,
            auth_throttle=config.auth_throttle,
            dedup_window=config.dedup_window,
            dedup_keys=config.dedup_keys,
        )
