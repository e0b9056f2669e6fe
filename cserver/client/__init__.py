"""The cserver client: protocol v1 from Python, the load generator, and ``cserver-client``.

The modules are layered, every import pointing down (``cli -> bench ->
protocol``), none of them back up:

- :mod:`~cserver.client.cli` -- the ``cserver-client`` command line: parsing, :func:`main`;
- :mod:`~cserver.client.commands` -- what ``send``, ``stats`` and ``bench`` do, their
  output and exit statuses;
- :mod:`~cserver.client.processes` -- ``bench --processes``: the run split over child
  processes (:mod:`~cserver.client.child` is a child's entry point) and their barrier
  joined;
- :mod:`~cserver.client.local` -- one bench run in this process's reactor;
- :mod:`~cserver.client.report` -- the results merged into the report, table or JSON;
- :mod:`~cserver.client.bench` -- the load generator itself: one factory firing N
  sessions in parallel, its config and result;
- :mod:`~cserver.client.bench_protocol` -- one lean bench session on the wire;
- :mod:`~cserver.client.protocol` -- the client protocol and library API:
  :func:`connect`, :class:`CserverClientProtocol`, :class:`ServerError`.

Importing the package does not install the global reactor::

    d = connect(reactor, "tcp:host=127.0.0.1:port=31337", "alice")
    d.addCallback(lambda client: client.send("hello"))   # fires with the seq
"""

from cserver.client.bench import Bench, BenchConfig, RunResult
from cserver.client.cli import build_parser, main
from cserver.client.protocol import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    CserverClientFactory,
    CserverClientProtocol,
    Seq,
    ServerError,
    UnexpectedReplyError,
    connect,
    endpoint_description,
    parse_ack,
    parse_reply,
    parse_stats,
)
from cserver.client.report import Report

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "Bench",
    "BenchConfig",
    "CserverClientFactory",
    "CserverClientProtocol",
    "Report",
    "RunResult",
    "Seq",
    "ServerError",
    "UnexpectedReplyError",
    "build_parser",
    "connect",
    "endpoint_description",
    "main",
    "parse_ack",
    "parse_reply",
    "parse_stats",
]
