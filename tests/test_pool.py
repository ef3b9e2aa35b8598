"""Pooled data channels (chuantou_server/pool.py, chuantou_client/pool.py): sessions join over
channels opened ahead of them; the pool counts toward caps, refuses strangers and other clients,
closes idle channels and those of a client that goes offline, and a lost pooled channel falls
back to a new one. The proxies here keep no warm sessions (warm=0): those would take pooled
channels in the background while a test counts them (warm sessions: test_warm.py)."""

from __future__ import annotations

import secrets
import socket

from common.frames import HEADER_SIZE, JoinRequest, JoinStatus, PoolHello, pack_data_header, pack_pool_header

from helpers import HOST, closed_by_peer, connect, echo_roundtrip, recv_exactly, wait_until


def _raw_pool_channel(server, pool_id: str, secret: str) -> tuple[socket.socket, JoinStatus]:
    sock = socket.create_connection((HOST, server.port), timeout=5)
    sock.sendall(pack_pool_header(PoolHello(pool_id, secret)))
    return sock, JoinStatus(recv_exactly(sock, 1)[0])


def _offer(client):
    offer = client.control.register_reply.pool
    assert offer is not None, "the relay offered no pool"
    return offer


def test_sessions_join_over_pooled_channels_and_the_pool_refills(server, make_client, tcp_echo):
    a = make_client(server, "A", pool_count=2)
    b = make_client(server, "B", pool_count=2)
    wait_until(lambda: server.pools.waiting == 4 and a.pool.ready == 2 and b.pool.ready == 2)
    proxy = a.create_proxy(0, "B", tcp_echo.port, "tcp", warm=0)
    for n in range(3):
        assert echo_roundtrip(proxy.local_port) == b"hello through the tunnel"
    assert (a.pool.taken, b.pool.taken) == (3, 3)
    assert server.pools.bound == 6
    wait_until(lambda: server.pools.waiting == 4, message="the pools refill in the background")


def test_no_pool_when_the_client_asks_for_none(server, make_client, tcp_echo):
    a = make_client(server, "A", pool_count=0)
    make_client(server, "B", pool_count=0)
    proxy = a.create_proxy(0, "B", tcp_echo.port, "tcp", warm=0)
    assert echo_roundtrip(proxy.local_port) == b"hello through the tunnel"
    assert server.pools.waiting == 0 and server.pools.bound == 0


def test_a_relay_with_pooling_off_offers_none(make_server, make_client, tcp_echo):
    server = make_server(max_pooled_channels_per_client=0)
    a = make_client(server, "A")
    make_client(server, "B")
    assert a.control.register_reply.pool is None
    proxy = a.create_proxy(0, "B", tcp_echo.port, "tcp", warm=0)
    assert echo_roundtrip(proxy.local_port) == b"hello through the tunnel"
    assert server.pools.bound == 0


def test_strangers_cannot_open_pooled_channels(server, make_client):
    a = make_client(server, "A", pool_count=1)
    offer = _offer(a)
    sock, status = _raw_pool_channel(server, secrets.token_hex(16), secrets.token_hex(16))
    with sock:
        assert status == JoinStatus.UNKNOWN_SESSION
        assert closed_by_peer(sock, 5)
    sock, status = _raw_pool_channel(server, offer.id, secrets.token_hex(16))
    with sock:
        assert status == JoinStatus.BAD_SECRET
        assert closed_by_peer(sock, 5)
    wait_until(lambda: server.pools.waiting == 1)  # only A's own


def test_a_clients_pool_is_capped(make_server, make_client):
    server = make_server(max_pooled_channels_per_client=2)
    a = make_client(server, "A", pool_count=8)  # asks for more than the relay allows
    offer = _offer(a)
    assert offer.size == 2
    wait_until(lambda: a.pool.ready == 2 and server.pools.waiting == 2)
    sock, status = _raw_pool_channel(server, offer.id, offer.secret)  # a third, past the client's own filler
    with sock:
        assert status == JoinStatus.BUSY
        assert closed_by_peer(sock, 5)
    assert server.pools.waiting_for("A") == 2


def test_the_relays_pools_are_capped_overall(make_server, make_client):
    server = make_server(max_pooled_channels=3)
    make_client(server, "A", pool_count=2)
    make_client(server, "B", pool_count=2)
    wait_until(lambda: server.pools.waiting == 3)
    assert server.pools.waiting == 3


def test_a_pooled_channel_binds_only_its_owners_side(server, make_client, tcp_echo):
    a = make_client(server, "A", pool_count=0)
    make_client(server, "B", pool_count=0)
    c = make_client(server, "C", pool_count=0)
    session = server.sessions.create("A", "B", tcp_echo.port, "tcp")
    offer = _offer(c)
    sock, status = _raw_pool_channel(server, offer.id, offer.secret)
    with sock:
        assert status == JoinStatus.JOINED
        sock.sendall(pack_data_header(JoinRequest("A", session.id, session.secret_a)))  # A's secret, C's channel
        assert JoinStatus(recv_exactly(sock, 1)[0]) == JoinStatus.UNKNOWN_SESSION
        assert closed_by_peer(sock, 5)
    assert session.sock_a is None, "C's pooled channel must not join A's side"
    assert a.connected


def test_idle_pooled_channels_are_closed_and_replaced(make_server, make_client, tcp_echo):
    server = make_server(pool_idle_timeout=0.6)
    a = make_client(server, "A", pool_count=1)
    make_client(server, "B", pool_count=1)
    offer = _offer(a)
    sock, status = _raw_pool_channel(server, offer.id, offer.secret)
    with sock:
        assert status == JoinStatus.JOINED
        assert closed_by_peer(sock, 5), "the relay closes a pooled channel left idle"
    first = list(a.pool._ready)
    wait_until(lambda: a.pool.ready == 1 and list(a.pool._ready) != first, timeout=5,
               message="the client replaces a channel before the relay's idle timeout")
    proxy = a.create_proxy(0, "B", tcp_echo.port, "tcp", warm=0)
    assert echo_roundtrip(proxy.local_port) == b"hello through the tunnel"


def test_a_clients_pooled_channels_close_when_it_goes_offline(server, make_client):
    a = make_client(server, "A", pool_count=1)
    offer = _offer(a)
    sock, status = _raw_pool_channel(server, offer.id, offer.secret)
    with sock:
        assert status == JoinStatus.JOINED
        a.stop()
        assert closed_by_peer(sock, 5)
    wait_until(lambda: server.pools.waiting == 0)
    sock, status = _raw_pool_channel(server, offer.id, offer.secret)  # the offer ended with the registration
    with sock:
        assert status == JoinStatus.UNKNOWN_SESSION


def test_a_dead_pooled_channel_falls_back_to_a_new_one(server, make_client, tcp_echo):
    a = make_client(server, "A", pool_count=2)
    b = make_client(server, "B", pool_count=2)
    wait_until(lambda: a.pool.ready == 2 and b.pool.ready == 2 and server.pools.waiting == 4)
    for client_id in ("A", "B"):  # the relay drops them behind the clients' backs
        conn = server.registry.get(client_id)
        for pooled in list(conn.pool.sockets):
            pooled.shutdown(socket.SHUT_RDWR)
    proxy = a.create_proxy(0, "B", tcp_echo.port, "tcp", warm=0)
    assert echo_roundtrip(proxy.local_port) == b"hello through the tunnel"


def test_a_pool_header_of_the_wrong_size_is_just_closed(server):
    with socket.create_connection((HOST, server.port), timeout=5) as sock:
        sock.sendall(b"\xfd\x06X" + bytes(HEADER_SIZE - 3))  # names no 'P' side
        assert closed_by_peer(sock, 5)


def test_b_joins_nothing_for_a_session_its_rules_refuse(server, make_client, tcp_echo):
    a = make_client(server, "A", pool_count=1)
    b = make_client(server, "B", pool_count=1, allow="1")  # tcp_echo's port is not allowed
    wait_until(lambda: a.pool.ready == 1 and b.pool.ready == 1)
    proxy = a.create_proxy(0, "B", tcp_echo.port, "tcp", warm=0)
    with connect(proxy.local_port) as user:
        assert closed_by_peer(user, 10)
    wait_until(lambda: proxy.last_error is not None)
    assert "not allowed" in proxy.last_error
    assert b.pool.taken == 0, "B took a pooled channel for a session it refuses"
    assert b.pool.ready == 1


def test_an_unresolvable_host_is_rejected_after_the_early_join(server, make_client):
    a = make_client(server, "A", pool_count=1)
    b = make_client(server, "B", pool_count=1, allow_hosts=("no-such-host.invalid",))
    wait_until(lambda: a.pool.ready == 1 and b.pool.ready == 1)
    proxy = a.create_proxy(0, "B", 4242, "tcp", target_host="no-such-host.invalid", warm=0)
    with connect(proxy.local_port) as user:
        assert closed_by_peer(user, 15)
    wait_until(lambda: proxy.last_error is not None, timeout=10)
    assert "cannot reach" in proxy.last_error, proxy.last_error
    wait_until(lambda: len(server.sessions) == 0 and not b.pending_connects.in_progress)
