"""--journal nats://...: the stream URL, parsed once for the server and the
journal tools."""

import pytest

from cserver.journal.stream_url import is_stream_url, parse_stream_url


def test_a_cluster_url_gives_its_hosts_stream_and_subject():
    """Several HOST:PORTs, a stream, user and password (percent-decoded)."""
    url = parse_stream_url("nats://app:p%40ss@10.0.0.1:4222,10.0.0.2:4223/orders")
    assert url.hosts == ("10.0.0.1:4222", "10.0.0.2:4223")
    assert url.stream == "orders" and url.subject == "cserver.orders"
    assert (url.user, url.password, url.tls) == ("app", "p@ss", False)
    assert url.server_urls == ["nats://app:p%40ss@10.0.0.1:4222",
                               "nats://app:p%40ss@10.0.0.2:4223"]


def test_the_password_is_never_shown():
    """str() of a URL, and the error for a bad one, hide the password."""
    assert str(parse_stream_url("tls://app:secret@h:1/s")) == "tls://app@h:1/s"
    with pytest.raises(ValueError) as error:
        parse_stream_url("nats://app:secret@h:1")
    assert "secret" not in str(error.value)


@pytest.mark.parametrize("text", [
    "nats://h:4222", "nats://h:4222/", "nats://h/s", "nats://h:0/s", "nats://h:99999/s",
    "nats://h:1,/s", "nats://h:1/bad.name", "nats://h:1/a/b", "http://h:1/s",
])
def test_a_bad_url_is_one_line_naming_the_form(text):
    """A URL without a port, a stream, or with a bad stream name is refused
    with one line."""
    with pytest.raises(ValueError) as error:
        parse_stream_url(text)
    assert "\n" not in str(error.value)


def test_only_nats_and_tls_schemes_name_a_stream():
    """A path (even one with a colon) stays a file journal."""
    assert is_stream_url("nats://h:1/s") and is_stream_url("tls://h:1/s")
    assert not is_stream_url("/var/lib/cserver/journal.jsonl")
    assert not is_stream_url("journal:nats.jsonl")
