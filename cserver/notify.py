"""sd_notify without libsystemd: tell systemd (``Type=notify``) how we are.

The protocol is one datagram of ``KEY=VALUE`` lines to the unix socket named
by ``$NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract namespace).
Without ``$NOTIFY_SOCKET`` -- not run by systemd -- every call does nothing.
A notification that cannot be sent is logged, never raised: it must not
stop the server.

``$WATCHDOG_USEC`` (set by ``WatchdogSec=``) asks for ``WATCHDOG=1`` at
least that often; :meth:`Notifier.start_watchdog` sends it every half
interval from the reactor, so a stuck reactor gets the service restarted.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from typing import Any

from twisted.internet.task import LoopingCall
from twisted.logger import Logger


def notify_address(value: str | None) -> str | None:
    """
    :returns: the ``sendto`` address of a ``$NOTIFY_SOCKET`` value: a path,
        or (for ``@name``) the abstract name with its leading NUL byte; None
        when unset or empty.
    """
    if not value:
        return None
    if value.startswith("@"):
        return "\0" + value[1:]
    return value


def watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    """
    :returns: seconds between two ``WATCHDOG=1``: half of ``$WATCHDOG_USEC``;
        None when no watchdog is asked for, or when ``$WATCHDOG_PID`` names
        another process.
    """
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    owner = environ.get("WATCHDOG_PID")
    if owner and owner != str(pid):
        return None
    return usec / 2 / 1_000_000


class Notifier:
    """
    Sends notifications to the service manager named by an environment.

    :ivar address: where datagrams go, or None (then nothing is sent).
    :ivar interval: seconds between watchdog pings, or None.
    """

    log = Logger(namespace="cserver.notify")

    def __init__(self, environ: Mapping[str, str] | None = None, pid: int | None = None) -> None:
        environ = os.environ if environ is None else environ
        self.address = notify_address(environ.get("NOTIFY_SOCKET"))
        self.interval = watchdog_interval(environ, os.getpid() if pid is None else pid)
        self._watchdog: LoopingCall | None = None

    @property
    def enabled(self) -> bool:
        """Whether notifications are sent at all."""
        return self.address is not None

    def send(self, *states: str) -> bool:
        """
        Send ``states`` (``"READY=1"``...) in one datagram.

        :returns: True when sent.
        """
        if self.address is None or not states:
            return False
        data = "\n".join(states).encode("utf-8")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto(data, socket.MSG_DONTWAIT, self.address)
        except OSError as e:
            self.log.warn("could not notify {address!r}: {error}",
                          address=self.address, error=e)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """``READY=1``: started; with a ``STATUS=`` line when given."""
        return self.send("READY=1", *self._status(status))

    def stopping(self, status: str | None = None) -> bool:
        """``STOPPING=1``: the stop has begun."""
        return self.send("STOPPING=1", *self._status(status))

    def status(self, status: str) -> bool:
        """A free-form ``STATUS=`` line for ``systemctl status``."""
        return self.send(*self._status(status))

    def watchdog(self) -> bool:
        """``WATCHDOG=1``: still alive."""
        return self.send("WATCHDOG=1")

    @staticmethod
    def _status(status: object) -> tuple[str, ...]:
        if status is None:
            return ()
        return ("STATUS=" + " ".join(str(status).splitlines()),)

    def start_watchdog(self, clock: Any) -> LoopingCall | None:
        """
        Send ``WATCHDOG=1`` now and every :attr:`interval` seconds on
        ``clock``; does nothing when no watchdog is asked for or nothing
        would be sent.

        :returns: the :class:`twisted.internet.task.LoopingCall`, or None.
        """
        if self.interval is None or self.address is None or self._watchdog is not None:
            return self._watchdog
        call = LoopingCall(self.watchdog)
        call.clock = clock
        call.start(self.interval, now=True)
        self._watchdog = call
        return call

    def stop_watchdog(self) -> None:
        """Stop the pings started by :meth:`start_watchdog`."""
        call, self._watchdog = self._watchdog, None
        if call is not None and call.running:
            call.stop()
