"""Hostile input and resource limits. Each test throws one kind of bad input at the relay while a
64 MiB upload runs through it (security_support.long_transfer), and checks that the input gets
a clear error or a quiet close, that the upload arrives with the same sha256, and that nothing
else is disturbed. (The client's local API is tested in test_cli.py.)"""

from __future__ import annotations

import dataclasses
import json
import os
import selectors
import socket
import threading
import time

import pytest

from common import protocol as p
from common.frames import HEADER_SIZE, JoinRequest, JoinStatus, pack_data_header, pack_udp_register, unpack_udp_ack

from helpers import (
    HOST,
    SERVICE_THREAD_PREFIX,
    TcpService,
    UdpEchoService,
    connect,
    echo_handler,
    recv_exactly,
    udp_roundtrip,
    wait_until,
)
from udp_support import register_by_hand
from security_support import (
    PROMPT,
    TOKEN,
    closed_without_reply,
    echo_roundtrip,
    logged,
    long_transfer,
    peers,  # noqa: F401 (fixture)
    registered_peer,
    udp_socket,
)

pytestmark = pytest.mark.timeout(60)

MAX_MESSAGE = 4096


@pytest.fixture
def relay(make_server):
    return make_server(token=TOKEN, handshake_timeout=1.0, max_message_size=MAX_MESSAGE, session_join_timeout=2.0)


@pytest.fixture
def transfer(relay, make_client, services):
    """The running 64 MiB upload; checked for its sha256 when the test body is done."""
    with long_transfer(relay, make_client, services) as running:
        yield running


def stranger(relay, data: bytes = b"", source: str = HOST) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((source, 0))
    sock.settimeout(5)
    sock.connect((HOST, relay.port))
    try:
        sock.sendall(data)
    except (ConnectionResetError, BrokenPipeError):  # the relay hung up before reading it all
        pass
    return sock


def assert_closed_quietly(relay, data: bytes, within: float = PROMPT, then_eof: bool = False) -> bytes:
    """Send ``data`` on a fresh connection (and a FIN, if ``then_eof``); the relay must close it
    within ``within`` s. Returns its answer."""
    with stranger(relay, data) as sock:
        if then_eof:
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        closed, answer = closed_without_reply(sock, within)
    assert closed, f"the relay kept a connection that sent {data[:16]!r}"
    return answer


# --- the relay port ------------------------------------------------------------------------------

def test_random_bytes_on_the_relay_port(relay, transfer):
    for size in (1, 2, 35, 4096, 100_000) * 4:
        data = os.urandom(size)
        answer = assert_closed_quietly(relay, data, then_eof=True)  # no waiting for the rest of an 'HTTP' head
        # 'G...' gets an HTTP error, and the 1 in 65536 that starts with the data magic an "unknown session"
        assert answer in (b"", bytes([JoinStatus.UNKNOWN_SESSION])) or answer.startswith(b"HTTP/1.1 4"), \
            (data[:8], answer[:60])
    wait_until(lambda: relay.handshakes.pending == 0)
    assert transfer.relayed > 0


def test_a_truncated_data_channel_header(relay, transfer):
    header = pack_data_header(JoinRequest("A", transfer.session.id, transfer.session.secret_a))
    cuts = (1, 2, 3, 19, HEADER_SIZE - 1)
    for cut in cuts:  # then EOF: closed at once
        assert assert_closed_quietly(relay, header[:cut], then_eof=True) == b""
    started = time.monotonic()
    silent = [stranger(relay, header[:cut]) for cut in cuts]  # then silence: dropped at the handshake deadline
    try:
        for sock in silent:
            assert closed_without_reply(sock, relay.config.handshake_timeout + PROMPT) == (True, b"")
    finally:
        for sock in silent:
            sock.close()
    assert time.monotonic() - started >= relay.config.handshake_timeout * 0.8
    assert transfer.session.pipe is not None and not transfer.session.closed


def test_a_data_channel_header_for_an_unknown_session_or_with_a_wrong_secret(relay, transfer):
    session = transfer.session
    cases = [
        (JoinRequest("A", os.urandom(16).hex(), os.urandom(16).hex()), JoinStatus.UNKNOWN_SESSION),
        (JoinRequest("A", session.id, os.urandom(16).hex()), JoinStatus.BAD_SECRET),
        (JoinRequest("B", session.id, session.secret_a), JoinStatus.BAD_SECRET),  # A's secret does not open B
        (JoinRequest("A", session.id, session.secret_a), JoinStatus.ALREADY_JOINED),
    ]
    for join, status in cases:
        answer = assert_closed_quietly(relay, pack_data_header(join))
        assert answer == bytes([status]), (join.side, status, answer)
    assert relay.sessions.get(session.id) is session and session.sock_a is not None


def test_an_http_request_with_huge_headers_gets_431(relay, transfer):
    head = b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-Pad-%d: %s\r\n" % (i, b"a" * 200) for i in range(120))
    answer = assert_closed_quietly(relay, head + b"\r\n")
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:60]


def test_a_websocket_message_over_the_size_limit_ends_only_that_channel(relay, transfer, peers):
    watcher = registered_peer(peers, relay, "watcher")
    big = registered_peer(peers, relay, "big")
    big.send("x" * (MAX_MESSAGE + 1))
    assert big.closed_by_relay(PROMPT)
    wait_until(lambda: "big" not in relay.registry.ids())
    watcher.send(p.GetClientList(requestId="q"))
    assert sorted(c.id for c in watcher.recv_until(p.ClientList).clients) == ["watcher", "xfer-a", "xfer-b"]
    # a message just inside the limit is answered, not dropped
    watcher.send(json.dumps({"type": "heartbeat", "payload": {"timestamp": 1, "pad": "y" * (MAX_MESSAGE - 100)}}))
    assert watcher.recv_until(p.Heartbeat).timestamp == 1.0


def test_an_oversized_message_right_behind_a_burst_of_bad_ones_closes_the_channel_cleanly(relay, transfer, peers):
    """The relay is still answering the burst when the library closes the channel for the big one."""
    for _ in range(3):
        peer = registered_peer(peers, relay, "bursty")
        for i in range(300):
            peer.send("{bad json %d" % i)
        peer.send("x" * (MAX_MESSAGE + 1))
        assert peer.closed_by_relay(PROMPT)
        wait_until(lambda: "bursty" not in relay.registry.ids())
    # the conftest check fails this test if the relay's thread died on the answers it could not send


@pytest.mark.parametrize("frame, problem", [
    ("{not json", "not valid JSON"),
    ('"a string"', "JSON object"),
    (b"\xff\xfe binary junk", "not UTF-8"),
    ("[" * 2000 + "]" * 2000, "not valid JSON"),
], ids=["bad-json", "not-an-object", "not-utf8", "deep-nesting"])
def test_bad_json_is_answered_with_an_error_and_the_channel_survives(relay, transfer, peers, frame, problem):
    peer = registered_peer(peers, relay, "chatty")
    peer.send(frame)
    error = peer.recv_until(p.Error)
    assert error.code == "bad_message" and problem in error.message
    assert_channel_alive(peer)


def assert_channel_alive(peer) -> None:
    peer.send(p.Heartbeat(timestamp=7.0))
    assert peer.recv_until(p.Heartbeat) == p.Heartbeat(timestamp=7.0)


@pytest.mark.parametrize("payload, problem", [
    ({"type": "connect_request", "payload": {"toClientId": 5, "remotePort": 80}}, "toClientId must be a string"),
    ({"type": "connect_request", "payload": {"toClientId": "xfer-b", "remotePort": "80"}}, "must be an integer"),
    ({"type": "connect_request", "payload": {"toClientId": "xfer-b", "remotePort": True}}, "must be an integer"),
    ({"type": "connect_request", "payload": {"toClientId": "xfer-b", "remotePort": 80, "protocol": 6}},
     "must be a string"),
    ({"type": "heartbeat", "payload": {"timestamp": "noon"}}, "must be a number"),
    ({"type": "heartbeat", "payload": {"timestamp": int("9" * 400)}}, "timestamp"),
    ({"type": "heartbeat", "payload": []}, "payload must be an object"),
    ({"type": "accept_session", "payload": {"sessionId": {"$gt": ""}}}, "must be a string"),
    ({"type": 7, "payload": {}}, "no string 'type'"),
], ids=["id-int", "port-str", "port-bool", "protocol-int", "ts-str", "ts-huge", "payload-list", "id-object",
        "type-int"])
def test_wrong_field_types_are_answered_with_an_error(relay, transfer, peers, payload, problem):
    peer = registered_peer(peers, relay, "typo")
    peer.send(json.dumps(payload))
    error = peer.recv_until(p.Error)
    assert error.code == "bad_message" and problem in error.message, error
    assert_channel_alive(peer)
    assert relay.sessions.all() == [transfer.session]


def test_unknown_message_types_and_relay_only_messages_are_refused(relay, transfer, peers):
    peer = registered_peer(peers, relay, "odd")
    for frame in ('{"type": "teleport", "payload": {}}', '{"type": "' + "z" * 3000 + '"}',
                  p.encode(p.CreateSession(sessionId="00" * 16, peerClientId="xfer-b", secret="00" * 16,
                                           service=p.Service(port=1, protocol="tcp"),
                                           relayAddr=p.RelayAddr(host="h", port=1, protocol="tcp"))),
                  p.encode(p.Challenge(nonce="n"))):
        peer.send(frame)
        error = peer.recv_until(p.Error)
        assert error.code == "bad_message" and len(error.message) < 200, error
    assert_channel_alive(peer)


@pytest.mark.parametrize("request_, code, text", [
    (p.ConnectRequest(toClientId="self", remotePort=22), "bad_request", "this client itself"),
    (p.ConnectRequest(toClientId="nobody", remotePort=22), "client_offline", "'nobody' is not online"),
], ids=["itself", "unknown-client"])
def test_connect_request_to_itself_or_an_unknown_client(relay, transfer, peers, request_, code, text):
    peer = registered_peer(peers, relay, "self")
    peer.send(dataclasses.replace(request_, requestId="r"))
    error = peer.recv_until(p.Error)
    assert (error.code, error.requestId) == (code, "r") and text in error.message
    assert relay.sessions.all() == [transfer.session]
    assert_channel_alive(peer)


@pytest.mark.parametrize("port", [0, 70000, -1])
def test_connect_request_to_port_out_of_range(relay, transfer, peers, port):
    peer = registered_peer(peers, relay, "ports")
    peer.send(json.dumps({"type": "connect_request", "payload": {"toClientId": "xfer-b", "remotePort": port}}))
    error = peer.recv_until(p.Error)
    assert error.code == "bad_message" and f"remotePort {port} is outside 1-65535" in error.message
    assert relay.sessions.all() == [transfer.session]


def test_messages_before_register_are_refused(relay, transfer, peers):
    peer = peers(relay)
    for msg in (p.GetClientList(requestId="q"), p.ConnectRequest(toClientId="xfer-b", remotePort=22),
                p.AcceptSession(sessionId=transfer.session.id), p.Heartbeat(timestamp=1.0), p.Unregister()):
        peer.send(msg)
        error = peer.recv_until(p.Error)
        assert error.code == "not_registered" and f"'{msg.TYPE}'" in error.message
    assert relay.sessions.all() == [transfer.session]
    assert peer.closed_by_relay(relay.config.handshake_timeout + PROMPT)  # and it never registered: dropped


def test_a_malformed_websocket_upgrade_is_refused_cleanly(relay, transfer):
    base = b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    for extra in (b"", b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 99\r\n",
                  b"Sec-WebSocket-Version: 13\r\n"):
        answer = assert_closed_quietly(relay, base + extra + b"\r\n")
        assert answer.startswith(b"HTTP/1.1 400 "), answer[:80]


# --- slow-loris and the handshake caps ------------------------------------------------------------

class Flood:
    """Many connections from one source address that send nothing or trickle a byte at a time.

    One thread opens them, trickles, and records when the relay closes each one.
    """

    TRICKLE = (b"GET /" + b"a" * 100, b"\xfd\x01A" + b"\x00" * 40)

    def __init__(self, relay, count: int, source: str, trickle_every: int = 3):
        self.relay = relay
        self.count = count
        self.source = source
        self.trickle_every = trickle_every
        self.socks: list[socket.socket] = []
        self.opened_at: dict[socket.socket, float] = {}
        self.closed_at: dict[socket.socket, float] = {}
        self.opened = threading.Event()
        self.all_closed = threading.Event()
        self.errors: list[BaseException] = []
        self.max_pending = 0  # the relay's pending handshakes, sampled while the flood lasts
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"{SERVICE_THREAD_PREFIX}flood", daemon=True)
        self._thread.start()
        assert self.opened.wait(30), "could not open the flood's connections"
        assert not self.errors, self.errors

    def _run(self) -> None:
        selector = selectors.DefaultSelector()
        trickling: dict[socket.socket, bytes] = {}
        try:
            for i in range(self.count):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                self.socks.append(sock)
                sock.bind((self.source, 0))
                sock.settimeout(5)
                sock.connect((HOST, self.relay.port))
                sock.setblocking(False)
                self.opened_at[sock] = time.monotonic()
                selector.register(sock, selectors.EVENT_READ)
                if i % self.trickle_every == 0:
                    trickling[sock] = self.TRICKLE[i % 2]
                if i % 50 == 0:
                    self._watch(selector, 0)
                    self.max_pending = max(self.max_pending, self.relay.handshakes.pending)
        except OSError as exc:
            self.errors.append(exc)
        finally:
            self.opened.set()
        sent = 0
        next_byte = time.monotonic()
        try:
            while not self._stop.is_set() and len(self.closed_at) < len(self.socks):
                self._watch(selector, 0.02)
                self.max_pending = max(self.max_pending, self.relay.handshakes.pending)
                if time.monotonic() >= next_byte:  # one byte per trickling connection every 0.1 s
                    next_byte += 0.1
                    for sock, data in trickling.items():
                        if sock not in self.closed_at and sent < len(data):
                            try:
                                sock.send(data[sent:sent + 1])
                            except OSError:
                                pass
                    sent += 1
        finally:
            selector.close()
            self.all_closed.set()

    def _watch(self, selector, timeout: float) -> None:
        for key, _ in selector.select(timeout):
            try:
                data = key.fileobj.recv(4096)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                self.closed_at[key.fileobj] = time.monotonic()
                selector.unregister(key.fileobj)

    def lifetimes(self) -> list[float]:
        return [self.closed_at[s] - self.opened_at[s] for s in self.socks if s in self.closed_at]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for sock in self.socks:
            sock.close()


@pytest.mark.timeout(90)
def test_slow_loris_from_one_address_is_capped_and_dropped_by_the_deadline(make_server, make_client, services,
                                                                           caplog):
    per_ip, count, source = 200, 1500, "127.0.0.2"
    relay = make_server(token=TOKEN, handshake_timeout=1.5, max_pending_handshakes_per_source=per_ip)
    echo = services(TcpService(echo_handler, "echo"))
    with long_transfer(relay, make_client, services) as transfer:
        flood = Flood(relay, count, source)
        try:
            # meanwhile a client from 127.0.0.1 registers and its proxy works
            late = make_client(relay, "late", token=TOKEN, connect_timeout=5)
            make_client(relay, "late-b", token=TOKEN, connect_timeout=5)
            proxy = late.create_proxy(0, "late-b", echo.port, protocol="tcp")
            assert echo_roundtrip(proxy.local_port) == b"hello through the tunnel"
            proxy.close()
            assert flood.all_closed.wait(relay.config.handshake_timeout + 8)
        finally:
            flood.close()
        assert len(flood.closed_at) == count, f"{count - len(flood.closed_at)} idle connections were never dropped"
        assert flood.max_pending <= per_ip + 10, f"{flood.max_pending} handshakes pending at once"
        messages = [r.getMessage() for r in caplog.records if r.name == "chuantou.server"]
        capped = sum(m.startswith(f"connection from {source}:") and "too many pending handshakes" in m
                     for m in messages)
        expired = sum(m.startswith(f"connection from {source}:") and "dropped:" in m for m in messages)
        assert capped + expired == count, (capped, expired)
        assert capped >= count - per_ip - 10, "the per-IP cap refused too few"
        assert 0 < expired <= per_ip + 10, "connections inside the cap wait for the deadline, then go"
        deadline_drops = [t for t in flood.lifetimes() if t >= relay.config.handshake_timeout * 0.9]
        assert len(deadline_drops) >= expired  # none of the accepted ones was closed before its deadline
        wait_until(lambda: relay.handshakes.pending == 0)
        assert transfer.relayed > 0


def test_the_global_cap_on_pending_handshakes(make_server, make_client, services):
    relay = make_server(token=TOKEN, handshake_timeout=1.0, max_pending_handshakes=20, max_pending_handshakes_per_source=1000)
    with long_transfer(relay, make_client, services):
        flood = Flood(relay, 40, "127.0.0.3", trickle_every=1000)
        try:
            wait_until(lambda: len(flood.closed_at) >= 20, timeout=0.5,
                       message="connections beyond the global cap are closed at once")
            assert relay.handshakes.pending <= 20
            assert flood.all_closed.wait(relay.config.handshake_timeout + 3)
            assert len(flood.closed_at) == 40
        finally:
            flood.close()
        wait_until(lambda: relay.handshakes.pending == 0)
        assert make_client(relay, "after", token=TOKEN).connected  # free again once the deadline passed


# --- per-client caps ----------------------------------------------------------------------------

def test_fourth_concurrent_tcp_session_is_refused_and_the_first_three_keep_working(make_server, make_client,
                                                                                   services, caplog):
    relay = make_server(token=TOKEN, max_sessions_per_client=3)
    echo = services(TcpService(echo_handler, "echo"))
    with long_transfer(relay, make_client, services):  # another client's session: not counted against A
        a = make_client(relay, "A", token=TOKEN)
        make_client(relay, "B", token=TOKEN)
        proxy = a.create_proxy(0, "B", echo.port, protocol="tcp")
        users = [connect(proxy.local_port) for _ in range(3)]
        try:
            for i, user in enumerate(users):
                user.sendall(b"user %d" % i)
                assert recv_exactly(user, 6) == b"user %d" % i
            with connect(proxy.local_port) as fourth:
                assert closed_without_reply(fourth, PROMPT) == (True, b"")
            wait_until(lambda: logged(caplog, "already has 3 open TCP sessions, the relay's limit per client"),
                       message="A logs the clear error")
            for i, user in enumerate(users):
                user.sendall(b"again %d" % i)
                assert recv_exactly(user, 7) == b"again %d" % i
            users.pop().close()
            wait_until(lambda: relay.sessions.opened_by("A", "tcp") == 2)
            assert echo_roundtrip(proxy.local_port) == b"hello through the tunnel"  # room again
        finally:
            for user in users:
                user.close()
        proxy.close()


def test_fourth_udp_flow_is_refused_and_the_first_three_keep_working(make_server, make_client, services, caplog):
    relay = make_server(token=TOKEN, max_udp_flows_per_client=3)
    echo = services(UdpEchoService())
    with long_transfer(relay, make_client, services):
        a = make_client(relay, "A", token=TOKEN)
        make_client(relay, "B", token=TOKEN)
        proxy = a.create_proxy(0, "B", echo.port, protocol="udp")
        users = [udp_socket() for _ in range(4)]
        try:
            for i, user in enumerate(users[:3]):
                assert udp_roundtrip(user, proxy.local_port, b"flow %d" % i) == b"flow %d" % i
            users[3].sendto(b"the fourth flow", (HOST, proxy.local_port))
            wait_until(lambda: logged(caplog, "already has 3 open UDP sessions, the relay's limit per client"),
                       message="A logs the clear error")
            for i, user in enumerate(users[:3]):
                assert udp_roundtrip(user, proxy.local_port, b"more %d" % i) == b"more %d" % i
            users[3].settimeout(0.2)
            with pytest.raises(socket.timeout):
                users[3].recvfrom(100)
            assert len(b"the fourth flow") not in echo.sizes  # it never reached the service
        finally:
            for user in users:
                user.close()
        proxy.close()


# --- UDP ------------------------------------------------------------------------------------------

def test_udp_garbage_spoofed_registrations_and_strangers_do_not_disturb_a_udp_session(
        relay, transfer, make_client, services):
    echo = services(UdpEchoService())
    a = make_client(relay, "A", token=TOKEN)
    make_client(relay, "B", token=TOKEN)
    proxy = a.create_proxy(0, "B", echo.port, protocol="udp")
    with udp_socket() as user, udp_socket() as attacker, udp_socket("127.0.0.2") as far:
        assert udp_roundtrip(user, proxy.local_port, b"warm up") == b"warm up"
        (session,) = [s for s in relay.sessions.all() if s.protocol == "udp"]
        addresses = (session.udp_a, session.udp_b)
        relay_addr = (HOST, relay.port)
        dropped = relay.udp.dropped

        for size in (0, 1, 2, 35, 1400, 65000):  # garbage
            attacker.sendto(os.urandom(size), relay_addr)
        attacker.sendto(b"\xfd\x02" + os.urandom(33), relay_addr)  # a registration with an invalid side
        attacker.sendto(b"\x77" * 777, relay_addr)  # payload from an unregistered address
        far.sendto(b"\x77" * 777, relay_addr)
        acks = {}
        for label, join in {
            "wrong secret A": JoinRequest("A", session.id, os.urandom(16).hex()),
            "wrong secret B": JoinRequest("B", session.id, os.urandom(16).hex()),
            "B's secret as A": JoinRequest("A", session.id, session.secret_b),
            "unknown session": JoinRequest("A", os.urandom(16).hex(), session.secret_a),
            "a TCP session": JoinRequest("A", transfer.session.id, transfer.session.secret_a),
        }.items():
            acks[label] = register_by_hand(attacker, relay_addr, join)
        assert acks == {"wrong secret A": JoinStatus.BAD_SECRET, "wrong secret B": JoinStatus.BAD_SECRET,
                        "B's secret as A": JoinStatus.BAD_SECRET, "unknown session": JoinStatus.UNKNOWN_SESSION,
                        "a TCP session": JoinStatus.WRONG_PROTOCOL}

        wait_until(lambda: relay.udp.dropped >= dropped + 9, message="the relay dropped the strangers' datagrams")
        assert (session.udp_a, session.udp_b) == addresses  # no side moved
        for i in range(50):
            data = b"after %d" % i
            assert udp_roundtrip(user, proxy.local_port, data) == data
        assert 777 not in echo.sizes  # strangers' payload never reached the service
        attacker.settimeout(0.2)
        with pytest.raises(socket.timeout):
            attacker.recvfrom(100)  # and nothing was sent to them but acks
    proxy.close()
