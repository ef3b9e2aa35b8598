"""TLS on the relay's single port, with a self-signed certificate made by openssl in the test:
verification on by default, a private CA with ``ca_file``, a pinned fingerprint, tls_only
refusing plain clients, and bulk traffic with half-close over wss://."""

from __future__ import annotations

import hashlib
import logging
import os
import socket

import pytest

from common.errors import ChuantouError
from common.frames import JoinRequest, pack_data_header
from common.tls import TlsStream

from helpers import (
    HOST,
    TcpService,
    connect,
    hash_until_eof,
    pattern,
    random_bytes,
    recv_exactly,
    reply_after_eof_handler,
    send_and_close_write,
    sha256,
    wait_until,
)
from security_support import PROMPT, TOKEN, closed_without_reply, logged, make_self_signed, wss_url

pytestmark = pytest.mark.timeout(30)

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tls")
    return {
        "relay": make_self_signed(folder, "relay"),
        "elsewhere": make_self_signed(folder, "elsewhere", san="DNS:relay.example.com"),
    }


@pytest.fixture
def tls_relay(make_server, certs):
    """A relay that speaks only TLS: every control and data channel of a working tunnel is encrypted."""
    cert = certs["relay"]
    return make_server(token=TOKEN, tls_cert=cert.cert, tls_key=cert.key, tls_only=True)


def assert_tunnel_works(server, a, b_id: str, service_port: int, tls=(True, True)) -> None:
    """An echo through a proxy on ``a``; ``tls`` says whether the relay holds the gateway's and
    the target's data channel as TLS streams."""
    proxy = a.create_proxy(0, b_id, service_port, protocol="tcp")
    with connect(proxy.local_port) as user:
        user.sendall(b"hello over TLS")
        assert recv_exactly(user, 14) == b"hello over TLS"
        (session,) = [s for s in server.sessions.all() if s.client_a == a.client_id]
        assert (isinstance(session.sock_a, TlsStream), isinstance(session.sock_b, TlsStream)) == tls
    proxy.close()


def test_without_ca_file_a_self_signed_relay_is_not_trusted(tls_relay, make_client):
    with pytest.raises(ChuantouError) as caught:
        make_client(wss_url(tls_relay), "A", token=TOKEN, connect_timeout=5)
    text = str(caught.value)
    assert "not trusted" in text and "--ca" in text and "--tls-fingerprint" in text
    assert "refused" not in text  # this client's check failed: the relay refused nothing
    assert tls_relay.registry.ids() == []


def test_ca_file_verifies_the_relay_and_the_tunnel_runs_over_tls(tls_relay, make_client, certs, tcp_echo):
    ca = certs["relay"].cert
    a = make_client(wss_url(tls_relay), "A", token=TOKEN, ca_file=ca)
    make_client(wss_url(tls_relay), "B", token=TOKEN, ca_file=ca)
    assert_tunnel_works(tls_relay, a, "B", tcp_echo.port)


def test_ca_file_for_a_certificate_of_another_name_is_refused(make_server, make_client, certs):
    elsewhere = certs["elsewhere"]
    relay = make_server(token=TOKEN, tls_cert=elsewhere.cert, tls_key=elsewhere.key)
    with pytest.raises(ChuantouError, match="not trusted"):
        make_client(wss_url(relay), "A", token=TOKEN, ca_file=elsewhere.cert, connect_timeout=5)
    assert relay.registry.ids() == []


@pytest.mark.parametrize("style", ["hex", "colons"])
def test_a_pinned_fingerprint_is_accepted_without_a_ca(tls_relay, make_client, certs, tcp_echo, style):
    digest = certs["relay"].fingerprint
    if style == "colons":
        digest = ":".join(digest[i:i + 2] for i in range(0, 64, 2)).upper()
    a = make_client(wss_url(tls_relay), "A", token=TOKEN, tls_fingerprint=digest)
    make_client(wss_url(tls_relay), "B", token=TOKEN, tls_fingerprint=digest)
    assert_tunnel_works(tls_relay, a, "B", tcp_echo.port)


def test_a_wrong_pinned_fingerprint_is_refused(tls_relay, make_client, certs):
    with pytest.raises(ChuantouError, match="fingerprint") as caught:
        make_client(wss_url(tls_relay), "A", token=TOKEN, tls_fingerprint=certs["elsewhere"].fingerprint,
                    connect_timeout=5)
    assert certs["relay"].fingerprint in str(caught.value)  # says what it found
    assert tls_relay.registry.ids() == []


def test_tls_only_refuses_plain_connections(tls_relay, make_client, certs, tcp_echo):
    with pytest.raises(ChuantouError, match="accepts only TLS: use --server wss://") as caught:
        make_client(tls_relay, "plain", token=TOKEN, connect_timeout=5)
    assert "refused registration" not in str(caught.value)
    with connect(tls_relay.port) as sock:  # a browser or a ws:// client gets a 426 that says why
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        closed, got = closed_without_reply(sock, PROMPT)
    assert closed and got.startswith(b"HTTP/1.1 426 ") and b"accepts only TLS" in got, got[:80]
    with connect(tls_relay.port) as sock:
        sock.sendall(pack_data_header(JoinRequest("A", "00" * 16, "00" * 16)))
        closed, got = closed_without_reply(sock, PROMPT)
    assert closed and got == b"", f"a plain data channel got {got[:40]!r}"
    assert tls_relay.registry.ids() == []
    # TLS clients are still welcome
    a = make_client(wss_url(tls_relay), "A", token=TOKEN, ca_file=certs["relay"].cert)
    make_client(wss_url(tls_relay), "B", token=TOKEN, ca_file=certs["relay"].cert)
    assert_tunnel_works(tls_relay, a, "B", tcp_echo.port)


def test_plain_and_tls_clients_share_the_port_and_insecure_warns_loudly(make_server, make_client, certs, tcp_echo,
                                                                        caplog):
    cert = certs["relay"]
    relay = make_server(token=TOKEN, tls_cert=cert.cert, tls_key=cert.key)
    a = make_client(relay, "A", token=TOKEN)  # ws://
    b = make_client(wss_url(relay), "B", token=TOKEN, tls_insecure=True)
    assert logged(caplog, "verification is OFF")
    assert_tunnel_works(relay, a, "B", tcp_echo.port, tls=(False, True))
    assert_tunnel_works(relay, b, "A", tcp_echo.port, tls=(True, False))


def test_garbage_after_a_tls_record_byte_and_a_silent_handshake_are_dropped(make_server, certs, caplog):
    cert = certs["relay"]
    relay = make_server(token=TOKEN, tls_cert=cert.cert, tls_key=cert.key, handshake_timeout=1.0)
    noise = socket.create_connection((HOST, relay.port), timeout=5)
    silent = socket.create_connection((HOST, relay.port), timeout=5)
    try:
        noise.sendall(b"\x16\x03\x01\x00\x30" + os.urandom(300))
        silent.sendall(b"\x16")  # a record that never comes
        for sock in (noise, silent):
            closed, _ = closed_without_reply(sock, PROMPT + 1)
            assert closed
    finally:
        noise.close()
        silent.close()
    wait_until(lambda: relay.handshakes.pending == 0)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.timeout(60)
def test_16_mib_each_way_with_half_close_over_wss(tls_relay, make_client, certs, services):
    ca = certs["relay"].cert
    a = make_client(wss_url(tls_relay), "A", token=TOKEN, ca_file=ca)
    make_client(wss_url(tls_relay), "B", token=TOKEN, ca_file=ca)
    reply_size = 16 * MiB
    service = services(TcpService(reply_after_eof_handler(reply_size), "after-eof"))
    proxy = a.create_proxy(0, "B", service.port, protocol="tcp")
    upload = random_bytes(16 * MiB)
    with connect(proxy.local_port, timeout=30) as user:
        send_and_close_write(user, upload)  # FIN through both TLS data channels ...
        digest, size = hash_until_eof(user)  # ... and the reply still flows back after it
    assert size == 32 + reply_size
    assert digest == sha256(hashlib.sha256(upload).digest() + pattern(reply_size)), "the reply differs"
    proxy.close()
