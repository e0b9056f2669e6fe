"""Tests for cserver.tls: the Twisted private names it leans on are still
there, and the Twisted code it copies is unchanged.

Unit layer: a TLS wrapper connected to a StringTransport, a self-signed
certificate in a temporary directory.  The half-closes over real loopback
TLS are in tests/e2e/test_tls_halfclose.py; the certificate, the server's
CertificateOptions and the wrapped factory come from the e2e modules, so
that both layers check the same objects."""

import ast
import hashlib
import inspect
import io
import textwrap
import tokenize

from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from .base import Temporary

try:
    import cryptography.x509  # noqa: F401 (make_certificate)
    import service_identity  # noqa: F401 (what tests/e2e/test_tls.py requires)
    from OpenSSL import SSL
    from twisted.internet import ssl  # noqa: F401 (server_options)
    from twisted.protocols import tls
except ImportError as e:
    _skip = f"the TLS libraries are not installed: {e}"
else:
    _skip = None
    from ..e2e.test_tls import make_certificate
    from ..e2e.test_tls_halfclose import Replies, RepliesFactory, server_options


def fingerprint(function):
    """A hash of a function's code: its tokens, without docstring, comments or layout."""
    source = textwrap.dedent(inspect.getsource(function))
    first = ast.parse(source).body[0].body[0]
    skip = set()
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
        skip = set(range(first.lineno, first.end_lineno + 1))
    ignored = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT,
               tokenize.DEDENT, tokenize.ENDMARKER}
    tokens = [t.string for t in tokenize.generate_tokens(io.StringIO(source).readline)
              if t.type not in ignored and t.start[0] not in skip]
    return hashlib.sha256(" ".join(tokens).encode()).hexdigest()


# Twisted's TLSMemoryBIOProtocol._flushReceiveBIO as of Twisted 26.10, which
# HalfCloseableTLSProtocol._flushReceiveBIO copies.
FLUSH_RECEIVE_BIO = "bc5009a7ff9ef9c4dee84d00f6ec9ddf521b7b0605fa21c4f0717aad878d5765"


class TwistedPrivateNamesTests(Temporary, SynchronousTestCase):
    """What cserver.tls takes from Twisted's TLS wrapper."""

    skip = _skip

    def setUp(self):
        super().setUp()
        self.certificate = make_certificate(self.temp_dir())

    def test_twisted_private_names_are_still_there(self):
        """The Twisted private names cserver.tls leans on still exist (methods, flags with
        their defaults, attributes set by makeConnection), TLSMemoryBIOFactory still defaults
        to BufferingTLSTransport, and the _flushReceiveBIO we copied is unchanged: when
        Twisted changes any of them this fails, naming them."""
        cls = tls.TLSMemoryBIOProtocol
        methods = ["_flushReceiveBIO", "_flushSendBIO", "_shutdownTLS", "_tlsShutdownFinished"]
        flags = {"_handshakeDone": False, "_lostTLSConnection": False, "_aborted": False,
                 "_producer": None, "disconnecting": 0}
        broken = [name for name in methods if not callable(getattr(cls, name, None))]
        broken += [name for name, default in flags.items()
                   if not hasattr(cls, name) or getattr(cls, name) != default]
        options = server_options(self.certificate)
        wrapper = tls.TLSMemoryBIOFactory(
            options, False, RepliesFactory(Replies)).buildProtocol(None)
        try:
            wrapper.makeConnection(StringTransport())
        except Exception as e:  # a missing flag is looked up on the transport, and fails
            broken.append(f"makeConnection raised {e!r}")
        if not isinstance(getattr(wrapper, "_tlsConnection", None), SSL.Connection):
            broken.append("_tlsConnection")
        if getattr(wrapper, "_appSendBuffer", None) != []:
            broken.append("_appSendBuffer")
        if tls.TLSMemoryBIOFactory.protocol is not tls.BufferingTLSTransport:
            broken.append("TLSMemoryBIOFactory.protocol is BufferingTLSTransport")
        if fingerprint(cls._flushReceiveBIO) != FLUSH_RECEIVE_BIO:
            broken.append("_flushReceiveBIO's code (re-copy it into cserver.tls, then update "
                          "FLUSH_RECEIVE_BIO)")
        assert not broken, f"Twisted changed what cserver.tls relies on: {broken}"
