"""cserver: an authenticated, append-only message server built on Twisted."""

__version__ = "0.1.0"
