"""Sealed UDP sessions (chuantou_client/udpseal.py): keys agreed over the control channel, every
datagram sealed; what a relay forges, replays or alters is dropped and counted. And peers that
cannot seal (older clients): refused by default, allowed with --allow-unsealed."""

from __future__ import annotations

import dataclasses
import os
import socket
import threading

import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

import chuantou_server.server as server_module
from chuantou_client import udpseal
from chuantou_client.client import Client
from chuantou_client.sealing import SealError
from chuantou_server.udp import UdpRelay
from common import identity
from common import protocol as p

from cli_support import cli  # noqa: F401 (fixture)
from helpers import echo_roundtrip, relay_url, udp_roundtrip, wait_until

pytestmark = pytest.mark.timeout(120)

MARKER = b"PLAINTEXT-MARKER-7f3a"


def udp_user() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    sock.bind(("127.0.0.1", 0))
    return sock


# --- the relay's UDP relay, hooked ---------------------------------------------------------------

class RecordingSocket:
    """The relay's UDP socket, recording every datagram it receives with its source."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.seen: list[tuple[bytes, tuple]] = []
        self.alter_from: set[tuple] = set()  # flip a byte of the next sealed datagram from these, in flight
        self._lock = threading.Lock()

    def recvfrom(self, size: int):
        data, addr = self.sock.recvfrom(size)
        if addr is None:  # shut down: a blocking recvfrom returns no address
            return data, addr
        with self._lock:
            self.seen.append((data, addr[:2]))
            if addr[:2] in self.alter_from and data[:1] == b"\0":
                self.alter_from.discard(addr[:2])
                data = data[:30] + bytes([data[30] ^ 0x01]) + data[31:]
        return data, addr

    def recvfrom_into(self, buffer):  # the relay's hot loop reads into one buffer
        data, addr = self.recvfrom(len(buffer))
        buffer[:len(data)] = data
        return len(data), addr

    def from_addr(self, addr: tuple) -> list[bytes]:
        with self._lock:
            return [data for data, src in self.seen if src == addr]

    def __getattr__(self, name):
        return getattr(self.sock, name)


class RecordingUdpRelay(UdpRelay):
    def __init__(self, sock, *args, **kwargs):
        super().__init__(RecordingSocket(sock), *args, **kwargs)


@pytest.fixture
def hooked_server(make_server, monkeypatch):
    monkeypatch.setattr(server_module, "UdpRelay", RecordingUdpRelay)
    return make_server()


def the_udp_session(server):
    def find():
        for session_id in list(server.sessions._sessions):
            session = server.sessions.get(session_id)
            if session is not None and session.protocol == "udp" and session.joined:
                return session
        return None
    return wait_until(find, message="a joined UDP session on the relay")


# --- end to end -----------------------------------------------------------------------------------

def test_sealed_echo_of_1000_datagrams_is_intact_and_the_relay_sees_no_plaintext(hooked_server, make_client,
                                                                                 udp_echo):
    a = make_client(hooked_server, "A", path="relay")  # what the relay sees: the flow must cross it
    b = make_client(hooked_server, "B", path="relay")
    proxy = a.create_proxy(0, "B", udp_echo.port, protocol="udp")
    with udp_user() as user:
        for i in range(1000):
            payload = MARKER + i.to_bytes(4, "big") + os.urandom(i % 200)
            assert udp_roundtrip(user, proxy.local_port, payload) == payload
        big = MARKER + os.urandom(65_507 - len(MARKER))  # over one sealed datagram: two halves, one delivery
        assert udp_roundtrip(user, proxy.local_port, big) == big
    assert 65_507 in udp_echo.sizes
    seen = hooked_server.udp.sock.seen
    assert len(seen) > 2000
    assert not any(MARKER in data for data, _ in seen)
    info = [c for c in a.connections() if c["protocol"] == "udp"]
    assert info and info[0]["sealed"] is True
    assert b.seal_counts()["rejected"] == 0 and b.seal_counts()["replayed"] == 0
    proxy.close()


def test_forged_replayed_and_altered_datagrams_are_dropped_and_counted(hooked_server, make_client, udp_echo):
    a = make_client(hooked_server, "A", path="relay")  # what the relay sees: the flow must cross it
    b = make_client(hooked_server, "B", path="relay")
    proxy = a.create_proxy(0, "B", udp_echo.port, protocol="udp")
    with udp_user() as user:
        for i in range(5):
            payload = b"genuine %d" % i
            assert udp_roundtrip(user, proxy.local_port, payload) == payload
        session = the_udp_session(hooked_server)
        relay = hooked_server.udp.sock
        from_a = [d for d in relay.from_addr(session.udp_a) if d[:1] == b"\0"]  # sealed, not registrations
        from_b = [d for d in relay.from_addr(session.udp_b) if d[:1] == b"\0"]
        assert from_a and from_b

        # altered in flight, each way: the user's datagram (towards B) and then B's answer (towards A)
        relay.alter_from.add(session.udp_a)
        user.sendto(b"altered on the way to B", ("127.0.0.1", proxy.local_port))
        wait_until(lambda: b.seal_counts()["rejected"] == 1, message="B rejects the altered datagram")
        relay.alter_from.add(session.udp_b)
        user.sendto(b"answer altered on the way to A", ("127.0.0.1", proxy.local_port))
        wait_until(lambda: a.seal_counts()["rejected"] == 1, message="A rejects the altered answer")
        received_before = len(udp_echo.sizes)  # the second reached the service; its answer was altered
        # injected towards B (and so the service): two replays, a forgery with a fresh counter, a stub
        forged = udpseal.COUNTER.pack(10_000) + ChaCha20Poly1305(os.urandom(32)).encrypt(
            b"\0\0\0\0" + udpseal.COUNTER.pack(10_000), b"\0forged", session.id.encode())
        for datagram in (from_a[-1], from_a[0], forged, b"\0" * 10):
            relay.sendto(datagram, session.udp_b)
        # towards A (and so the user): a replay and a forgery
        for datagram in (from_b[-1], forged):
            relay.sendto(datagram, session.udp_a)

        wait_until(lambda: b.seal_counts()["replayed"] + b.seal_counts()["rejected"] >= 5, message="B's drops")
        wait_until(lambda: a.seal_counts()["replayed"] + a.seal_counts()["rejected"] >= 3, message="A's drops")
        assert (b.seal_counts()["replayed"], b.seal_counts()["rejected"]) == (2, 3), b.seal_counts()
        assert (a.seal_counts()["replayed"], a.seal_counts()["rejected"]) == (1, 2), a.seal_counts()
        # none reached the service or the user; the session still works
        assert udp_roundtrip(user, proxy.local_port, b"after") == b"after"
        assert len(udp_echo.sizes) == received_before + 1
    proxy.close()


# --- the datagram layer alone ---------------------------------------------------------------------

def sealed_pair(session_id: str = "ab" * 16):
    a_id, b_id = identity.generate(), identity.generate()
    a, b = udpseal.UdpHandshake(a_id, session_id, "A"), udpseal.UdpHandshake(b_id, session_id, "B")
    stats_a, stats_b = udpseal.SealStats(), udpseal.SealStats()
    a_fp, a_seal, a_open = a.finish(b.offer(), lambda fp: None, stats_a, "A")
    b_fp, b_seal, b_open = b.finish(a.offer(), lambda fp: None, stats_b, "B")
    assert a_fp == b_id.fingerprint and b_fp == a_id.fingerprint
    return (a_seal, a_open, stats_a), (b_seal, b_open, stats_b), (a, b, a_id, b_id)


def test_replay_window_accepts_reordering_within_it_and_drops_repeats_and_the_too_old():
    (a_seal, _, _), (_, b_open, stats), _ = sealed_pair()
    datagrams = [a_seal.seal(b"%d" % i)[0] for i in range(1100)]
    assert b_open.open(datagrams[1099]) == b"1099"
    assert b_open.open(datagrams[500]) == b"500"  # late but inside the window
    assert b_open.open(datagrams[500]) is None  # again: replayed
    assert b_open.open(datagrams[10]) is None  # older than the window
    assert stats.replayed == 2 and stats.rejected == 0


def test_a_signature_over_another_session_or_role_is_refused():
    (_, _, _), _, (a, b, a_id, b_id) = sealed_pair("cd" * 16)
    other = udpseal.UdpHandshake(b_id, "ef" * 16, "B").offer()  # B's signed half of another session
    with pytest.raises(SealError, match="not signed"):
        a.finish(dataclasses.replace(other, sessionId="cd" * 16), lambda fp: None, udpseal.SealStats(), "A")
    as_a = udpseal.UdpHandshake(b_id, "cd" * 16, "A").offer()  # signed as the other role
    with pytest.raises(SealError, match="not signed"):
        a.finish(as_a, lambda fp: None, udpseal.SealStats(), "A")


def test_a_relay_that_swaps_the_ephemeral_key_cannot_sign_it():
    _, _, (a, b, a_id, b_id) = sealed_pair()
    honest = b.offer()
    mitm = udpseal.UdpHandshake(identity.generate(), b.session_id, "B").offer()
    with pytest.raises(SealError, match="not signed"):
        a.finish(dataclasses.replace(honest, ephemeral=mitm.ephemeral), lambda fp: None, udpseal.SealStats(), "A")


def test_a_udp_peer_with_a_changed_key_is_refused_with_the_pin_message(server, make_client, udp_echo):
    a = make_client(server, "A")
    make_client(server, "B")
    a.sealing.known.record("B", identity.generate().fingerprint)  # pinned: some other key
    proxy = a.create_proxy(0, "B", udp_echo.port, protocol="udp")
    with udp_user() as user:
        user.sendto(b"hello", ("127.0.0.1", proxy.local_port))
        wait_until(lambda: proxy.last_error and "CHANGED" in proxy.last_error, message="A refuses B's key")
        assert "forget-key B" in proxy.last_error
    assert not udp_echo.sizes
    proxy.close()


# --- peers that cannot seal -------------------------------------------------------------------------

def _without_keys(msg):
    if isinstance(msg, (p.ConnectOffer, p.CreateSession)):
        return dataclasses.replace(msg, peerPublicKey=None)
    return msg


def old_client(server, client_id: str) -> Client:
    """A client as an older chuantou behaves: it registers without a key, never hears of the
    peer's, and so never seals (it knows nothing of refusing unsealed sessions either)."""
    client = Client(relay_url(server), client_id, allow_unsealed=True)
    client.control.public_key = None
    on_message, request = client.control.on_message, client.control.request
    client.control.on_message = lambda msg: on_message(_without_keys(msg))
    client.control.request = lambda msg, timeout: _without_keys(request(msg, timeout))
    start_request = client.control.start_request  # what a proxy's TCP connection asks with

    def start_without_keys(msg, on_reply=None):
        pending = start_request(msg, on_reply)
        wait = pending.wait
        pending.wait = lambda timeout: _without_keys(wait(timeout))
        return pending

    client.control.start_request = start_without_keys
    return client


@pytest.fixture
def make_old_client():
    clients = []

    def make(server, client_id):
        client = old_client(server, client_id)
        clients.append(client)
        return client.start()

    yield make
    for client in clients:
        client.stop()


def test_a_target_that_cannot_seal_is_refused_by_default_and_reached_with_allow_unsealed(
        server, make_client, make_old_client, tcp_echo, udp_echo):
    a = make_client(server, "A")
    make_old_client(server, "B")
    tcp = a.create_proxy(0, "B", tcp_echo.port, protocol="tcp")
    with pytest.raises(OSError):
        echo_roundtrip(tcp.local_port)
    wait_until(lambda: tcp.last_error and "--allow-unsealed" in tcp.last_error, message="TCP refused, saying why")
    assert "does not support sealed sessions" in tcp.last_error
    udp = a.create_proxy(0, "B", udp_echo.port, protocol="udp")
    with udp_user() as user:
        user.sendto(b"hello", ("127.0.0.1", udp.local_port))
        wait_until(lambda: udp.last_error and "--allow-unsealed" in udp.last_error, message="UDP refused")
    assert not udp_echo.sizes
    tcp.close()
    udp.close()

    tcp = a.create_proxy(0, "B", tcp_echo.port, protocol="tcp", allow_unsealed=True)
    udp = a.create_proxy(0, "B", udp_echo.port, protocol="udp", allow_unsealed=True)
    assert echo_roundtrip(tcp.local_port) == b"hello through the tunnel"
    with udp_user() as user:
        assert udp_roundtrip(user, udp.local_port, b"in the clear") == b"in the clear"
    assert tcp.info()["sealed"] == "unsealed allowed"
    tcp.close()
    udp.close()


def test_a_requester_that_cannot_seal_is_refused_by_default_and_admitted_with_allow_unsealed(
        server, make_client, make_old_client, tcp_echo, udp_echo):
    old = make_old_client(server, "A")
    make_client(server, "B")
    tcp = old.create_proxy(0, "B", tcp_echo.port, protocol="tcp")
    with pytest.raises(OSError):
        echo_roundtrip(tcp.local_port)
    wait_until(lambda: tcp.last_error and "requires sealed sessions" in tcp.last_error, message="B refuses")
    udp = old.create_proxy(0, "B", udp_echo.port, protocol="udp")
    with udp_user() as user:
        user.sendto(b"hello", ("127.0.0.1", udp.local_port))
        wait_until(lambda: udp.last_error and "requires sealed sessions" in udp.last_error, message="B refuses")
    assert not udp_echo.sizes
    tcp.close()
    udp.close()

    allowing = make_client(server, "B2", allow_unsealed=True)
    assert allowing.allow_unsealed
    tcp = old.create_proxy(0, "B2", tcp_echo.port, protocol="tcp")
    udp = old.create_proxy(0, "B2", udp_echo.port, protocol="udp")
    assert echo_roundtrip(tcp.local_port) == b"hello through the tunnel"
    with udp_user() as user:
        assert udp_roundtrip(user, udp.local_port, b"in the clear") == b"in the clear"
    sides_b = [c for c in allowing.connections() if c["side"] == "B"]
    assert sides_b and all(c["sealed"] is False for c in sides_b)
    tcp.close()
    udp.close()


def test_allow_unsealed_does_not_let_a_relay_strip_a_pinned_peers_key(server, make_client, make_old_client,
                                                                      tcp_echo):
    a = make_client(server, "A", allow_unsealed=True)
    make_old_client(server, "B")
    a.sealing.known.record("B", identity.generate().fingerprint)  # B sealed with us before
    tcp = a.create_proxy(0, "B", tcp_echo.port, protocol="tcp")
    with pytest.raises(OSError):
        echo_roundtrip(tcp.local_port)
    wait_until(lambda: tcp.last_error and "pinned here" in tcp.last_error, message="refused: a downgrade")
    tcp.close()


def test_cli_saves_allow_unsealed_per_client_and_per_proxy_and_proxy_list_shows_sealed(cli, services):
    import json

    from cli_support import free_tcp_udp_port
    from helpers import free_port, text_service

    web = services(text_service(b"hello"))
    relay = cli.start_relay()
    cli.start_client(relay, "B", free_port(), config=cli.root / "b.json", extra=("--allow-unsealed",))
    assert json.loads((cli.root / "b.json").read_text())["allowUnsealed"] is True
    cli.start_client(relay, "A", free_port())
    sealed, unsealed = free_tcp_udp_port(), free_tcp_udp_port()
    assert cli.client("proxy", "create", "--local-port", sealed, "--target-client", "B",
                      "--target-port", web.port).returncode == 0
    made = cli.client("proxy", "create", "--local-port", unsealed, "--target-client", "B",
                      "--target-port", web.port, "--allow-unsealed")
    assert made.returncode == 0, made.stderr
    saved = {e["localPort"]: e for e in json.loads((cli.config_dir / "client.json").read_text())["proxies"]}
    assert saved[unsealed]["allowUnsealed"] is True and "allowUnsealed" not in saved[sealed]
    listing = cli.client("proxy", "list").stdout
    assert "SEALED" in listing.splitlines()[0]
    rows = {line.split()[0].rsplit(":", 1)[1]: line.split() for line in listing.splitlines()[1:3]}
    assert rows[str(sealed)][3] == "yes" and rows[str(unsealed)][3] == "yes*"
    assert "--allow-unsealed" in listing


# --- where "sealed" shows ---------------------------------------------------------------------------

def test_the_relay_api_shows_sealed_only_when_both_sides_registered_keys(make_server, make_client,
                                                                          make_old_client, tcp_echo):
    from helpers import http_json

    server = make_server(admin_token="admin-test-token-0123456789")
    auth = {"Authorization": "Bearer admin-test-token-0123456789"}
    a = make_client(server, "A", allow_unsealed=True)
    make_client(server, "B")
    make_old_client(server, "OLD")
    sealed = a.create_proxy(0, "B", tcp_echo.port, protocol="tcp")
    unsealed = a.create_proxy(0, "OLD", tcp_echo.port, protocol="tcp")
    with socket.create_connection(("127.0.0.1", sealed.local_port), timeout=5) as one, \
            socket.create_connection(("127.0.0.1", unsealed.local_port), timeout=5) as two:
        for sock in (one, two):
            sock.sendall(b"ping")
            assert sock.recv(4) == b"ping"
        status, _, payload = http_json(server.port, "GET", "/api/sessions", auth)
        assert status == 200
        by_peer = {s["b"]: s for s in payload["sessions"]}
        assert by_peer["B"]["sealed"] is True and by_peer["B"]["sealing"] == "sealed (end to end)"
        assert by_peer["OLD"]["sealed"] is False and by_peer["OLD"]["sealing"] == "not sealed"
        assert {c["sealed"] for c in a.connections()} == {True, False}
    sealed.close()
    unsealed.close()


# --- the relay passes session_keys to the session's other side only ---------------------------------

def test_the_relay_passes_session_keys_only_to_the_other_side_of_that_udp_session(server, peers):
    a, b, stranger = peers(server), peers(server), peers(server)
    for peer, name in ((a, "A"), (b, "B"), (stranger, "C")):
        assert peer.register(name).success
    a.send(p.ConnectRequest(toClientId="B", remotePort=5353, protocol="udp", requestId="r1"))
    offer = b.recv_until(p.ConnectOffer)
    created = a.recv_until(p.CreateSession)
    assert offer.sessionId == created.sessionId
    keys = udpseal.UdpHandshake(identity.generate(), created.sessionId, "A").offer()
    a.send(keys)
    assert b.recv_until(p.SessionKeys) == keys  # unchanged
    stranger.send(keys)  # not in that session: refused, and B hears nothing of it
    assert stranger.recv_until(p.Error).code == "unknown_session"
    a.send(p.ConnectRequest(toClientId="B", remotePort=22, protocol="tcp", requestId="r2"))
    tcp = a.recv_until(p.CreateSession)
    a.send(dataclasses.replace(keys, sessionId=tcp.sessionId))  # only UDP sessions exchange keys
    assert a.recv_until(p.Error).code == "unknown_session"
    b.send(p.Heartbeat(timestamp=1.0))
    assert isinstance(b.recv_until((p.SessionKeys, p.Heartbeat)), p.Heartbeat)
