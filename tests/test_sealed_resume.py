"""Resumed sealed sessions (chuantou_client/resumption.py): after one full handshake, A resumes
with B's ticket, and a resumed session is held to the same pins, --target-fingerprint,
--allow-from and relay-proof guarantees as a full one."""

from __future__ import annotations

import socket
import threading

import pytest

from chuantou_client import known_clients, resumption, sealing
from common import identity
from common.tls import PreparedClient

from helpers import TcpService, connect, pattern, recv_exactly, send_and_close_write, wait_until
from test_sealed import MARKER, RelayTap, marked_payload, read_to_end, sink_handler

pytestmark = pytest.mark.timeout(120)

SESSION = "5e55" * 8


def _pair(sa: sealing.Sealing, sb: sealing.Sealing, a_peer: str = "B", b_peer: str = "A", pinned=None,
          expected=None, sockets=None):
    """Seal over a socket pair (or ``sockets``: A's end, B's end): (A's result, B's result),
    each a stream or the exception it raised."""
    left, right = sockets or socket.socketpair()
    results: dict = {}

    def side_b():
        try:
            results["b"] = sb.seal_b(right, b_peer, SESSION)
        except Exception as exc:  # noqa: BLE001 (the test looks at it)
            results["b"] = exc

    worker = threading.Thread(target=side_b, name="svc-seal-b")
    worker.start()
    try:
        results["a"] = sa.seal_a(left, a_peer, pinned, SESSION, expected=expected)
    except Exception as exc:  # noqa: BLE001
        results["a"] = exc
    worker.join(10)
    return results["a"], results["b"]


def _talk(a, b) -> None:
    """Bytes both ways and a clean end each way. A reads twice, as a pump does: after its first
    read it keeps B's ticket and prepares its next connection (Sealing._after_setup)."""
    assert isinstance(a, sealing.SealedStream) and isinstance(b, sealing.SealedStream), (a, b)
    a.sendall(b"to b")
    assert recv_exactly(b, 4) == b"to b"
    b.sendall(b"to a")
    b.shutdown(socket.SHUT_WR)
    assert recv_exactly(a, 4) == b"to a" and a.recv(10) == b""
    a.shutdown(socket.SHUT_WR)
    assert b.recv(10) == b""
    a.close()
    b.close()


def _sealings():
    return sealing.Sealing(identity.generate()), sealing.Sealing(identity.generate())


def test_the_second_session_resumes_and_still_carries_the_proven_keys():
    sa, sb = _sealings()
    _talk(*_pair(sa, sb))
    assert sa.handshakes == {"full": 1, "resumed": 0} and len(sa.tickets) == 1
    for _ in range(2):
        a, b = _pair(sa, sb)
        assert a.resumed and b.resumed
        assert identity.certificate_fingerprint(a.peer_certificate()) == sb.fingerprint
        assert identity.certificate_fingerprint(b.peer_certificate()) == sa.fingerprint
        _talk(a, b)
    assert sa.handshakes == {"full": 1, "resumed": 2} and sb.handshakes == {"full": 1, "resumed": 2}


def test_a_ticket_is_never_offered_to_another_peer_or_key():
    store = resumption.TicketStore()
    sa, sb = _sealings()
    _talk(*_pair(sa, sb))
    session, _ = sa.tickets.offer("B", sb.fingerprint)
    assert session is not None
    store.keep("B", sb.fingerprint, session)
    assert store.offer("C", sb.fingerprint) == (None, None)  # another peer ID
    assert store.offer("B", None) == (None, None)  # nothing pinned
    assert store.offer("B", identity.generate().fingerprint) == (None, None)  # another key pinned now
    assert len(store) == 0  # and that dropped it


def test_a_peer_whose_key_changed_is_refused_although_a_has_its_ticket():
    sa, sb = _sealings()
    _talk(*_pair(sa, sb))
    impostor = sealing.Sealing(identity.generate())  # "B" with another key: as a lying relay would route
    a, _ = _pair(sa, impostor)
    assert isinstance(a, sealing.SealError), a
    text = str(a)
    assert "CHANGED" in text and sb.fingerprint in text and impostor.fingerprint in text and "forget-key B" in text
    a, b = _pair(sa, sb)  # the real B: the ticket, which the impostor could not use, still resumes
    assert a.resumed
    _talk(a, b)


def test_a_resumed_session_is_held_to_target_fingerprint_and_the_relay_named_key():
    sa, sb = _sealings()
    _talk(*_pair(sa, sb))
    other = identity.generate().fingerprint
    a, _ = _pair(sa, sb, pinned=other)  # --target-fingerprint of another key: no ticket offered, refused
    assert isinstance(a, sealing.SealError) and "--target-fingerprint" in str(a)
    _talk(*_pair(sa, sb))
    a, _ = _pair(sa, sb, expected=other)  # a direct connection must prove the relay-named key
    assert isinstance(a, sealing.SealError) and other in str(a)


def test_forget_key_on_either_side_makes_the_next_session_a_full_one():
    sa, sb = _sealings()
    _talk(*_pair(sa, sb))
    sa.known.forget("B")
    a, b = _pair(sa, sb)
    assert not a.resumed and not b.resumed and len(sa.tickets) == 0  # A dropped the ticket
    _talk(a, b)
    assert sa.known.get("B") == sb.fingerprint  # pinned again by the full handshake
    resumed = []
    for _ in range(2):  # B gives a ticket again in the session after one that showed A has none
        a, b = _pair(sa, sb)
        resumed.append(a.resumed)
        _talk(a, b)
    assert resumed == [False, True]
    sb.known.forget("A")
    a, b = _pair(sa, sb)
    assert not a.resumed and not b.resumed  # B made a new context: its old ticket key is gone
    _talk(a, b)


def test_a_new_allow_from_refuses_a_peer_that_holds_a_ticket():
    sa, sb = _sealings()
    _talk(*_pair(sa, sb))
    sb.allow_from = ["friend"]
    a, b = _pair(sa, sb)
    assert isinstance(b, sealing.SealError) and "not in --allow-from" in str(b)
    assert isinstance(a, sealing.SealError)
    assert len(sb._server_contexts) == 0  # the refused peer's context, and so its ticket key, is gone


def test_a_replayed_resumed_handshake_gets_no_session_from_b():
    """A relay that recorded a resumed session's bytes from A and plays them to B again: the
    ticket and its binder are A's, but B's fresh ServerHello makes A's old Finished wrong."""
    sa, sb = _sealings()
    _talk(*_pair(sa, sb))
    a_end, tap_a = socket.socketpair()
    tap_b, b_end = socket.socketpair()
    recorded = bytearray()

    def pump(src, dst, record: bool) -> None:
        try:
            while data := src.recv(65536):
                if record:
                    recorded.extend(data)
                dst.sendall(data)
        except OSError:
            pass
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    pumps = [threading.Thread(target=pump, args=(tap_a, tap_b, True), name="svc-pump-ab"),
             threading.Thread(target=pump, args=(tap_b, tap_a, False), name="svc-pump-ba")]
    for t in pumps:
        t.start()
    a, b = _pair(sa, sb, sockets=(a_end, b_end))
    assert a.resumed and b.resumed
    _talk(a, b)
    for t in pumps:
        t.join(10)
    for s in (tap_a, tap_b):
        s.close()
    proven_before = dict(sb.handshakes)

    replay, b_side = socket.socketpair()
    results: dict = {}

    def side_b():
        try:
            results["b"] = sb.seal_b(b_side, "A", SESSION)
        except Exception as exc:  # noqa: BLE001
            results["b"] = exc

    worker = threading.Thread(target=side_b, name="svc-seal-b")
    worker.start()
    replay.sendall(bytes(recorded))
    worker.join(10)
    replay.close()
    assert isinstance(results["b"], sealing.SealError), results["b"]
    assert sb.handshakes == proven_before  # no session came of it


def test_a_prepared_client_is_used_once():
    sa, _ = _sealings()
    prepared = PreparedClient(sealing.client_context(sa.identity))
    prepared.take()
    with pytest.raises(ValueError, match="used once"):
        prepared.take()


# --- through the relay -------------------------------------------------------------------------------

def _echo(proxy) -> None:
    with connect(proxy.local_port) as user:
        user.sendall(b"ping")
        assert recv_exactly(user, 4) == b"ping"


def test_resumed_sessions_through_the_relay_stay_private(server, client_a, client_b, tcp_echo, services,
                                                          monkeypatch):
    proxy = client_a.create_proxy(0, "B", tcp_echo.port, protocol="tcp")
    _echo(proxy)
    wait_until(lambda: len(client_a.sealing.tickets) == 1, message="A keeps B's ticket")
    tap = RelayTap().install(monkeypatch)
    size = 4 << 20
    payload = marked_payload(size)
    sink = services(TcpService(sink_handler))
    upload = client_a.create_proxy(0, "B", sink.port, protocol="tcp")
    with connect(upload.local_port) as user:
        send_and_close_write(user, payload)
        assert read_to_end(user) == ("eof", b"")
    ((how, received),) = wait_until(lambda: sink.results, timeout=30)
    assert how == "eof" and received == payload
    assert client_a.sealing.handshakes["resumed"] >= 1 and client_b.sealing.handshakes["resumed"] >= 1
    assert tap.seen[0] > size and tap.marker_hits == 0 and MARKER in payload


@pytest.mark.parametrize("kind", ["flip", "truncate"])
def test_a_relay_that_changes_a_resumed_session_gets_a_reset(server, client_a, client_b, tcp_echo, services,
                                                             monkeypatch, kind):
    _echo(client_a.create_proxy(0, "B", tcp_echo.port, protocol="tcp"))
    wait_until(lambda: len(client_a.sealing.tickets) == 1, message="A keeps B's ticket")
    resumed = client_a.sealing.handshakes["resumed"]
    payload = pattern(2 << 20)
    tap = RelayTap(tamper=(0, kind, (1 << 20) + 321)).install(monkeypatch)
    sink = services(TcpService(sink_handler))
    proxy = client_a.create_proxy(0, "B", sink.port, protocol="tcp")
    with connect(proxy.local_port) as user:
        try:
            send_and_close_write(user, payload)
        except OSError:
            pass  # the reset may come while we still send
        assert read_to_end(user)[0] == "reset"
    ((how, received),) = wait_until(lambda: sink.results, timeout=10)
    assert client_a.sealing.handshakes["resumed"] == resumed + 1  # it was a resumed session
    assert tap.tampered.is_set() and how == "reset"
    assert len(received) < len(payload) and received == payload[:len(received)]


def test_known_clients_on_disk_hold_no_ticket(server, make_client, tcp_echo, tmp_path):
    path = tmp_path / known_clients.KNOWN_CLIENTS_FILE
    a = make_client(server, "A", known_clients=known_clients.KnownClients(path))
    make_client(server, "B")
    proxy = a.create_proxy(0, "B", tcp_echo.port, protocol="tcp")
    for _ in range(3):
        _echo(proxy)
    wait_until(lambda: a.sealing.handshakes["resumed"] >= 1, message="a resumed session")
    assert sorted(p.name for p in tmp_path.iterdir()) == [known_clients.KNOWN_CLIENTS_FILE]
    assert len(path.read_text().splitlines()) == 2  # the comment and B's pin, nothing else
