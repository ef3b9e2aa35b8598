"""The direct path for UDP without namespaces: the plain-data rules (common.direct), a puncher
that a stranger cannot fool, and flows on 127.0.0.1 (where the local candidates meet at once).

The NAT cases are in test_direct_udp.py (network namespaces, root)."""

from __future__ import annotations

import hashlib
import hmac
import os
import socket
import time

import pytest

from common import direct as d
from common import protocol as p
from chuantou_client.direct import DirectPaths, Puncher
from helpers import UdpEchoService, udp_roundtrip, wait_until

SESSION = "0123456789abcdef" * 2
KEY = bytes(range(16))


# --- plain data --------------------------------------------------------------------------------

def test_mapping_is_endpoint_independent_only_when_both_relay_ports_saw_the_same_port():
    local = ("10.0.0.2", 4000)
    assert d.classify_mapping(local, ("198.51.100.1", 5000), ("198.51.100.1", 5000)) == d.EIM
    assert d.classify_mapping(local, ("198.51.100.1", 5000), ("198.51.100.1", 5001)) == d.EDM
    assert d.classify_mapping(local, ("198.51.100.1", 5000), None) == d.ONE_PORT
    assert d.classify_mapping(local, None, None) == d.NO_ANSWER
    assert d.classify_mapping(local, local, local) == d.NO_NAT


def test_a_probe_answer_is_never_bigger_than_the_probe_and_carries_the_address_seen():
    nonce = os.urandom(d.NONCE_BYTES)
    probe = d.pack_probe(nonce)
    assert d.is_probe(probe)
    for addr in (("203.0.113.9", 65535), ("2001:db8::1", 1), ("::ffff:192.0.2.1", 80)):
        answer = d.pack_probe_answer(probe, addr)
        assert len(answer) <= len(probe)
        seen = d.unpack_probe_answer(answer, nonce)
        assert seen == (addr[0].removeprefix("::ffff:"), addr[1])
        assert d.unpack_probe_answer(answer, os.urandom(d.NONCE_BYTES)) is None  # someone else's answer


def test_a_punch_packet_proves_the_key_its_kind_its_side_its_session_and_its_nonce():
    nonce = d.new_punch_nonce()
    ping = d.pack_punch(KEY, d.PING, "A", SESSION, nonce)
    assert len(ping) == d.PUNCH_SIZE == 48
    assert d.unpack_punch(ping, KEY, SESSION, "A") == (d.PING, nonce)
    assert d.unpack_punch(ping, bytes(16), SESSION, "A") is None  # another key
    assert d.unpack_punch(ping, KEY, SESSION, "B") is None  # reflected back as if from the other side
    assert d.unpack_punch(ping, KEY, "f" * 32, "A") is None
    forged = ping[:2] + d.PONG + ping[3:]  # turned into a pong without the key
    assert d.unpack_punch(forged, KEY, SESSION, "A") is None
    for at in range(20, d.PUNCH_SIZE):  # any bit of the nonce or the tag changed
        tampered = bytearray(ping)
        tampered[at] ^= 1
        assert d.unpack_punch(bytes(tampered), KEY, SESSION, "A") is None, at
    assert d.unpack_punch(ping[:-1], KEY, SESSION, "A") is None and d.unpack_punch(ping + b"x", KEY, SESSION, "A") is None
    with pytest.raises(d.DirectFrameError):
        d.pack_punch(KEY, d.PING, "A", SESSION, bytes(8))


def test_a_pong_echoes_its_pings_nonce_under_the_tag_so_it_cannot_be_moved_to_another_ping():
    nonce, other = d.new_punch_nonce(), d.new_punch_nonce()
    assert nonce != other  # fresh every time
    pong = d.pack_punch(KEY, d.PONG, "B", SESSION, nonce)
    assert d.unpack_punch(pong, KEY, SESSION, "B") == (d.PONG, nonce)
    moved = pong[:20] + other + pong[20 + d.PUNCH_NONCE_BYTES:]  # the recorded pong, given another nonce
    assert d.unpack_punch(moved, KEY, SESSION, "B") is None


def test_the_first_punch_format_without_a_nonce_is_not_genuine():
    old_tag = hmac.new(KEY, b"chuantou-punch" + d.PONG + b"B" + bytes.fromhex(SESSION), hashlib.sha256).digest()[:16]
    old = d.PUNCH_MAGIC + d.PONG + b"B" + bytes.fromhex(SESSION) + old_tag  # 36 bytes, as an older client sends
    assert len(old) == 36 and d.unpack_punch(old, KEY, SESSION, "B") is None


def test_outstanding_pings_answer_once_retire_older_ones_and_forget_beyond_their_bound():
    pings = d.OutstandingPings(size=4)
    nonces = [pings.fresh(float(t)) for t in range(6)]  # the first two are forgotten
    assert len(pings) == 4
    assert pings.answer(nonces[0]) is None and pings.answer(nonces[1]) is None
    assert pings.answer(d.new_punch_nonce()) is None  # not one of ours
    assert pings.answer(nonces[3]) == 3.0  # when that ping was sent
    assert pings.answer(nonces[3]) is None  # a nonce answers once: the same pong again is a replay
    assert pings.answer(nonces[2]) is None  # older than an answered one: retired with it
    assert pings.answer(nonces[5]) == 5.0 and pings.answer(nonces[4]) is None and len(pings) == 0


def test_candidates_round_trip_and_bad_ones_are_refused():
    assert d.parse_candidate(d.format_candidate("::ffff:10.1.2.3", 9)) == ("10.1.2.3", 9)
    assert d.parse_candidate(d.format_candidate("2001:db8::7", 443)) == ("2001:db8::7", 443)
    assert d.for_socket(True, "10.1.2.3", 9) == ("::ffff:10.1.2.3", 9)
    for bad in ("10.1.2.3", "host:80", "10.1.2.3:0", "[::1]:70000"):
        with pytest.raises(d.DirectFrameError):
            d.parse_candidate(bad)
    with pytest.raises(p.ProtocolError):
        p.decode(p.encode(p.PathCandidates(sessionId=SESSION, candidates=["evil.example:80"])), sender="client")


def test_path_memory_backs_off_after_failures_and_a_success_clears_it():
    now = [100.0]
    memory = d.PathMemory(first_retry=5.0, max_retry=40.0, clock=lambda: now[0])
    assert memory.should_try("B")
    delays = []
    for _ in range(5):
        memory.failed("B")
        assert not memory.should_try("B")
        delays.append(memory.pairs["B"].retry_at - now[0])
        now[0] = memory.pairs["B"].retry_at
        assert memory.should_try("B")  # never "relay forever"
    for failures, delay in enumerate(delays, 1):  # doubling, capped, with up to 20% jitter below
        expected = min(40.0, 5.0 * 2 ** (failures - 1))
        assert 0.8 * expected <= delay <= expected
    memory.succeeded("B")
    assert memory.should_try("B") and memory.describe()["B"]["last"] == "direct"


def test_behind_a_relay_that_knows_no_direct_path_nothing_is_tried():
    paths = DirectPaths("direct")
    assert not paths.wants_to_try("B")  # until a register_response names the relay's UDP port
    paths.relay_knows = True
    assert paths.wants_to_try("B")
    paths.memory.failed("B")
    assert paths.wants_to_try("B")  # --path direct ignores the backoff
    assert not DirectPaths("relay").wants_to_try("B")


# --- a puncher on real sockets -----------------------------------------------------------------

def _udp() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(2.0)
    return sock


def _offered(puncher: Puncher, peer: socket.socket) -> None:
    ip, port = peer.getsockname()
    puncher.peer_offered(p.PeerCandidates(sessionId=SESSION, candidates=[f"{ip}:{port}"], punchKey=KEY.hex()))


def _pump(puncher: Puncher, sock: socket.socket, until, timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    sock.settimeout(0.01)
    while not until() and time.monotonic() < deadline:
        puncher.tick(time.monotonic())
        try:
            data, src = sock.recvfrom(2048)
        except socket.timeout:
            continue
        puncher.handle(data, src[:2])


def test_two_punchers_find_each_other_and_a_stranger_is_never_taken_for_the_peer():
    with _udp() as a_sock, _udp() as b_sock, _udp() as stranger:
        a, b = Puncher(a_sock, SESSION, "A", 1.0), Puncher(b_sock, SESSION, "B", 1.0)
        _offered(a, b_sock)
        _offered(b, a_sock)
        # a stranger who knows the session id but not the key
        for kind in (d.PONG, d.PING):
            stranger.sendto(d.pack_punch(os.urandom(16), kind, "B", SESSION, d.new_punch_nonce()),
                            a_sock.getsockname())
        for _ in range(50):
            b.tick(time.monotonic())
            _pump(a, a_sock, lambda: a.direct is not None, timeout=0.02)
            _pump(b, b_sock, lambda: False, timeout=0.02)
            if a.direct is not None:
                break
        assert a.direct == b_sock.getsockname()
        assert not a.is_peer(stranger.getsockname())
        stranger.settimeout(0.2)
        with pytest.raises(socket.timeout):
            stranger.recvfrom(2048)  # a forged ping got no pong


def test_a_puncher_that_gave_up_stays_on_the_relay():
    with _udp() as a_sock, _udp() as b_sock:
        a = Puncher(a_sock, SESSION, "A", 1.0)
        _offered(a, b_sock)
        a.gave_up = True
        b_sock.sendto(d.pack_punch(KEY, d.PONG, "B", SESSION, d.new_punch_nonce()), a_sock.getsockname())
        data, src = a_sock.recvfrom(2048)
        assert a.handle(data, src) is True  # taken as a punch packet, never as payload
        assert a.direct is None and a.path == "relay"


def _ping_from(puncher: Puncher, peer: socket.socket) -> bytes:
    """Let ``puncher`` send a round of pings; the nonce of the one ``peer`` got."""
    puncher.tick(time.monotonic())
    unpacked = d.unpack_punch(peer.recv(2048), KEY, SESSION, puncher.side)
    assert unpacked is not None and unpacked[0] == d.PING
    return unpacked[1]


def _handled(puncher: Puncher, sock: socket.socket, src: socket.socket, packet: bytes) -> bool:
    src.sendto(packet, sock.getsockname())
    data, addr = sock.recvfrom(2048)
    return puncher.handle(data, addr)


def test_only_a_pong_to_our_own_ping_chooses_the_path_and_a_replayed_one_answers_nothing():
    with _udp() as a_sock, _udp() as b_sock:
        a = Puncher(a_sock, SESSION, "A", 1.0)
        _offered(a, b_sock)
        stray = d.pack_punch(KEY, d.PONG, "B", SESSION, d.new_punch_nonce())  # genuine, for no ping of A's
        assert _handled(a, a_sock, b_sock, stray) and a.direct is None and a.unanswered == 1
        sent = time.monotonic()
        pong = d.pack_punch(KEY, d.PONG, "B", SESSION, _ping_from(a, b_sock))
        assert _handled(a, a_sock, b_sock, pong) and a.direct == b_sock.getsockname()
        assert a.unanswered == 1 and sent <= a.last_heard <= time.monotonic()  # alive when the ping left
        heard = a.last_heard
        for _ in range(3):  # the same pong, recorded and replayed: it answers nothing any more
            assert _handled(a, a_sock, b_sock, pong)
        assert a.unanswered == 4 and a.last_heard == heard


def test_a_replayed_ping_gets_a_pong_of_its_own_size_and_proves_nothing():
    with _udp() as a_sock, _udp() as b_sock:
        a = Puncher(a_sock, SESSION, "A", 1.0)
        _offered(a, b_sock)
        a.direct, a.last_heard = b_sock.getsockname(), 1.0  # a direct path, last proved long ago
        nonce = d.new_punch_nonce()
        ping = d.pack_punch(KEY, d.PING, "B", SESSION, nonce)
        for _ in range(3):
            assert _handled(a, a_sock, b_sock, ping)
            pong = b_sock.recv(2048)
            assert len(pong) == len(ping) and d.unpack_punch(pong, KEY, SESSION, "A") == (d.PONG, nonce)
        assert a.last_heard == 1.0 and a.watch(time.monotonic()) is not None  # still dead


def test_an_older_clients_punch_packets_are_not_punch_packets_here():
    with _udp() as a_sock, _udp() as b_sock:
        a = Puncher(a_sock, SESSION, "A", 1.0)
        _offered(a, b_sock)
        _ping_from(a, b_sock)
        old_tag = hmac.new(KEY, b"chuantou-punch" + d.PONG + b"B" + bytes.fromhex(SESSION), hashlib.sha256).digest()
        old_pong = d.PUNCH_MAGIC + d.PONG + b"B" + bytes.fromhex(SESSION) + old_tag[:16]
        assert not _handled(a, a_sock, b_sock, old_pong)  # not genuine: the flow ignores it (not a peer)
        assert a.direct is None and not a.is_peer(b_sock.getsockname())  # the attempt fails: the relay


# --- flows on 127.0.0.1 ------------------------------------------------------------------------

def _user() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    return sock


def _flow_paths(client) -> list[str]:
    return [c["path"] for c in client.connections() if c["protocol"] == "udp"]


def test_on_one_host_a_flow_goes_direct_and_the_relay_relays_none_of_its_payload(server, make_client, services):
    echo = services(UdpEchoService())
    a, b = make_client(server, "A", path="auto"), make_client(server, "B", path="auto")
    proxy = a.create_proxy(0, "B", echo.port, protocol="udp")
    with _user() as user:
        for i in range(20):
            data = b"direct %d" % i
            assert udp_roundtrip(user, proxy.local_port, data) == data
        assert _flow_paths(a) == ["direct"] and _flow_paths(b) == ["direct"]
    assert server.udp.relayed_bytes == 0
    assert a.status()["direct"]["pairs"]["B"]["last"] == "direct"
    wait_until(lambda: a.status()["direct"]["nat"]["mapping"] == d.NO_NAT, message="A's NAT probe")


@pytest.mark.parametrize("relay_side", ["A", "B"])
def test_path_relay_on_either_side_keeps_the_flow_on_the_relay_without_waiting(server, make_client, services,
                                                                             relay_side):
    echo = services(UdpEchoService())
    a = make_client(server, "A", path="relay" if relay_side == "A" else "auto")
    b = make_client(server, "B", path="relay" if relay_side == "B" else "auto")
    proxy = a.create_proxy(0, "B", echo.port, protocol="udp")
    with _user() as user:
        started = time.monotonic()
        assert udp_roundtrip(user, proxy.local_port, b"relayed", resend_every=5.0) == b"relayed"
        assert time.monotonic() - started < d.DEFAULT_DEADLINE  # B's "relay" answers A at once
        assert _flow_paths(a) == ["relay"]
    # counted just after the relay's sendto, which may be after the echo arrived
    wait_until(lambda: server.udp.relayed_bytes >= 2 * len(b"relayed"), message="the relay carried both ways")


class _TargetSocketTap:
    """B's flow socket, recording what arrives from anywhere but the relay and the service (the
    direct peer, then), and able to flip a byte of the next sealed datagram it receives from, or
    sends to, that peer."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.seen: list[bytes] = []
        self.relay: tuple | None = None
        self.service: tuple | None = None
        self.alter_in = self.alter_out = False

    def recvfrom(self, size: int):
        data, addr = self.sock.recvfrom(size)
        if addr is None:  # shut down by abort(): a blocking recvfrom returns no address
            return data, addr
        if addr[:2] not in (self.relay, self.service):
            self.seen.append(data)
            if self.alter_in and data[:1] == b"\0":  # sealed payload (punch packets start 0xfd)
                self.alter_in = False
                data = data[:30] + bytes([data[30] ^ 0x01]) + data[31:]
        return data, addr

    def sendto(self, data: bytes, addr):
        if self.alter_out and addr[:2] not in (self.relay, self.service) and data[:1] == b"\0":
            self.alter_out = False
            data = data[:30] + bytes([data[30] ^ 0x01]) + data[31:]
        return self.sock.sendto(data, addr)

    def __getattr__(self, name):
        return getattr(self.sock, name)


def test_a_direct_flow_carries_sealed_datagrams_and_each_side_opens_what_the_peer_sends(
        server, make_client, services, monkeypatch):
    import chuantou_client.udptarget as udp_module  # B's flow opens its socket there
    taps: list[_TargetSocketTap] = []
    real = udp_module.udp_socket_for

    def tapped(*args):
        sock, (relay, service) = real(*args)
        taps.append(_TargetSocketTap(sock))
        taps[-1].relay, taps[-1].service = relay, service
        return taps[-1], (relay, service)

    monkeypatch.setattr(udp_module, "udp_socket_for", tapped)
    echo = services(UdpEchoService())
    a, b = make_client(server, "A", path="auto"), make_client(server, "B", path="auto")
    proxy = a.create_proxy(0, "B", echo.port, protocol="udp")
    marker = b"DIRECT-PLAINTEXT-MARKER"
    with _user() as user:
        for i in range(20):
            data = marker + b" %d" % i
            assert udp_roundtrip(user, proxy.local_port, data) == data
        assert _flow_paths(a) == ["direct"] and _flow_paths(b) == ["direct"]
        assert [c["sealed"] for c in a.connections() if c["protocol"] == "udp"] == [True]
        (tap,) = taps
        payload = [data for data in tap.seen if data[:1] == b"\0"]
        assert len(payload) >= 20 and not any(marker in data for data in tap.seen)  # sealed, not plain

        tap.alter_in = True  # altered on the direct way to B: B drops it, the service never sees it
        received_before = len(echo.sizes)
        user.sendto(b"altered on the way to B", ("127.0.0.1", proxy.local_port))
        wait_until(lambda: b.seal_counts()["rejected"] == 1, message="B rejects the altered datagram")
        assert len(echo.sizes) == received_before
        tap.alter_out = True  # altered on the direct way to A: A drops it, the user never sees it
        user.sendto(b"answer altered on the way to A", ("127.0.0.1", proxy.local_port))
        wait_until(lambda: a.seal_counts()["rejected"] == 1, message="A rejects the altered answer")
        assert udp_roundtrip(user, proxy.local_port, b"after") == b"after"  # the flow still works
    assert server.udp.relayed_bytes == 0


def test_a_probe_cut_short_by_stopping_reports_no_local_address_and_does_not_fail():
    """A client refused at registration stops before its NAT probe sends anything: the probe's
    socket has no port then, and that must not be offered (nor crash the probe thread)."""
    import socket as socket_module
    import threading as threading_module

    from chuantou_client.direct import local_candidate
    from chuantou_client.natprobe import probe_nat

    stopping = threading_module.Event()
    stopping.set()
    with socket_module.socket(socket_module.AF_INET, socket_module.SOCK_DGRAM) as unbound:
        assert local_candidate(unbound, ("127.0.0.1", 9)) is None
    result = probe_nat("127.0.0.1", 9, None, stopping)
    assert "mapping" in result and "seenAs" not in result
