"""The direct path for TCP on 127.0.0.1 (no namespaces): both clients' data channels come from
reusable ports the relay sees as they are, so simultaneous open meets at once; the NAT cases are
in test_direct_tcp.py (network namespaces, root)."""

from __future__ import annotations

import os
import socket
import threading

import pytest

from common import protocol as p
from helpers import IO_TIMEOUT, closed_by_peer, connect, recv_exactly, sha256, wait_until

SIZE = 1 << 20


def _tcp_bytes(server) -> int:
    """Bytes the relay pumped for TCP sessions since start (live and ended)."""
    return sum(count for (protocol, _), count in server.traffic.bytes_by_direction().items() if protocol == "tcp")


def _echo_through(port: int, payload: bytes) -> str:
    """Send ``payload`` through the proxy and read as many bytes back (no half-close); their sha256."""
    with connect(port) as sock:
        sender = threading.Thread(target=sock.sendall, args=(payload,), name="svc-direct-sender", daemon=True)
        sender.start()
        got = bytearray()
        while len(got) < len(payload):
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            got += chunk
        sender.join(IO_TIMEOUT)
    return sha256(bytes(got))


def _proxy(make_client, server, tcp_echo, path_a: str, path_b: str):
    b = make_client(server, "B", path=path_b)
    a = make_client(server, "A", path=path_a)
    wait_until(lambda: a.direct.relay_knows and b.direct.relay_knows, message="no registration")
    return a, b, a.create_proxy(0, "B", tcp_echo.port, protocol="tcp")


@pytest.mark.parametrize("path", ["auto", "direct"])
def test_on_loopback_a_tcp_session_goes_direct_and_the_relay_carries_none_of_it(server, make_client, tcp_echo,
                                                                                   path):
    a, b, proxy = _proxy(make_client, server, tcp_echo, path, "auto")
    payload = os.urandom(SIZE)
    assert _echo_through(proxy.local_port, payload) == sha256(payload)
    assert a.direct.describe()["pairs"]["B"]["last"] == "direct"
    assert _tcp_bytes(server) == 0


def test_a_direct_session_shows_its_path_and_its_direct_bytes_on_both_sides(server, make_client, tcp_echo):
    a, b, proxy = _proxy(make_client, server, tcp_echo, "auto", "auto")
    with connect(proxy.local_port) as user:
        user.sendall(b"seen")
        assert recv_exactly(user, 4) == b"seen"
        # a pump counts a chunk once its write returned, which may be just after the user read it
        wait_until(lambda: [(c["path"], c["directBytesSent"], c["directBytesReceived"]) for c in a.connections()]
                   == [("direct", 4, 4)], message=f"A's side: {a.connections()}")
        wait_until(lambda: [c["path"] for c in b.connections()] == ["direct"], message="B's side is not direct")


def test_with_the_target_on_path_relay_the_session_is_relayed_at_once(server, make_client, tcp_echo):
    a, b, proxy = _proxy(make_client, server, tcp_echo, "auto", "relay")
    payload = os.urandom(SIZE)
    assert _echo_through(proxy.local_port, payload) == sha256(payload)
    assert _tcp_bytes(server) >= 2 * SIZE
    assert "B" not in a.direct.describe()["pairs"]  # B chose the relay: no attempt, nothing to remember


def test_with_path_direct_a_session_that_cannot_go_direct_is_refused_rather_than_relayed(server, make_client,
                                                                                        tcp_echo):
    a, b, proxy = _proxy(make_client, server, tcp_echo, "direct", "relay")
    with connect(proxy.local_port) as user:
        user.sendall(b"never relayed")
        assert closed_by_peer(user, timeout=IO_TIMEOUT)
    assert "--path direct" in (proxy.last_error or "")
    assert _tcp_bytes(server) == 0


def test_path_sync_is_plain_data_with_a_known_step():
    msg = p.decode(p.encode(p.PathSync(sessionId="ab" * 16, step="sync")), sender="relay")
    assert msg == p.PathSync(sessionId="ab" * 16, step="sync")
    with pytest.raises(p.ProtocolError, match="step must be one of"):
        p.decode('{"type":"path_sync","payload":{"sessionId":"x","step":"dial-now"}}', sender="client")


def test_behind_a_tls_relay_the_session_goes_direct_too(make_server, make_client, tcp_echo, tmp_path):
    from security_support import TOKEN, make_self_signed, wss_url

    cert = make_self_signed(tmp_path, "relay")
    relay = make_server(token=TOKEN, tls_cert=cert.cert, tls_key=cert.key, tls_only=True)
    b = make_client(wss_url(relay), "B", token=TOKEN, ca_file=cert.cert, path="auto")
    a = make_client(wss_url(relay), "A", token=TOKEN, ca_file=cert.cert, path="auto")
    wait_until(lambda: a.direct.relay_knows and b.direct.relay_knows, message="no registration")
    proxy = a.create_proxy(0, "B", tcp_echo.port, protocol="tcp")
    payload = os.urandom(SIZE)
    assert _echo_through(proxy.local_port, payload) == sha256(payload)
    assert a.direct.describe()["pairs"]["B"]["last"] == "direct"
    assert _tcp_bytes(relay) == 0


def test_a_direct_session_outlives_the_relay(make_server, make_client, tcp_echo):
    server = make_server()
    a, b, proxy = _proxy(make_client, server, tcp_echo, "auto", "auto")
    with connect(proxy.local_port) as user:
        user.sendall(b"before")
        assert recv_exactly(user, 6) == b"before"
        assert [c["path"] for c in a.connections()] == ["direct"]
        server.stop()  # the relay goes: a direct session does not need it
        wait_until(lambda: not a.connected and not b.connected, message="the clients never saw the relay go")
        user.sendall(b"after")
        assert recv_exactly(user, 5) == b"after"


def test_over_an_ipv6_relay_the_session_goes_direct_too(make_server, make_client, tcp_echo):
    from udp_support import ipv6_loopback_available

    if not ipv6_loopback_available():
        pytest.skip("this machine has no IPv6 loopback (::1)")
    relay = make_server(host="::1")
    url = f"ws://[::1]:{relay.port}"
    a, b, proxy = _proxy(make_client, url, tcp_echo, "auto", "auto")
    payload = os.urandom(SIZE)
    assert _echo_through(proxy.local_port, payload) == sha256(payload)
    assert a.direct.describe()["pairs"]["B"]["last"] == "direct"
    assert _tcp_bytes(relay) == 0


def test_over_a_direct_connection_a_stranger_is_refused_and_not_pinned_even_before_any_pin():
    """Anyone may connect to B's port during an attempt (a full-cone NAT, or none): B must take
    only the key the relay named for A, never pin a stranger's on first use as over the relay."""
    import time

    from chuantou_client.sealing import SealError, Sealing, hinted_key, seal_as_a
    from common import identity

    real_a, stranger = identity.generate(), identity.generate()
    b = Sealing(identity.generate())  # no pins at all yet
    hint = real_a.public_key_b64
    left, right = socket.socketpair()
    errors: list = []

    def the_stranger():
        try:
            seal_as_a(left, stranger, None, time.monotonic() + 5)
        except SealError as exc:
            errors.append(exc)

    worker = threading.Thread(target=the_stranger, name="svc-stranger")
    worker.start()
    try:
        with pytest.raises(SealError, match="not the expected"):
            b.seal_b(right, "A", "ab" * 16, hint, deadline=time.monotonic() + 5, expected=hinted_key(hint))
    finally:
        worker.join(IO_TIMEOUT)
    assert b.known.get("A") is None  # nothing pinned: the real A's first session still works


def test_a_peer_that_never_offers_costs_the_deadline_once_then_the_backoff_applies(server, make_client, tcp_echo):
    a, b, proxy = _proxy(make_client, server, tcp_echo, "auto", "auto")
    b.direct.relay_knows = False  # as a client that predates the TCP direct path: it never offers
    for _ in range(2):
        payload = os.urandom(1024)
        assert _echo_through(proxy.local_port, payload) == sha256(payload)
    pair = a.direct.describe()["pairs"]["B"]
    assert (pair["last"], pair["failures"]) == ("relay", 1), pair  # the second did not wait for it again
    assert _tcp_bytes(server) >= 2 * 2 * 1024  # both relayed (sealed: a little more than the payload)
