"""Sealed sessions: each client's key pair and fingerprint, pinning peers' keys, and TCP
sessions that A and B seal end to end with TLS 1.3 inside the relayed data channel, so the
relay can neither read nor change them."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import socket
import stat
import threading
import time

import pytest

from chuantou_client import known_clients, sealing
from chuantou_server import relay
from common import identity
from common import protocol as p
from common.errors import ChuantouError
from common.pipe import Pipe
from common.threads import ThreadGroup

from cli_support import cli  # noqa: F401 (fixture)
from helpers import (
    TcpService,
    closed_by_peer,
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

pytestmark = pytest.mark.timeout(120)


# --- identity ----------------------------------------------------------------------------------

def test_identity_is_made_once_with_mode_0600_and_keeps_its_fingerprint(tmp_path):
    path = tmp_path / "conf" / identity.IDENTITY_FILE
    first = identity.load_or_create(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    again = identity.load_or_create(path)
    assert again.fingerprint == first.fingerprint
    assert identity.FINGERPRINT_PATTERN.match(first.fingerprint)
    assert identity.certificate_fingerprint(again.certificate_der) == first.fingerprint
    assert b"PRIVATE KEY" not in first.public_spki and len(first.public_spki) == 44


def test_fingerprint_is_ssh_style_sha256_of_the_spki():
    import base64
    import hashlib
    ident = identity.generate()
    expected = "SHA256:" + base64.b64encode(hashlib.sha256(ident.public_spki).digest()).decode().rstrip("=")
    assert ident.fingerprint == expected
    assert identity.fingerprint_of_spki(identity.decode_public_key(ident.public_key_b64)) == expected


def test_a_lost_certificate_is_made_again_from_the_key(tmp_path):
    path = tmp_path / identity.IDENTITY_FILE
    first = identity.load_or_create(path)
    key_only = path.read_bytes().split(b"-----BEGIN CERTIFICATE-----")[0]
    path.write_bytes(key_only)
    again = identity.load(path)
    assert again.fingerprint == first.fingerprint
    assert b"CERTIFICATE" in path.read_bytes()


def test_a_file_that_is_not_a_key_is_a_clear_error(tmp_path):
    path = tmp_path / identity.IDENTITY_FILE
    path.write_text("not a key")
    with pytest.raises(identity.IdentityError, match="does not hold a private key"):
        identity.load(path)


def test_fingerprints_typed_by_users_are_checked():
    good = identity.generate().fingerprint
    assert identity.check_fingerprint(" sha256:" + good[7:] + " ") == good
    for bad in ("SHA256:abc", good[7:], "MD5:" + good[7:]):
        with pytest.raises(identity.IdentityError, match="not a key fingerprint"):
            identity.check_fingerprint(bad)


def test_a_public_key_hint_that_is_not_a_key_is_ignored():
    assert identity.decode_public_key("!!!") is None
    assert identity.decode_public_key("aGVsbG8=") is None
    assert identity.decode_public_key(None) is None


# --- known clients and --allow-from ------------------------------------------------------------

def test_first_key_is_recorded_and_a_changed_one_refused_until_forgotten(tmp_path):
    path = tmp_path / known_clients.KNOWN_CLIENTS_FILE
    known = known_clients.KnownClients(path)
    first, second = identity.generate().fingerprint, identity.generate().fingerprint
    known.check("office", first)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert known_clients.KnownClients(path).get("office") == first  # kept in the file
    known.check("office", first)
    with pytest.raises(known_clients.KeyRefused) as refused:
        known.check("office", second)
    text = str(refused.value)
    assert "'office'" in text and first in text and second in text
    assert "python -m chuantou_client forget-key office" in text
    assert known_clients.KnownClients(path).forget("office")  # as the CLI does, from another object
    known.check("office", second)
    assert known.get("office") == second


def test_target_fingerprint_pins_before_first_use():
    known = known_clients.KnownClients(None)
    right, wrong = identity.generate().fingerprint, identity.generate().fingerprint
    with pytest.raises(known_clients.KeyRefused, match="--target-fingerprint"):
        known.check("office", right, pinned=wrong)
    assert known.get("office") is None
    known.check("office", right, pinned=right)
    assert known.get("office") == right


def test_a_broken_known_clients_line_names_file_and_line(tmp_path):
    path = tmp_path / known_clients.KNOWN_CLIENTS_FILE
    path.write_text("# comment\noffice SHA256:nope\n")
    with pytest.raises(ChuantouError, match="line 2"):
        known_clients.KnownClients(path).get("office")


def test_allow_from_takes_ids_and_fingerprints():
    fp = identity.generate().fingerprint
    allow = known_clients.AllowFrom(["laptop", f"{fp}, phone"])
    assert allow.refusal("laptop", identity.generate().fingerprint) is None
    assert allow.refusal("someone", fp) is None
    assert "not in --allow-from" in allow.refusal("someone", identity.generate().fingerprint)
    assert known_clients.AllowFrom([]).refusal("anyone", fp) is None
    with pytest.raises(ChuantouError, match="neither a client ID"):
        known_clients.AllowFrom(["bad id!"])


# --- the relay passes keys on (as hints) ---------------------------------------------------------

def test_register_carries_a_public_key_and_rejects_one_that_is_not_base64():
    key = identity.generate().public_key_b64
    msg = p.decode(p.encode(p.Register(clientId="office", protocolVersion=p.PROTOCOL_VERSION, publicKey=key)))
    assert msg.publicKey == key
    text = p.encode(p.Register(clientId="office", protocolVersion=p.PROTOCOL_VERSION, publicKey="not base64!"))
    with pytest.raises(p.ProtocolError, match="publicKey"):
        p.decode(text)


# --- the handshake over a socket pair, no relay -------------------------------------------------------

def _seal_pair(a_id, b_id, a_expects=None, b_expects=None):
    """Run seal_as_a and seal_as_b over a socketpair; return (A's result, B's result), each a
    stream or the exception it raised."""
    left, right = socket.socketpair()
    results = {}

    def side_b():
        try:
            results["b"] = sealing.seal_as_b(right, b_id, b_expects, time.monotonic() + 5)
        except Exception as exc:  # noqa: BLE001 (the test looks at it)
            results["b"] = exc

    worker = threading.Thread(target=side_b, name="svc-seal-b")
    worker.start()
    try:
        results["a"] = sealing.seal_as_a(left, a_id, a_expects, time.monotonic() + 5)
    except Exception as exc:  # noqa: BLE001
        results["a"] = exc
    worker.join(10)
    return results["a"], results["b"]


def test_both_sides_prove_their_keys_and_bytes_pass_both_ways():
    a_id, b_id = identity.generate(), identity.generate()
    a, b = _seal_pair(a_id, b_id, b_id.fingerprint, a_id.fingerprint)
    assert isinstance(a, sealing.SealedStream) and isinstance(b, sealing.SealedStream)
    assert identity.certificate_fingerprint(a.peer_certificate()) == b_id.fingerprint
    assert identity.certificate_fingerprint(b.peer_certificate()) == a_id.fingerprint
    a.sendall(b"to b")
    assert b.recv(10) == b"to b"
    b.sendall(b"to a")
    b.shutdown(socket.SHUT_WR)  # close_notify, then FIN: a clean end for A
    assert a.recv(10) == b"to a" and a.recv(10) == b""
    a.close()
    b.close()


def test_a_refuses_a_b_that_proves_another_key():
    a_id, b_id = identity.generate(), identity.generate()
    a, _ = _seal_pair(a_id, b_id, a_expects=identity.generate().fingerprint)
    assert isinstance(a, sealing.SealError) and b_id.fingerprint in str(a)


def test_b_refuses_an_a_that_proves_another_key():
    a_id, b_id = identity.generate(), identity.generate()
    _, b = _seal_pair(a_id, b_id, b_expects=identity.generate().fingerprint)
    assert isinstance(b, sealing.SealError) and a_id.fingerprint in str(b)


def test_b_refuses_a_peer_that_does_not_seal():
    left, right = socket.socketpair()
    left.sendall(b"GET / HTTP/1.1\r\n\r\n")
    with pytest.raises(sealing.SealError, match="did not open a sealed session"):
        sealing.seal_as_b(right, identity.generate(), None, time.monotonic() + 5)
    left.close()


# --- end to end ----------------------------------------------------------------------------------

MARKER = b"CHUANTOU-PLAINTEXT-MARKER-5e1f"


class RelayTap:
    """Installed as the relay's pump (``relay.make_pipe``): sees every byte the relay pumps, as the relay's operator
    could, and may change them. ``tamper``: (direction, kind, offset), direction 0 = A -> B."""

    def __init__(self, tamper: tuple | None = None):
        self.tamper = tamper
        self.seen = [0, 0]
        self.marker_hits = 0
        self.tampered = threading.Event()
        self._tails = [b"", b""]
        self._lock = threading.Lock()

    def install(self, monkeypatch) -> "RelayTap":
        monkeypatch.setattr(relay, "make_pipe", self.pipe)
        return self

    def pipe(self, a, b, on_done=None, limits=((), ())):
        return Pipe(_TapSocket(a, self, 1), _TapSocket(b, self, 0), on_done=on_done, limits=limits)

    def look(self, index: int, data: bytes) -> None:
        with self._lock:
            window = self._tails[index] + data
            self.marker_hits += window.count(MARKER)
            self._tails[index] = window[-(len(MARKER) - 1):]
            self.seen[index] += len(data)


class _TapSocket:
    def __init__(self, sock, tap: RelayTap, index: int):
        self._sock, self._tap, self._index = sock, tap, index
        self._cut = False

    def __getattr__(self, name):
        return getattr(self._sock, name)

    def sendall(self, data) -> None:
        data = bytes(data)
        offset = self._tap.seen[self._index]
        self._tap.look(self._index, data)
        if self._cut:
            return  # truncated: the rest never arrives
        tamper = self._tap.tamper
        if tamper and tamper[0] == self._index and not self._tap.tampered.is_set() \
                and offset <= tamper[2] < offset + len(data):
            self._tap.tampered.set()
            at = tamper[2] - offset
            kind = tamper[1]
            if kind == "flip":
                data = data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1:]
            elif kind == "drop":
                return
            elif kind == "replay":
                self._sock.sendall(data)
            elif kind == "truncate":
                self._sock.sendall(data[:at])
                self._cut = True
                self._sock.shutdown(socket.SHUT_WR)  # a clean FIN, but no close_notify
                return
        self._sock.sendall(data)

    def shutdown(self, how) -> None:
        if self._cut and how == socket.SHUT_WR:
            return
        self._sock.shutdown(how)


def marked_payload(size: int) -> bytes:
    data = bytearray(random_bytes(size))
    for at in range(0, size - len(MARKER), 1 << 20):
        data[at:at + len(MARKER)] = MARKER
    return bytes(data)


def sink_handler(conn: socket.socket, service: TcpService) -> None:
    """Read until the end; record (how it ended, what arrived)."""
    received = bytearray()
    try:
        while True:
            data = conn.recv(1 << 16)
            if not data:
                service.results.append(("eof", bytes(received)))
                return
            received += data
    except ConnectionResetError:
        service.results.append(("reset", bytes(received)))


def source_handler(payload: bytes):
    def handler(conn: socket.socket, service: TcpService) -> None:
        send_and_close_write(conn, payload)
        recv_until_eof(conn)

    return handler


def read_to_end(sock: socket.socket) -> tuple[str, bytes]:
    received = bytearray()
    try:
        while True:
            data = sock.recv(1 << 16)
            if not data:
                return "eof", bytes(received)
            received += data
    except ConnectionResetError:
        return "reset", bytes(received)


@pytest.mark.timeout(180)
def test_64_mib_each_way_arrive_intact_and_the_relay_sees_no_plaintext(server, client_a, client_b, services,
                                                                        monkeypatch):
    tap = RelayTap().install(monkeypatch)
    size = 64 << 20
    up, down = marked_payload(size), marked_payload(size)
    service = services(TcpService(exchange_handler(down)))
    proxy = client_a.create_proxy(0, "B", service.port, protocol="tcp")
    with connect(proxy.local_port, timeout=60) as user:
        assert exchange(user, up) == (sha256(down), size)
    wait_until(lambda: service.results, timeout=30)
    assert service.results == [{"received": (sha256(up), size)}]
    assert tap.seen[0] > size and tap.seen[1] > size  # the hook was in the path
    assert tap.marker_hits == 0
    assert client_a.sealing.known.get("B") == client_b.sealing.fingerprint
    assert client_b.sealing.known.get("A") == client_a.sealing.fingerprint


def test_without_sealing_the_same_tap_would_see_the_marker(monkeypatch):
    """The hook's check is real: plaintext through the same relay pipe is found."""
    tap = RelayTap().install(monkeypatch)
    a, b = socket.socketpair()
    c, d = socket.socketpair()
    pipe = tap.pipe(b, c)
    threads = ThreadGroup("svc-tap")
    worker = threading.Thread(target=pipe.run, args=(threads, "tap"), name="svc-tap-run")
    worker.start()
    a.sendall(marked_payload(64 << 10))  # fits the socket buffers: no reader needed yet
    a.shutdown(socket.SHUT_WR)
    d.shutdown(socket.SHUT_WR)
    recv_until_eof(d)
    worker.join(10)
    threads.join_all(10)
    for s in (a, d):
        s.close()
    assert tap.marker_hits >= 1


@pytest.mark.parametrize("kind", ["flip", "drop", "replay", "truncate"])
def test_a_relay_that_changes_the_stream_to_b_gets_a_reset_and_nothing_altered_arrives(
        server, client_a, client_b, services, monkeypatch, caplog, kind):
    payload = pattern(4 << 20)
    tap = RelayTap(tamper=(0, kind, (1 << 20) + 12345)).install(monkeypatch)
    sink = services(TcpService(sink_handler))
    proxy = client_a.create_proxy(0, "B", sink.port, protocol="tcp")
    with connect(proxy.local_port) as user:
        try:
            send_and_close_write(user, payload)
        except OSError:
            pass  # the reset may come while we still send
        assert read_to_end(user)[0] == "reset"
    ((how, received),) = wait_until(lambda: sink.results, timeout=10)
    assert tap.tampered.is_set()
    assert how == "reset"
    assert len(received) < len(payload) and received == payload[:len(received)]
    assert any("sealed session" in r.getMessage() and "nothing of it delivered" in r.getMessage()
               for r in caplog.records if r.name == "chuantou.client")


@pytest.mark.parametrize("kind", ["flip", "truncate"])
def test_a_relay_that_changes_the_stream_to_a_gets_a_reset_and_nothing_altered_arrives(
        server, client_a, client_b, services, monkeypatch, kind):
    payload = pattern(4 << 20)
    tap = RelayTap(tamper=(1, kind, (2 << 20) + 7)).install(monkeypatch)
    source = services(TcpService(source_handler(payload)))
    proxy = client_a.create_proxy(0, "B", source.port, protocol="tcp")
    with connect(proxy.local_port) as user:
        user.shutdown(socket.SHUT_WR)
        how, received = read_to_end(user)
    assert tap.tampered.is_set()
    assert how == "reset"
    assert len(received) < len(payload) and received == payload[:len(received)]


def test_half_close_passes_through_sealed(server, client_a, client_b, services):
    service = services(TcpService(reply_after_eof_handler(300_000)))
    proxy = client_a.create_proxy(0, "B", service.port, protocol="tcp")
    request = pattern(123_456)
    with connect(proxy.local_port) as user:
        send_and_close_write(user, request)
        reply = recv_until_eof(user)
    assert reply == hashlib.sha256(request).digest() + pattern(300_000)


def _proxy_refuses(proxy, text: str) -> str:
    with connect(proxy.local_port) as user:
        assert closed_by_peer(user, 10)
    return wait_until(lambda: text in (proxy.last_error or "") and proxy.last_error, timeout=10,
                      message=f"{text!r} in the proxy's last error ({proxy.last_error!r})")


def _echo_works(proxy) -> None:
    with connect(proxy.local_port) as user:
        user.sendall(b"ping")
        assert recv_exactly(user, 4) == b"ping"


def test_a_changed_key_is_refused_with_the_forget_key_message_and_works_after_forget_key(
        server, make_client, tcp_echo, tmp_path):
    known = known_clients.KnownClients(tmp_path / known_clients.KNOWN_CLIENTS_FILE)
    a = make_client(server, "A", known_clients=known)
    first = make_client(server, "B")
    proxy = a.create_proxy(0, "B", tcp_echo.port, protocol="tcp")
    _echo_works(proxy)
    first.stop()
    impostor = make_client(server, "B")  # the same ID with another key: as a relay that lies would hand out
    text = _proxy_refuses(proxy, "forget-key B")
    assert first.sealing.fingerprint in text and impostor.sealing.fingerprint in text and "'B'" in text
    assert known.get("B") == first.sealing.fingerprint
    assert known_clients.KnownClients(known.path).forget("B")
    _echo_works(proxy)
    assert known.get("B") == impostor.sealing.fingerprint


def test_the_relays_word_on_a_key_does_not_decide(server, client_a, client_b, tcp_echo, caplog):
    server.registry.get("B").public_key = identity.generate().public_key_b64  # a relay that lies
    proxy = client_a.create_proxy(0, "B", tcp_echo.port, protocol="tcp")
    _echo_works(proxy)
    assert client_a.sealing.known.get("B") == client_b.sealing.fingerprint
    assert any("relay named a different key" in r.getMessage() for r in caplog.records)


def test_a_wrong_target_fingerprint_refuses_the_first_session(server, client_a, client_b, tcp_echo):
    wrong = identity.generate().fingerprint
    proxy = client_a.create_proxy(0, "B", tcp_echo.port, protocol="tcp", target_fingerprint=wrong)
    _proxy_refuses(proxy, "--target-fingerprint")
    assert client_a.sealing.known.get("B") is None  # nothing trusted on first use
    right = client_a.create_proxy(0, "B", tcp_echo.port, protocol="tcp",
                                  target_fingerprint=client_b.sealing.fingerprint)
    _echo_works(right)


def test_allow_from_refuses_a_peer_that_is_not_listed(server, make_client, tcp_echo):
    b = make_client(server, "B", allow_from=["friend"])
    a = make_client(server, "A")
    proxy = a.create_proxy(0, "B", tcp_echo.port, protocol="tcp")
    _proxy_refuses(proxy, "does not accept sessions")
    friend = make_client(server, "friend")
    _echo_works(friend.create_proxy(0, "B", tcp_echo.port, protocol="tcp"))
    assert b.sealing.known.get("friend") == friend.sealing.fingerprint


def test_allow_from_checks_the_proven_key_not_the_name_the_relay_sends(server, make_client, tcp_echo):
    friend_key = identity.generate()
    b = make_client(server, "B", allow_from=[friend_key.fingerprint])
    a = make_client(server, "A")
    conn = server.registry.get("B")
    send = conn.send

    def lying_send(msg):  # the relay says the session comes from "friend", with friend's key
        if isinstance(msg, p.ConnectRequest):
            msg = dataclasses.replace(msg, fromClientId="friend", peerPublicKey=friend_key.public_key_b64)
        return send(msg)

    conn.send = lying_send
    proxy = a.create_proxy(0, "B", tcp_echo.port, protocol="tcp")
    _proxy_refuses(proxy, "refused")
    assert b.sealing.known.get("friend") is None


# --- the command line ------------------------------------------------------------------------------

@pytest.mark.timeout(90)
def test_cli_keeps_the_key_beside_the_config_shows_it_pins_and_forgets(cli, services):
    from cli_support import fetch, free_tcp_udp_port, wait_fetch
    from helpers import free_port, text_service, wait_until

    web = services(text_service(b"sealed hello"))
    relay = cli.start_relay()
    b_status = cli.start_client(relay, "B", free_port(), config=cli.root / "b.json")
    a_status = cli.start_client(relay, "A", free_port())
    key_a = cli.config_dir / identity.IDENTITY_FILE
    assert stat.S_IMODE(os.stat(key_a).st_mode) == 0o600
    assert identity.load(key_a).fingerprint == a_status["fingerprint"]
    assert identity.load(cli.root / "b.identity.pem").fingerprint == b_status["fingerprint"]
    status = cli.client("status")
    assert f"key:        {a_status['fingerprint']}" in status.stdout

    wrong = cli.client("proxy", "create", "--local-port", free_port(), "--target-client", "B",
                       "--target-port", web.port, "--protocol", "tcp",
                       "--target-fingerprint", identity.generate().fingerprint)
    assert wrong.returncode == 0, wrong.stderr
    wrong_port = int(wrong.stdout.split("use it at: ")[1].rsplit(":", 1)[1])
    assert fetch(wrong_port, timeout=3) is None
    wait_until(lambda: "--target-fingerprint" in cli.client("proxy", "list").stdout, 10,
               message="the pin's refusal in proxy list")

    local = free_tcp_udp_port()
    assert cli.client("proxy", "create", "--local-port", local, "--target-client", "B", "--target-port",
                      web.port, "--protocol", "tcp").returncode == 0
    wait_fetch(local, b"sealed hello")
    pins = (cli.config_dir / known_clients.KNOWN_CLIENTS_FILE).read_text()
    assert f"B {b_status['fingerprint']}" in pins
    forget = cli.client("forget-key", "B")
    assert forget.returncode == 0 and "forgot the key of B" in forget.stdout
    assert "B " not in (cli.config_dir / known_clients.KNOWN_CLIENTS_FILE).read_text()
    assert cli.client("forget-key", "B").stdout.startswith("no key of B")
