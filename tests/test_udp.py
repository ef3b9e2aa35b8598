"""UDP through a proxy: whole datagrams, one session per user address, idle expiry."""

from __future__ import annotations

import os
import socket

import pytest

from helpers import udp_roundtrip, wait_until


def udp_user() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    sock.bind(("127.0.0.1", 0))
    return sock


@pytest.mark.parametrize("size", [1, 1472, 60_000, 65_507])
def test_datagram_passes_whole(server, client_a, client_b, udp_echo, size):
    proxy = client_a.create_proxy(0, "B", udp_echo.port, protocol="udp")
    payload = os.urandom(size)
    with udp_user() as user:
        assert udp_roundtrip(user, proxy.local_port, payload) == payload
    assert size in udp_echo.sizes  # the service got it in one piece, too
    proxy.close()


def test_each_user_address_gets_its_own_session(server, client_a, client_b, udp_echo):
    proxy = client_a.create_proxy(0, "B", udp_echo.port, protocol="udp")
    users = [udp_user() for _ in range(4)]
    try:
        for round_ in range(5):
            for i, user in enumerate(users):
                data = f"user {i} round {round_}".encode()
                assert udp_roundtrip(user, proxy.local_port, data) == data
        sessions = server.sessions.all()
        assert len(sessions) == 4 and all(s.protocol == "udp" for s in sessions)
        assert proxy.active_connections == 4
        total = sum(len(f"user {i} round {r}") for i in range(4) for r in range(5))
        # the reply counter moves just after the reply is sent, so the last one may lag the user
        wait_until(lambda: (proxy.bytes_sent, proxy.bytes_received) == (total, total),
                   message="the proxy counted every byte each way")
    finally:
        for user in users:
            user.close()
    proxy.close()


@pytest.mark.timeout(30)
def test_idle_udp_session_expires_everywhere_and_a_new_datagram_works(make_server, make_client, udp_echo):
    server = make_server(udp_idle_timeout=1.0)
    a = make_client(server, "A", udp_idle_timeout=1.0)
    b = make_client(server, "B", udp_idle_timeout=1.0)
    proxy = a.create_proxy(0, "B", udp_echo.port, protocol="udp")

    with udp_user() as user:
        assert udp_roundtrip(user, proxy.local_port, b"before") == b"before"
        (first,) = server.sessions.all()

        wait_until(lambda: len(server.sessions) == 0, timeout=6, message="the relay expires the idle session")
        wait_until(lambda: proxy.active_connections == 0, timeout=6, message="A forgets the idle flow")
        wait_until(lambda: b.status()["activeSessions"] == 0, timeout=6, message="B ends its idle session")

        assert udp_roundtrip(user, proxy.local_port, b"after") == b"after"
        (second,) = server.sessions.all()
        assert second.id != first.id
    proxy.close()


def test_udp_proxy_to_an_offline_client_drops_quietly_and_recovers(server, client_a, make_client, udp_echo,
                                                                   caplog):
    proxy = client_a.create_proxy(0, "B", udp_echo.port, protocol="udp")
    with udp_user() as user:
        user.sendto(b"nobody", ("127.0.0.1", proxy.local_port))
        wait_until(lambda: any("'B' is not online" in m for m in caplog.messages), message="the flow gave up")
        wait_until(lambda: proxy.active_connections == 0)
        user.settimeout(0.3)
        with pytest.raises(socket.timeout):
            user.recvfrom(65535)
        make_client(server, "B")
        assert udp_roundtrip(user, proxy.local_port, b"somebody") == b"somebody"
    proxy.close()


def test_closing_a_udp_proxy_ends_its_sessions_on_the_relay_and_the_target(server, client_a, client_b, udp_echo):
    # The relay sees no socket close for UDP: the gateway tells it, so nothing waits for the idle timeout.
    proxy = client_a.create_proxy(0, "B", udp_echo.port, protocol="udp")
    with udp_user() as user:
        assert udp_roundtrip(user, proxy.local_port, b"ping") == b"ping"
    assert wait_until(lambda: len(server.sessions) == 1 and len(client_b.sessions) == 1, 5)
    proxy.close()
    assert wait_until(lambda: len(server.sessions) == 0 and len(client_b.sessions) == 0, 5)
