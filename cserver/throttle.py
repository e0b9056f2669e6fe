"""What failed AUTHs may cost: the per-address throttle and the failed-AUTH log.

:class:`AuthThrottle` counts failed AUTHs per host address.  After ``limit``
failures, each less than ``window`` seconds after the one before, the
address is *throttled*: its AUTHs are refused, unchecked, until ``window``
seconds after the failure that throttled it.  A refused AUTH does not extend
that time; it is counted, and once the address is released (or the server
stops) the count becomes one ``auth_throttled`` record.  So one address
costs the journal at most ``limit`` ``auth_failed`` records and one
``auth_throttled`` record per ``window`` seconds.

:class:`FailureLog` writes failed AUTHs to the server's log, at most
``burst`` lines per ``window`` seconds, and then says how many it left out.
"""

import math

import attrs
from twisted.logger import Logger

_log = Logger(namespace="cserver.auth")


@attrs.define
class Lockout:
    """
    One throttled address: since when, until when, and the AUTHs refused.
    """

    host: str
    since: float
    until: float
    refused: int = 0

    def fields(self):
        """
        The fields of its ``auth_throttled`` record.
        """
        return {"host": self.host, "refused": self.refused, "since": self.since,
                "until": self.until}


@attrs.define
class _Failures:
    count: int = 0
    last: float = 0.0


@attrs.define
class AuthThrottle:
    """
    Failed AUTHs per host address, and the addresses throttled now.

    :ivar limit: failures in a row that throttle an address (0: never).
    :ivar window: seconds of quiet that reset the count, and how long a
        throttled address stays throttled.
    :ivar refused: AUTHs refused by the throttle since start.
    """

    clock: object
    limit: int = 5
    window: float = 60.0
    refused: int = 0
    _failures: dict = attrs.field(factory=dict)
    _lockouts: dict = attrs.field(factory=dict)
    _released: list = attrs.field(factory=list)

    def retry_after(self, host):
        """
        Whole seconds until ``host`` may AUTH again, or None when it may now.
        """
        lockout = self._lockouts.get(host)
        if lockout is None:
            return None
        left = lockout.until - self.clock.seconds()
        if left <= 0:
            self._release(lockout)
            return None
        return max(1, math.ceil(left))

    def _release(self, lockout):
        del self._lockouts[lockout.host]
        if lockout.refused:
            self._released.append(lockout)
        _log.info("AUTH from {host} allowed again; {refused} AUTHs were refused "
                  "while it was throttled", host=lockout.host, refused=lockout.refused)

    def refuse(self, host):
        """
        Count an AUTH from ``host`` refused because it is throttled.
        """
        self.refused += 1
        self._lockouts[host].refused += 1

    def failed(self, host):
        """
        Count a failed AUTH from ``host``; the ``limit``-th in a row
        throttles it (logged).
        """
        if not self.limit:
            return
        now = self.clock.seconds()
        lockout = self._lockouts.get(host)
        if lockout is not None and lockout.until <= now:
            self._release(lockout)
        failures = self._failures.get(host)
        if failures is None or now - failures.last >= self.window:
            failures = self._failures[host] = _Failures()
        failures.count += 1
        failures.last = now
        if failures.count >= self.limit and host not in self._lockouts:
            del self._failures[host]
            self._lockouts[host] = Lockout(host, now, now + self.window)
            _log.warn(
                "AUTH from {host} throttled for {seconds:g} s after {count} failed AUTHs",
                host=host, seconds=self.window, count=failures.count,
            )

    def sweep(self):
        """
        Release the addresses whose time is up (logged), forget counts that
        are ``window`` old; return the released :class:`Lockout` that refused
        any AUTH, for the journal.
        """
        now = self.clock.seconds()
        stale = [host for host, failures in self._failures.items()
                 if now - failures.last >= self.window]
        for host in stale:
            del self._failures[host]
        for lockout in [lockout for lockout in self._lockouts.values()
                        if lockout.until <= now]:
            self._release(lockout)
        released, self._released = self._released, []
        return released

    def take_refusals(self):
        """
        The :class:`Lockout` that refused AUTHs and are not yet reported (at
        stop), as they stand; their counts start again from 0.
        """
        taken, self._released = self._released, []
        for lockout in self._lockouts.values():
            if lockout.refused:
                taken.append(attrs.evolve(lockout, until=min(lockout.until,
                                                              self.clock.seconds())))
                lockout.refused = 0
        return taken

    @property
    def throttled(self):
        """
        The addresses throttled now.
        """
        return sorted(self._lockouts)


@attrs.define
class FailureLog:
    """
    Log failed AUTHs, at most ``burst`` in ``window`` seconds; then count
    the rest and say how many at the next window.
    """

    clock: object
    burst: int = 10
    window: float = 60.0
    _start: float | None = None
    _logged: int = 0
    _skipped: int = 0

    def failed(self, user, peer, why):
        self.flush()
        if self._start is None:
            self._start = self.clock.seconds()
        if self._logged < self.burst:
            self._logged += 1
            _log.info("AUTH failed for user {user!r} from {peer}: {why}", user=user,
                      peer=peer, why=why)
        else:
            self._skipped += 1

    def flush(self, stopping=False):
        """
        End the window once it is over (the periodic sweep, the next failure)
        or at once (``stopping``), saying how many were left out, if any.
        """
        if self._start is None:
            return
        if stopping or self.clock.seconds() - self._start >= self.window:
            if self._skipped:
                _log.info("{count} more failed AUTHs were not logged", count=self._skipped)
            self._start = None
            self._logged = self._skipped = 0
