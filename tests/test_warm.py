"""Warm sessions (chuantou_client/warm.py, warmtarget.py): TCP sessions requested, joined and
sealed ahead of their users, with B's service untouched until A's go frame; they serve intact
data, respect B's rules as they are when used, are dropped and refilled when they die, are off
with warm=0 and end with stop()."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import threading

import pytest

import admin_support
from admin_support import CLIENT_API_KEYS
from chuantou_client.app import ClientApp
from chuantou_client.known_clients import AllowFrom
from chuantou_client.warm import DEFAULT_WARM, check_warm_count
from common import protocol as p
from common.errors import ChuantouError

from helpers import (
    TcpService, closed_by_peer, connect, echo_roundtrip, exchange, free_port, http_json, recv_until_eof, relay_url,
    sha256, wait_until,
)

SIZE = 3 * 1024 * 1024
# the admin tests' fixtures (a relay with an admin page, clients of it, a ClientApp with its local API)
relay, clients, client_app = admin_support.relay, admin_support.clients, admin_support.client_app


class CountingEcho(TcpService):
    """An echo service that counts the connections it accepted."""

    def __init__(self):
        super().__init__(self._handle, "warm-echo")
        self.accepted = 0
        self._count_lock = threading.Lock()

    def _handle(self, conn: socket.socket, service) -> None:
        with self._count_lock:
            self.accepted += 1
        while True:
            data = conn.recv(1 << 16)
            if not data:
                return
            conn.sendall(data)


@pytest.fixture
def echo(services) -> CountingEcho:
    return services(CountingEcho())


def _relay_sessions(server) -> list:
    return server.sessions.all()


def test_warm_sessions_serve_users_and_the_service_sees_nothing_before(server, make_client, echo):
    a = make_client(server, "A")
    b = make_client(server, "B")
    proxy = a.create_proxy(0, "B", echo.port, "tcp", warm=2)
    wait_until(lambda: proxy.warm.ready == 2, message="two warm sessions are made")
    assert echo.accepted == 0, "B connects to its service only when a user comes"
    assert len(_relay_sessions(server)) == 2 and all(s.warm and s.joined for s in _relay_sessions(server))
    assert b.pending_connects.in_progress == 0, "a sealed warm session holds no pending-setup slot"
    assert len(b.warm_holds) == 2
    assert proxy.info()["activeConnections"] == 0 and a.connections() == [] and b.connections() == []

    for n in range(3):
        wait_until(lambda: proxy.warm.ready == 2, message="the pool refills in the background")
        payload = os.urandom(SIZE)
        with connect(proxy.local_port) as user:
            assert exchange(user, payload) == (sha256(payload), SIZE)
        assert echo.accepted == n + 1
    assert proxy.warm.taken == 3 and proxy.warm.fallbacks == 0
    info = proxy.info()
    assert info["totalConnections"] == 3 and info["warm"] == 2 and info["warmTaken"] == 3
    # every byte counted once, those that went with the go frame too
    wait_until(lambda: (proxy.bytes_sent, proxy.bytes_received) == (3 * SIZE, 3 * SIZE))


def test_a_user_that_speaks_first_has_its_bytes_sent_with_the_go_frame(server, make_client, echo):
    a = make_client(server, "A")
    make_client(server, "B")
    proxy = a.create_proxy(0, "B", echo.port, "tcp", warm=1)
    wait_until(lambda: proxy.warm.ready == 1)
    with socket.create_connection(("127.0.0.1", proxy.local_port), timeout=5) as user:
        user.sendall(b"first words")
        user.shutdown(socket.SHUT_WR)  # and its FIN right behind: both reach the service, in order
        assert recv_until_eof(user) == b"first words"
    assert proxy.warm.taken == 1
    wait_until(lambda: proxy.bytes_sent == len(b"first words"))


def test_a_service_that_speaks_first_is_heard_only_by_the_user(server, make_client, services):
    greeter = services(TcpService(lambda conn, service: (conn.sendall(b"220 hello\r\n"), conn.recv(16)),
                                  "greeter"))
    a = make_client(server, "A")
    make_client(server, "B")
    proxy = a.create_proxy(0, "B", greeter.port, "tcp", warm=1)
    wait_until(lambda: proxy.warm.ready == 1)
    with connect(proxy.local_port) as user:
        assert user.recv(64) == b"220 hello\r\n"
    assert proxy.warm.taken == 1


def test_a_warm_session_taken_after_allow_from_changed_is_refused(server, make_client, echo):
    a = make_client(server, "A")
    b = make_client(server, "B")
    proxy = a.create_proxy(0, "B", echo.port, "tcp", warm=1)
    wait_until(lambda: proxy.warm.ready == 1)
    b.sealing.allow_from = AllowFrom(["someone-else"])  # B's rules change while the session waits
    with connect(proxy.local_port) as user:
        user.sendall(b"hello")
        assert closed_by_peer(user, 5.0), "B refuses the session at its go frame"
    assert echo.accepted == 0
    wait_until(lambda: proxy.last_error is not None and "does not accept" in proxy.last_error)
    wait_until(lambda: proxy.warm.problem is not None, message="the refill is refused too, and said why")
    assert proxy.warm.ready == 0
    b.sealing.allow_from = AllowFrom([])


def test_warm_zero_sets_each_session_up_as_before(server, make_client, echo):
    a = make_client(server, "A")
    make_client(server, "B")
    proxy = a.create_proxy(0, "B", echo.port, "tcp", warm=0)
    assert not any(t.name.endswith("-warm") for t in threading.enumerate() if t.name.startswith(proxy.threads.prefix))
    assert len(_relay_sessions(server)) == 0
    assert echo_roundtrip(proxy.local_port) == b"hello through the tunnel"
    assert proxy.warm.taken == 0 and proxy.info()["warmState"] == "off"
    assert echo.accepted == 1


def test_a_dead_warm_session_falls_back_to_a_fresh_setup(server, make_client, echo):
    a = make_client(server, "A")
    make_client(server, "B")
    proxy = a.create_proxy(0, "B", echo.port, "tcp", warm=1)
    wait_until(lambda: proxy.warm.ready == 1)
    (session,) = _relay_sessions(server)
    session.pipe.abort()  # the relay resets both halves and tells nobody (as a crash or a cut would)
    wait_until(lambda: server.sessions.get(session.id) is None)
    assert echo_roundtrip(proxy.local_port) == b"hello through the tunnel"
    assert proxy.warm.fallbacks == 1 and proxy.warm.taken == 0
    assert proxy.last_error is None
    wait_until(lambda: proxy.warm.ready == 1, message="refilled")


def test_warm_sessions_are_recycled_after_their_lifetime(server, make_client, echo):
    a = make_client(server, "A")
    b = make_client(server, "B")
    proxy = a.create_proxy(0, "B", echo.port, "tcp", warm=1)
    wait_until(lambda: proxy.warm.ready == 1)
    (first,) = _relay_sessions(server)
    proxy.warm.lifetime = 0.3
    wait_until(lambda: server.sessions.get(first.id) is None, message="the old session ends")
    wait_until(lambda: proxy.warm.ready == 1 and len(_relay_sessions(server)) == 1)
    assert _relay_sessions(server)[0].id != first.id
    proxy.warm.lifetime = 60.0
    assert echo_roundtrip(proxy.local_port) == b"hello through the tunnel"
    assert echo.accepted == 1 and len(b.warm_holds) <= 1


def test_a_target_going_offline_drops_its_warm_sessions(server, make_client, echo):
    a = make_client(server, "A")
    b = make_client(server, "B")
    proxy = a.create_proxy(0, "B", echo.port, "tcp", warm=2)
    wait_until(lambda: proxy.warm.ready == 2)
    b.stop()
    wait_until(lambda: proxy.warm.ready == 0, message="the relay's session_closed drops them")
    wait_until(lambda: len(_relay_sessions(server)) == 0)
    make_client(server, "B", identity=b.sealing.identity)
    wait_until(lambda: proxy.warm.ready == 2, timeout=10.0, message="refilled once the target is back")
    assert echo_roundtrip(proxy.local_port) == b"hello through the tunnel"


def test_an_older_target_gets_no_warm_request(server, make_client, peers, echo):
    a = make_client(server, "A")
    old_b = peers(server)
    old_b.register("B")  # registers with no features, as an older chuantou would
    proxy = a.create_proxy(0, "B", echo.port, "tcp", warm=1)
    wait_until(lambda: proxy.warm.problem is not None and "not supported" in proxy.warm.problem)
    assert len(_relay_sessions(server)) == 0, "the relay refused it before offering anything to B"
    with pytest.raises(Exception):
        old_b.recv_until(p.ConnectOffer, timeout=0.3)


def test_stop_ends_warm_sessions_on_both_sides(server, make_client, echo):
    a = make_client(server, "A")
    b = make_client(server, "B")
    proxy = a.create_proxy(0, "B", echo.port, "tcp", warm=2)
    wait_until(lambda: proxy.warm.ready == 2)
    proxy.close()
    assert proxy.warm.ready == 0
    wait_until(lambda: len(b.warm_holds) == 0 and len(_relay_sessions(server)) == 0)
    assert echo.accepted == 0
    # (the autouse fixture checks that every thread of A, B and the relay ends)


def test_the_warm_count_is_checked():
    for bad in (-1, 17, True, "2", 1.5):
        with pytest.raises(ChuantouError, match="warm sessions"):
            check_warm_count(bad)
    assert check_warm_count(0) == 0 and check_warm_count(16) == 16


def test_only_a_tcp_session_may_be_warm():
    with pytest.raises(p.ProtocolError, match="warm"):
        p.decode(p.encode(p.ConnectRequest(toClientId="B", remotePort=80, protocol="udp", warm=True)), "client")
    offer = p.decode('{"type":"connect_request","payload":{"fromClientId":"A","sessionId":"s","secret":"x",'
                     '"relayAddr":{"host":"h","port":1,"protocol":"tcp"},"remotePort":80,"warm":true}}', "relay")
    assert offer.warm is True
    with pytest.raises(p.ProtocolError, match="features"):
        p.decode('{"type":"register","payload":{"clientId":"A","protocolVersion":2,"features":["Bad Name"]}}',
                 "client")


def test_the_api_takes_saves_and_restores_a_warm_count(client_app, clients, relay, tmp_path):
    clients("B")
    api = client_app.admin.port
    headers = {"Origin": f"http://127.0.0.1:{api}", "X-Chuantou-Key": CLIENT_API_KEYS[api]}
    port, default_port = free_port(), free_port()
    status, _, reply = http_json(api, "POST", "/api/proxies", headers,
                                 {"localPort": port, "targetClient": "B", "targetPort": 22, "warm": 3})
    assert status == 201, reply
    assert reply["proxy"]["warm"] == 3
    status, _, reply = http_json(api, "POST", "/api/proxies", headers,
                                 {"localPort": default_port, "targetClient": "B", "targetPort": 22})
    assert status == 201 and reply["proxy"]["warm"] == DEFAULT_WARM
    saved = json.loads((tmp_path / "client.json").read_text())["proxies"]
    assert [entry.get("warm") for entry in saved] == [3, None], "the default is not saved"
    status, _, reply = http_json(api, "POST", "/api/proxies", headers,
                                 {"localPort": free_port(), "targetClient": "B", "targetPort": 22, "warm": 99})
    assert status == 400 and "warm sessions 99" in reply["error"] and "--warm" in reply["error"]
    client_app.stop()
    again = ClientApp(tmp_path / "client.json", {"server": relay_url(relay), "clientId": "A2", "adminPort": 0},
                      api_secret_path=tmp_path / "again.secret").start()
    try:
        assert sorted(x["warm"] for x in again.proxies()) == [DEFAULT_WARM, 3]
    finally:
        again.stop()


def test_a_relay_that_drops_the_warm_flag_gets_no_session_used(server, make_client, services, monkeypatch):
    """A relay that lies (it strips ``warm`` from B's offer, so B connects to its service at once):
    A sees no sealed WARM_READY from B and never hands the session to a user."""
    from chuantou_server import signaling

    real_send = signaling.ControlConnection.send

    def stripping_send(self, msg):
        if isinstance(msg, p.ConnectOffer) and msg.warm:
            msg = dataclasses.replace(msg, warm=None)
        return real_send(self, msg)

    monkeypatch.setattr(signaling.ControlConnection, "send", stripping_send)
    greeter = services(TcpService(lambda conn, service: (conn.sendall(b"220 hello\r\n"), conn.recv(16)),
                                  "greeter"))
    a = make_client(server, "A")
    make_client(server, "B")
    proxy = a.create_proxy(0, "B", greeter.port, "tcp", warm=1)
    wait_until(lambda: proxy.warm.problem is not None and "did not hold" in proxy.warm.problem)
    assert proxy.warm.ready == 0
    with connect(proxy.local_port) as user:  # a fresh set-up, as without warm sessions
        assert user.recv(64) == b"220 hello\r\n"
    assert proxy.warm.taken == 0


def test_warm_sessions_are_dropped_and_refilled_when_the_relay_connection_is_lost(make_server, make_client, echo):
    server = make_server()
    port = server.port
    a = make_client(server, "A", reconnect_max_delay=0.5)
    b = make_client(server, "B", reconnect_max_delay=0.5)
    proxy = a.create_proxy(0, "B", echo.port, "tcp", warm=1)
    wait_until(lambda: proxy.warm.ready == 1)
    (first,) = server.sessions.all()
    server.stop()
    wait_until(lambda: proxy.warm.ready == 0 and len(b.warm_holds) == 0, message="dropped with the connection")
    again = make_server(port=port)
    wait_until(lambda: proxy.warm.ready == 1, timeout=15.0, message="refilled after the new registration")
    assert again.sessions.all()[0].id != first.id
    assert echo_roundtrip(proxy.local_port) == b"hello through the tunnel"
    assert echo.accepted == 1 and proxy.warm.taken == 1


def test_a_warm_session_counts_against_the_relays_caps(make_server, make_client, echo):
    server = make_server(max_sessions_per_target=1)
    a = make_client(server, "A")
    make_client(server, "B")
    warm = a.create_proxy(0, "B", echo.port, "tcp", warm=1)
    wait_until(lambda: warm.warm.ready == 1)
    cold = a.create_proxy(0, "B", echo.port, "tcp", warm=0)
    with connect(cold.local_port) as user:
        assert closed_by_peer(user, 5.0), "the target's one session is the warm one"
    wait_until(lambda: cold.last_error is not None and "maxSessionsPerTarget" in cold.last_error)
    assert echo_roundtrip(warm.local_port) == b"hello through the tunnel"  # the warm one serves its user
