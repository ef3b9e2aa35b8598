"""Bulk and concurrent TCP traffic through one proxy: bytes arrive whole, in order, both ways."""

from __future__ import annotations

import hashlib
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from helpers import (
    TcpService,
    connect,
    exchange,
    exchange_handler,
    pattern,
    random_bytes,
    recv_exactly,
    recv_until_eof,
    reply_after_eof_handler,
    send_and_close_write,
    sha256,
    wait_until,
)

MiB = 1024 * 1024


@pytest.mark.timeout(90)
def test_64_mib_each_way_at_once_with_equal_sha256(server, client_a, client_b, services):
    upload = random_bytes(64 * MiB)
    download = random_bytes(64 * MiB)
    service = services(TcpService(exchange_handler(download), "exchange"))
    proxy = client_a.create_proxy(0, "B", service.port, protocol="tcp")

    with connect(proxy.local_port, timeout=60) as user:
        received = exchange(user, upload)

    assert received == (sha256(download), len(download)), "the download differs"
    wait_until(lambda: service.results)
    assert service.results == [{"received": (sha256(upload), len(upload))}], "the upload differs"
    # the proxy's byte counters saw every byte once the connection is done
    wait_until(lambda: proxy.active_connections == 0)
    assert (proxy.bytes_sent, proxy.bytes_received) == (len(upload), len(download))
    wait_until(lambda: len(server.sessions) == 0)
    proxy.close()


@pytest.mark.timeout(60)
def test_relay_counts_bytes_per_session_and_direction(server, client_a, client_b, tcp_echo):
    proxy = client_a.create_proxy(0, "B", tcp_echo.port, protocol="tcp")
    with connect(proxy.local_port) as user:
        user.sendall(b"x" * 100_000)
        assert recv_exactly(user, 100_000) == b"x" * 100_000
        (session,) = wait_until(lambda: server.sessions.all())
        assert (session.client_a, session.client_b) == ("A", "B")
        # sessions are sealed: the relay counts ciphertext, the bytes plus the handshake and
        # the records' overhead (a few KiB; the volume is what a relay still sees)
        wait_until(lambda: 100_000 < session.bytes_a_to_b < 108_000 and 100_000 < session.bytes_b_to_a < 108_000)
    proxy.close()


@pytest.mark.timeout(60)
def test_50_concurrent_connections_through_one_proxy(server, client_a, client_b, tcp_echo):
    proxy = client_a.create_proxy(0, "B", tcp_echo.port, protocol="tcp")
    count = 50
    seen_at_peak = []
    all_open = threading.Barrier(
        count, action=lambda: seen_at_peak.append((proxy.active_connections, len(server.sessions))), timeout=30)

    def user(i: int) -> bool:
        payload = hashlib.sha256(str(i).encode()).digest() * 2048  # 64 KiB, different per connection
        with connect(proxy.local_port, timeout=30) as sock:
            sock.sendall(b"hello %03d" % i)
            assert recv_exactly(sock, 9) == b"hello %03d" % i
            all_open.wait()  # every connection is through before any bulk data moves
            sock.sendall(payload)
            assert recv_exactly(sock, len(payload)) == payload
            sock.shutdown(socket.SHUT_WR)
            assert recv_until_eof(sock) == b""  # the echo service closes after our FIN
        return True

    with ThreadPoolExecutor(max_workers=count, thread_name_prefix="svc-user") as pool:
        results = list(pool.map(user, range(count), timeout=50))

    assert results == [True] * count
    assert seen_at_peak == [(count, count)]
    wait_until(lambda: proxy.active_connections == 0 and len(server.sessions) == 0)
    assert proxy.connections_total == count
    proxy.close()


@pytest.mark.timeout(60)
def test_half_close_user_shuts_write_and_still_reads_the_whole_reply(server, client_a, client_b, services):
    reply_size = 1 * MiB
    service = services(TcpService(reply_after_eof_handler(reply_size), "reply-after-eof"))
    proxy = client_a.create_proxy(0, "B", service.port, protocol="tcp")
    request = random_bytes(3 * MiB + 17)

    with connect(proxy.local_port) as user:
        send_and_close_write(user, request)  # FIN: the service sees EOF only if the FIN is passed on
        reply = recv_until_eof(user)

    assert len(reply) == 32 + reply_size
    assert reply[:32] == hashlib.sha256(request).digest()
    assert reply[32:] == pattern(reply_size)
    wait_until(lambda: len(server.sessions) == 0)
    proxy.close()


@pytest.mark.timeout(60)
def test_half_close_the_other_way_service_finishes_first_user_keeps_sending(server, client_a, client_b, services):
    """The service sends its whole answer and FIN first; the user's upload after that still arrives."""
    got = []

    def greet_then_collect(conn, service):
        conn.sendall(b"send me everything")
        conn.shutdown(socket.SHUT_WR)
        got.append(recv_until_eof(conn))

    service = services(TcpService(greet_then_collect, "collect"))
    proxy = client_a.create_proxy(0, "B", service.port, protocol="tcp")
    upload = random_bytes(2 * MiB)
    with connect(proxy.local_port) as user:
        assert recv_until_eof(user) == b"send me everything"  # the service's FIN reached the user
        send_and_close_write(user, upload)
        wait_until(lambda: got)
    assert sha256(got[0]) == sha256(upload)
    proxy.close()
