"""Opening the journal on a JetStream stream at start: reach NATS, check
its version, find the stream (or create it) and check that it is as safe
as asked -- or refuse the start with one line (:exc:`StreamRefused`).
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from twisted.internet import defer
from twisted.internet.task import deferLater
from twisted.logger import Logger

from cserver.journal.jetstream import (
    DEFAULT_DEADLINE,
    MINIMUM_VERSION,
    StreamJournal,
    StreamRecovery,
    version_tuple,
)
from cserver.journal.stream_url import StreamURL
from cserver.nats.client import NATSClient
from cserver.nats.jetstream import JetStream, JetStreamError
from cserver.nats.wire import NATSError

_log = Logger(namespace="cserver.journal")

#: JetStream's err_code for "stream not found".
STREAM_NOT_FOUND = 10059


class StreamRefused(Exception):
    """The stream cannot hold the journal: one line saying why."""


def stream_config(url: StreamURL, replicas: int, duplicate_window: float) -> dict[str, Any]:
    """
    The config of a stream made for a journal: file storage, ``replicas``
    copies, messages never deleted nor purged, and a duplicate window of
    ``duplicate_window`` seconds.
    """
    return {
        "name": url.stream,
        "subjects": [url.subject],
        "storage": "file",
        "num_replicas": replicas,
        "retention": "limits",
        "discard": "old",
        "duplicate_window": int(duplicate_window * 1e9),
        "deny_delete": True,
        "deny_purge": True,
    }


def check_stream(url: StreamURL, config: dict[str, Any], replicas: int,
                 duplicate_window: float) -> None:
    """
    :raises StreamRefused: the existing stream's ``config`` is weaker than
        asked: fewer replicas, memory storage, a shorter duplicate window, or
        it does not take the journal's subject.
    """
    name = url.stream
    have = int(config.get("num_replicas") or 1)
    if have < replicas:
        raise StreamRefused(
            f"stream {name} has {have} replica{'s' if have != 1 else ''} and "
            f"--nats-replicas asks {replicas}: raise the stream's replicas, or ask fewer")
    if config.get("storage") != "file":
        raise StreamRefused(f"stream {name} keeps its messages in {config.get('storage')} "
                            "storage: a journal needs file storage")
    window = int(config.get("duplicate_window") or 0) / 1e9
    if window + 1e-9 < duplicate_window:
        raise StreamRefused(
            f"stream {name} has a duplicate window of {window:g} s, shorter than the "
            f"{duplicate_window:g} s retries and PUT keys need (--dedup-window, "
            "--nats-deadline)")
    if url.subject not in (config.get("subjects") or ()):
        raise StreamRefused(f"stream {name} does not take the subject {url.subject} "
                            "the journal publishes on")


def check_version(version: str | None) -> None:
    """
    :raises StreamRefused: the server is older than 2.10.23 (or says no
        version).
    """
    wanted = ".".join(map(str, MINIMUM_VERSION))
    if version is None or not version_tuple(version) or \
            version_tuple(version) < MINIMUM_VERSION:
        raise StreamRefused(
            f"nats-server {version or '(no version)'} is too old for the journal: "
            f"{wanted} or later is needed (earlier ones lose acknowledged messages after a "
            "crash), with sync_interval: always")


#: JetStream's answers while a cluster is still forming (no meta leader, a
#: peer not yet up for placement): asked again until the start's deadline.
_FORMING = frozenset({10005, 10008, 10023})


def trusting(ca: str) -> Any:
    """
    ``tls_options(host)`` for the NATS client: verify ``host`` against the
    certificates in the PEM file ``ca``.

    :raises StreamRefused: the file holds no certificate (or the TLS
        libraries are missing: the ``tls`` extra).
    """
    try:
        from twisted.internet.ssl import Certificate, optionsForClientTLS

        with open(ca, "rb") as f:
            roots = Certificate.loadPEM(f.read())
    except ImportError:
        raise StreamRefused("TLS to NATS needs the tls extra: pip install 'cserver[tls]'") \
            from None
    except Exception as e:
        raise StreamRefused(f"--nats-ca {ca}: no certificate in it ({e})") from None
    return lambda host: optionsForClientTLS(host, trustRoot=roots)


@defer.inlineCallbacks
def _find_or_create(jetstream: JetStream, url: StreamURL, replicas: int, window: float,
                    reactor: Any, deadline: float) -> Generator[Any, Any, tuple[Any, bool]]:
    """The stream's info, created first if missing: ``(info, created)``."""
    while True:
        try:
            try:
                info = yield jetstream.stream_info(url.stream)
                return info, False
            except JetStreamError as e:
                if e.err_code != STREAM_NOT_FOUND:
                    raise
            info = yield jetstream.create_stream(stream_config(url, replicas, window))
            _log.info("created stream {stream}: file storage, {replicas} replicas, "
                      "duplicate window {window:g} s", stream=url.stream, replicas=replicas,
                      window=window)
            return info, True
        except (JetStreamError, NATSError) as e:
            forming = isinstance(e, JetStreamError) and (e.code == 503 or e.err_code in _FORMING) \
                or not isinstance(e, JetStreamError)
            if not forming or reactor.seconds() >= deadline:
                if isinstance(e, JetStreamError):
                    raise StreamRefused(f"stream {url.stream} with {replicas} replicas: "
                                        f"{e}") from None
                raise StreamRefused(f"no answer from JetStream at {url}: {e}") from None
            _log.info("JetStream not ready for stream {stream} ({error}): asking again",
                      stream=url.stream, error=e)
            yield deferLater(reactor, 0.25)


@defer.inlineCallbacks
def open_stream(url: StreamURL, reactor: Any, node: str, replicas: int = 3,
                dedup_window: float = 120.0, deadline: float = DEFAULT_DEADLINE,
                connect_timeout: float = 10.0, stream_timeout: float = 30.0,
                ca: str | None = None) -> Generator[Any, Any, StreamJournal]:
    """
    Connect, check, and return the :class:`StreamJournal` (a Deferred).

    :param connect_timeout: seconds to reach a NATS server at start.
    :param stream_timeout: seconds then for JetStream to find or make the
        stream (a cluster still forming answers late, or not yet).
    :param ca: a PEM file of the certificates to trust for TLS to NATS
        (default: the system's trust roots).
    :raises StreamRefused: (the Deferred fails with it) NATS cannot be
        reached, is too old, or the stream is weaker than asked.
    """
    client = NATSClient(reactor, url.server_urls, name=f"cserver {node}",
                        connect_timeout=min(connect_timeout, 5.0),
                        tls_options=None if ca is None else trusting(ca))
    try:
        started = client.start()
        started.addTimeout(connect_timeout, reactor)
        try:
            yield started
        except defer.TimeoutError:
            raise StreamRefused(f"cannot reach NATS at {url} within {connect_timeout:g} s "
                                f"({client.last_error or 'no answer'})") from None
        except NATSError as e:
            raise StreamRefused(f"cannot reach NATS at {url}: {e}") from None
        check_version(client.server_version)
        jetstream = JetStream(client)
        window = max(dedup_window, deadline)
        info, created = yield _find_or_create(jetstream, url, replicas, window, reactor,
                                              reactor.seconds() + stream_timeout)
        check_stream(url, info.get("config") or {}, replicas, window)
        state = info.get("state") or {}
        recovery = StreamRecovery(records=int(state.get("messages") or 0),
                                  last_seq=int(state.get("last_seq") or 0), created=created)
    except BaseException:
        client.close()
        raise
    return StreamJournal(url, client, reactor, node, deadline=deadline, recovery=recovery)
