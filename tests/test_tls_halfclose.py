"""A half-close over TLS data channels must not cut the other direction (issue 9 item 15).

A real relay that speaks only TLS, clients A and B over wss://, and services behind B. The user
sends, then ``shutdown(SHUT_WR)``, and reads to EOF: every byte must come back (sha256), and the
end must be a clean EOF only because every byte did. Plus the TLS layer alone: a TCP EOF without
close_notify is a truncation and reads as a reset, not as the end of the stream.
"""

from __future__ import annotations

import hashlib
import socket
import ssl
import threading
import time

import pytest

from chuantou_client.sealing import SealedStream
from common import tls
from common.tls import TlsStream, client_context, server_context

from helpers import (
    TcpService,
    connect,
    echo_handler,
    exchange,
    hash_until_eof,
    pattern,
    random_bytes,
    recv_exactly,
    reply_after_eof_handler,
    send_and_close_write,
    sha256,
    wait_until,
)
from security_support import TOKEN, make_self_signed, wss_url

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    return make_self_signed(tmp_path_factory.mktemp("tls-halfclose"), "relay")


@pytest.fixture
def tls_tunnel(make_server, make_client, cert):
    """start(service) -> the local port of a proxy on A reaching ``service`` behind B, all over TLS."""
    relay = make_server(token=TOKEN, tls_cert=cert.cert, tls_key=cert.key, tls_only=True)
    a = make_client(wss_url(relay), "A", token=TOKEN, ca_file=cert.cert)
    make_client(wss_url(relay), "B", token=TOKEN, ca_file=cert.cert)
    proxies = []

    def start(service) -> int:
        proxy = a.create_proxy(0, "B", service.port, protocol="tcp")
        proxies.append(proxy)
        return proxy.local_port

    yield start
    for proxy in proxies:
        proxy.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("size_mib", [8, 32, 64])
def test_an_echo_outlives_the_users_half_close(tls_tunnel, services, size_mib):
    """The echo is still flowing back when the user's FIN goes out: none of it may be lost."""
    port = tls_tunnel(services(TcpService(echo_handler, "echo")))
    upload = random_bytes(size_mib * MiB)
    with connect(port, timeout=30) as user:
        digest, size = exchange(user, upload)  # send, SHUT_WR, and read to EOF meanwhile
    assert size == len(upload), f"{size} of {len(upload)} bytes came back"
    assert digest == sha256(upload)


@pytest.mark.timeout(60)
def test_send_half_close_then_read_the_reply(tls_tunnel, services):
    """The service answers only after it has seen the user's EOF."""
    reply_size = 8 * MiB
    port = tls_tunnel(services(TcpService(reply_after_eof_handler(reply_size), "after-eof")))
    upload = random_bytes(8 * MiB)
    with connect(port, timeout=30) as user:
        send_and_close_write(user, upload)
        digest, size = hash_until_eof(user)
    assert size == 32 + reply_size
    assert digest == sha256(hashlib.sha256(upload).digest() + pattern(reply_size))


@pytest.mark.timeout(60)
def test_the_service_half_closes_first_and_the_upload_still_arrives(tls_tunnel, services):
    """The other way round: B's side sends its FIN first while the user is still uploading."""
    download = random_bytes(4 * MiB)

    def handler(conn: socket.socket, service: TcpService) -> None:
        conn.sendall(download)
        conn.shutdown(socket.SHUT_WR)  # the FIN travels back while the upload keeps coming
        received = hash_until_eof(conn)
        service.results.append(received)

    service = services(TcpService(handler, "fin-first"))
    port = tls_tunnel(service)
    upload = random_bytes(32 * MiB)
    with connect(port, timeout=30) as user:
        digest, size = exchange(user, upload)
        wait_until(lambda: service.results, timeout=20)
    assert (digest, size) == (sha256(download), len(download))
    assert service.results == [(sha256(upload), len(upload))]


# --- the TLS layer alone, over a socket pair --------------------------------------------------------

def tls_pair(cert, version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_3) -> tuple[TlsStream, TlsStream]:
    left, right = socket.socketpair()
    for sock in (left, right):
        sock.settimeout(10)
    deadline = time.monotonic() + 10
    context = server_context(cert.cert, cert.key)
    context.maximum_version = version
    result = {}
    thread = threading.Thread(
        target=lambda: result.setdefault("server", TlsStream.handshake(right, context, True, deadline)),
        name="svc-tls-handshake", daemon=True)
    thread.start()
    client = TlsStream.handshake(left, client_context(insecure=True), False, deadline)
    thread.join(10)
    return client, result["server"]


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["tls1.2", "tls1.3"])
def test_reads_continue_after_our_own_close_notify(cert, version):
    client, server = tls_pair(cert, version)
    try:
        payload = random_bytes(3 * MiB)

        def send() -> None:
            server.sendall(payload)
            server.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send, name="svc-tls-sender", daemon=True)
        sender.start()
        assert client.recv(1) == payload[:1]  # records are buffered on the way when we half-close
        assert client._obj.version() == version.name.replace("v1_", "v1.")
        client.shutdown(socket.SHUT_WR)
        digest, size = hash_until_eof(client)
        sender.join(10)
        assert (digest, size) == (sha256(payload[1:]), len(payload) - 1)
        assert server.recv(10) == b""  # our close_notify arrived as a clean end
    finally:
        client.close()
        server.close()


def test_a_tcp_eof_without_close_notify_is_a_truncation(cert):
    client, server = tls_pair(cert)
    try:
        server.sendall(b"partial")
        server._sock.shutdown(socket.SHUT_WR)  # a FIN with no close_notify before it
        assert client.recv(100) == b"partial"
        with pytest.raises(ConnectionResetError):
            client.recv(100)
        assert issubclass(tls.TlsTruncated, ConnectionResetError)
    finally:
        client.close()
        server.close()


def test_a_clean_close_notify_reads_as_eof(cert):
    client, server = tls_pair(cert)
    try:
        server.sendall(b"all of it")
        server.shutdown(socket.SHUT_WR)
        assert client.recv(100) == b"all of it"
        assert client.recv(100) == b""
        assert client.recv(100) == b""  # and stays at the end
    finally:
        client.close()
        server.close()



# --- TLS inside TLS: a sealed stream over a TLS data channel ------------------------------------------

def tcp_pair(send_buffer: int, receive_buffer: int) -> tuple[socket.socket, socket.socket]:
    """A loopback TCP pair (a reset is TCP's, a socketpair has none): left sends with
    ``send_buffer``, right receives with ``receive_buffer``."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)  # inherited by the accepted
        left = socket.socket()
        left.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
        left.settimeout(10)
        left.connect(listener.getsockname())
        right, _ = listener.accept()
        right.settimeout(10)
    return left, right


def handshake_pair(left, right, cert, cls=TlsStream):
    """``cls`` over (left, right): left is the TLS client, right the server."""
    deadline = time.monotonic() + 10
    context = server_context(cert.cert, cert.key)
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("server", cls.handshake(right, context, True, deadline)),
                              name="svc-tls-handshake", daemon=True)
    thread.start()
    client = cls.handshake(left, client_context(insecure=True), False, deadline)
    thread.join(10)
    client.settimeout(10)
    result["server"].settimeout(10)
    return client, result["server"]


class HeldShutdown:
    """A carrier whose shutdown waits for ``ready()``, so that the carrier's own close_notify
    arrives after the far end has read the inner one (as it does now and then through a relay)."""

    def __init__(self, stream: TlsStream, ready):
        self._stream = stream
        self._ready = ready

    def __getattr__(self, name):
        return getattr(self._stream, name)

    def shutdown(self, how: int) -> None:
        wait_until(self._ready, timeout=10, message="the far end read the inner close_notify")
        self._stream.shutdown(how)


def test_a_sealed_stream_read_to_its_end_reads_its_tls_carrier_to_the_end(cert):
    """The inner close_notify comes first, the carrier's a moment later. Left unread, the carrier's
    makes close() send a reset (Linux resets a socket closed with unread data) that throws away
    what the closing side still has queued: the other direction of a half-closed session."""
    a_raw, b_raw = tcp_pair(send_buffer=1024 * 1024, receive_buffer=64 * 1024)
    try:
        a_outer, b_outer = handshake_pair(a_raw, b_raw, cert)
        ends: dict[str, SealedStream] = {}
        held = HeldShutdown(b_outer, lambda: ends["a"]._eof)  # a has read the inner close_notify
        a, b = handshake_pair(a_outer, held, cert, cls=SealedStream)
        ends["a"] = a
        b.sendall(b"reply")
        closer = threading.Thread(target=b.shutdown, args=(socket.SHUT_WR,), name="svc-closer", daemon=True)
        closer.start()
        assert hash_until_eof(a) == (sha256(b"reply"), 5)
        closer.join(10)
        assert not closer.is_alive()
        payload = random_bytes(512 * 1024)  # more than b's receive buffer: part of it is still queued at a's close
        a.sendall(payload)
        a.shutdown(socket.SHUT_WR)
        a.close()
        assert hash_until_eof(b) == (sha256(payload), len(payload))
    finally:
        a_raw.close()
        b_raw.close()


# --- abnormal ends over TLS stay resets ---------------------------------------------------------------

def endless_stream(conn: socket.socket, service: TcpService) -> None:
    block = pattern(64 * 1024)
    while True:
        conn.sendall(block)


def read_how_it_ends(sock: socket.socket) -> str:
    try:
        while sock.recv(1 << 20):
            pass
        return "eof"
    except ConnectionResetError:
        return "reset"


def relay_session(relay):
    sessions = wait_until(lambda: [s for s in relay.sessions.all() if s.pipe is not None], timeout=10)
    return sessions[0]


@pytest.fixture
def tls_relay_and_port(make_server, make_client, cert, services):
    relay = make_server(token=TOKEN, tls_cert=cert.cert, tls_key=cert.key, tls_only=True)
    a = make_client(wss_url(relay), "A", token=TOKEN, ca_file=cert.cert)
    make_client(wss_url(relay), "B", token=TOKEN, ca_file=cert.cert)
    service = services(TcpService(endless_stream, "endless"))
    proxy = a.create_proxy(0, "B", service.port, protocol="tcp")
    yield relay, proxy.local_port
    proxy.close()


@pytest.mark.timeout(60)
def test_a_fin_without_close_notify_reaches_the_user_as_a_reset(tls_relay_and_port):
    relay, port = tls_relay_and_port
    with connect(port, timeout=30) as user:
        recv_exactly(user, 1 << 20)  # the download is under way
        session = relay_session(relay)
        session.sock_a._sock.shutdown(socket.SHUT_WR)  # a bare TCP FIN: the stream is cut, not finished
        assert read_how_it_ends(user) == "reset"


@pytest.mark.timeout(60)
def test_closing_a_session_whose_user_stopped_reading_is_prompt(tls_relay_and_port):
    """The relay's writer to A is stuck on full buffers; closing the session must not wait on it."""
    relay, port = tls_relay_and_port
    with connect(port, timeout=30) as user:
        recv_exactly(user, 1 << 20)
        session = relay_session(relay)
        wait_until(lambda: session.pipe._writing_since[1] and time.monotonic() - session.pipe._writing_since[1] > 2,
                   timeout=20, message="the relay's writer to A is stuck")
        # notify=False: the relay alone must get out (the clients, told, would reset their sides too)
        closer = threading.Thread(target=relay.close_session, args=(session, "closed by the operator", False),
                                  name="svc-closer", daemon=True)
        started = time.monotonic()
        closer.start()
        closer.join(5)
        assert not closer.is_alive(), "close_session blocked on a stuck TLS writer"
        assert time.monotonic() - started < 3
        assert read_how_it_ends(user) == "reset"
        wait_until(lambda: not relay.sessions.all(), timeout=10)
