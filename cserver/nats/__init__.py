"""A small NATS client for Twisted: the text protocol (:mod:`.protocol`, the
frames and errors in :mod:`.wire`), a client that reconnects by itself across
the servers of a cluster (:mod:`.client`, :mod:`.servers`), and JetStream over
it (:mod:`.jetstream`).

No module imports the global reactor: the reactor and the clock are handed in.
"""

from cserver.nats.client import NATSClient
from cserver.nats.protocol import NATSProtocol
from cserver.nats.servers import Server, ServerPool, parse_url
from cserver.nats.wire import (
    ConnectOptions,
    Msg,
    NATSError,
    NoResponders,
    NotConnected,
    PayloadTooLarge,
    ProtocolError,
    Refused,
    RequestLost,
    RequestTimeout,
    ServerError,
    StaleConnection,
)

__all__ = [
    "ConnectOptions",
    "Msg",
    "NATSClient",
    "NATSError",
    "NATSProtocol",
    "NoResponders",
    "NotConnected",
    "PayloadTooLarge",
    "ProtocolError",
    "Refused",
    "RequestLost",
    "RequestTimeout",
    "Server",
    "ServerError",
    "ServerPool",
    "StaleConnection",
    "parse_url",
]
