"""Server endpoint descriptions: checked at option time, with a large backlog.

``--port`` and ``--metrics`` take Twisted endpoint descriptions
(``tcp:31337:interface=127.0.0.1``, ``ssl:...``, ``unix:...``,
``systemd:...``); a bare port number means ``tcp:PORT:interface=127.0.0.1``.
:func:`check_server` turns what a user typed into the description to
listen on, or says in one line what is wrong with it: before anything is
opened, not in a traceback at ``listen``.
"""

from __future__ import annotations

import re
import socket

from twisted.internet.endpoints import serverFromString
from twisted.internet.testing import MemoryReactor

#: The listen backlog added to descriptions that do not set one: Twisted's
#: default of 50 makes 1000 simultaneous connects take seconds.
BACKLOG = 4096
#: What the error messages show as valid descriptions.
EXAMPLES = ("tcp:31337:interface=127.0.0.1, ssl:31337:privateKey=key.pem:certKey=cert.pem, "
            "unix:/run/cserver.sock, systemd:domain=INET:name=cserver")

_UNESCAPED_COLON = re.compile(r"(?<!\\):")
_UNEXPECTED = re.compile(r"unexpected keyword argument '(\w+)'")
_NOT_A_NUMBER = re.compile(r"invalid literal for int\(\) with base \d+: (.*)")
_MISSING = re.compile(r"missing \d+ required positional arguments?: (.*)")


def split_description(description: str) -> tuple[str, list[str], dict[str, str]]:
    """
    Split an endpoint description (``\\:`` is a colon inside a value).

    :returns: ``(kind, positional, keywords)``.
    """
    parts = [p.replace("\\:", ":") for p in _UNESCAPED_COLON.split(description)]
    positional, keywords = [], {}
    for part in parts[1:]:
        key, equals, value = part.partition("=")
        if equals:
            keywords[key] = value
        else:
            positional.append(part)
    return parts[0], positional, keywords


def parse_tcp(description: str) -> tuple[socket.AddressFamily, str, int, int]:
    """
    Read a ``tcp:`` or ``tcp6:`` server endpoint description.

    :returns: ``(family, host, port, backlog)``.
    :raises ValueError: another kind of endpoint, or no port.
    """
    kind, positional, keywords = split_description(description)
    if kind not in ("tcp", "tcp6"):
        raise ValueError(f"--workers needs a tcp: or tcp6: --port, not {kind}:")
    for name, value in zip(("port", "backlog", "interface"), positional, strict=False):
        keywords.setdefault(name, value)
    if "port" not in keywords:
        raise ValueError(f"no port in {description!r}")
    family = socket.AF_INET6 if kind == "tcp6" else socket.AF_INET
    host = keywords.get("interface") or ("::" if kind == "tcp6" else "0.0.0.0")
    return family, host, int(keywords["port"]), int(keywords.get("backlog", 50))


def with_backlog(description: str) -> str:
    """
    Add a large listen backlog to a tcp, ssl or unix endpoint description
    that does not set one.
    """
    kind = description.split(":", 1)[0]
    if kind in ("tcp", "tcp6", "ssl", "unix") and "backlog=" not in description:
        return f"{description}:backlog={BACKLOG}"
    return description


def check_server(value: str, option: str = "--port") -> str:
    """
    The server endpoint description to listen on for what was given as
    ``option``: a bare port number becomes ``tcp:PORT:interface=127.0.0.1``,
    and a backlog is added (:func:`with_backlog`).

    :param value: what was given.
    :param option: the option that gave it, for the messages.
    :returns: the description to listen on.
    :raises ValueError: with one line naming ``option`` and what is wrong:
        not an endpoint description, a port out of range, ``ssl:`` without
        the ``tls`` extra.
    """
    value = value.strip()
    if value.isdigit():
        value = f"tcp:{value}:interface=127.0.0.1"
    kind, positional, keywords = split_description(value)
    if kind == "ssl" and not _have_tls():
        raise ValueError(f"{option} ssl:... needs the TLS libraries: "
                         "pip install 'cserver[tls]'")
    if kind in ("tcp", "tcp6", "ssl"):
        port = keywords.get("port", positional[0] if positional else None)
        if (port is not None and re.fullmatch(r"\s*-?\d+\s*", port)
                and not 0 <= int(port) <= 65535):
            raise ValueError(f"{option} {value}: the port must be 0-65535, not {port}")
    try:
        serverFromString(MemoryReactor(), value)
    except OSError as e:
        # ssl: reads its key and certificate files here.
        raise ValueError(f"{option} {value}: cannot read {e.filename or 'a file'}: "
                         f"{e.strerror or e}") from None
    except Exception as e:
        raise ValueError(f"{option} {value!r} is not a server endpoint description "
                         f"({_reason(kind, e)}); for example: {EXAMPLES}") from None
    return with_backlog(value)


def _reason(kind: str, error: Exception) -> str:
    text = str(error)
    if isinstance(error, TypeError):
        unexpected = _UNEXPECTED.search(text)
        if unexpected:
            return f"{kind}: takes no parameter {unexpected.group(1)}"
        missing = _MISSING.search(text)
        if missing:
            return f"{kind}: needs {missing.group(1)}"
    if isinstance(error, IndexError) and kind == "systemd":
        return "systemd passed no such socket (LISTEN_FDS)"
    number = _NOT_A_NUMBER.search(text)
    if isinstance(error, ValueError) and number:
        return f"{number.group(1)} is not a number"
    return text or type(error).__name__


def _have_tls() -> bool:
    try:
        import OpenSSL  # noqa: F401
    except ImportError:
        return False
    return True

