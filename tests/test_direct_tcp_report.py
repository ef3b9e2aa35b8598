"""What the relay learns of direct TCP sessions (issue 15): the relay holds a session that went
direct until its clients end it, its clients report the bytes it carried (at once, periodically
while it runs, and at its end), and those claims are bounded: a session the relay carried cannot
be claimed direct, nor another client's. On 127.0.0.1; the NAT case is in test_direct_tcp.py."""

from __future__ import annotations

import os

from chuantou_server import direct_claims
from common import protocol as p
from helpers import connect, recv_exactly, sha256, wait_until
from test_direct_tcp_loopback import _echo_through, _proxy, _tcp_bytes

SIZE = 1 << 20


def _tcp_direct(server) -> list[int]:
    """[A->B, B->A] bytes clients reported went direct in TCP sessions (live and ended)."""
    totals = server.traffic.direct_by_direction()
    return [totals.get(("tcp", 0), 0), totals.get(("tcp", 1), 0)]


def _reports_often(*clients) -> None:
    for client in clients:
        client.tcp_reports.every = 0.1


def test_a_live_direct_session_is_held_by_the_relay_and_its_bytes_are_reported_while_it_runs(
        server, make_client, tcp_echo):
    a, b, proxy = _proxy(make_client, server, tcp_echo, "auto", "auto")
    _reports_often(a, b)
    payload = os.urandom(SIZE)
    with connect(proxy.local_port) as user:
        user.sendall(payload)
        assert sha256(recv_exactly(user, SIZE)) == sha256(payload)
        (session,) = server.sessions.all()
        wait_until(lambda: session.direct_held, message="the relay does not hold the direct session")
        assert direct_claims.path(session) == "direct"
        # the heartbeat loop (every heartbeat interval, at most every 0.1 s here) reports the counts
        wait_until(lambda: min(direct_claims.direct_bytes(session)) >= SIZE, timeout=10.0,
                   message=f"no periodic report: {session.claims}")
        assert (session.bytes_a_to_b, session.bytes_b_to_a) == (0, 0)  # the relay carried none of it
    wait_until(lambda: not server.sessions.all(), message="the session's end never reached the relay")
    assert min(_tcp_direct(server)) >= SIZE and _tcp_bytes(server) == 0
    assert server.status()["directBytesReported"] >= 2 * SIZE


def test_a_short_direct_session_is_reported_at_its_end(server, make_client, tcp_echo):
    a, b, proxy = _proxy(make_client, server, tcp_echo, "auto", "auto")  # default: reports every 5 s
    payload = os.urandom(SIZE)
    assert _echo_through(proxy.local_port, payload) == sha256(payload)
    wait_until(lambda: not server.sessions.all(), message="the session's end never reached the relay")
    assert min(_tcp_direct(server)) >= SIZE and _tcp_bytes(server) == 0


def test_a_relayed_session_cannot_be_claimed_direct_and_a_stranger_cannot_claim_it_at_all(
        server, make_client, tcp_echo):
    a, b, proxy = _proxy(make_client, server, tcp_echo, "auto", "relay")
    make_client(server, "C")
    with connect(proxy.local_port) as user:
        user.sendall(b"relayed")
        assert recv_exactly(user, 7) == b"relayed"
        (session,) = server.sessions.all()
        lie = p.PathReport(sessionId=session.id, path="direct", directBytesSent=SIZE, directBytesReceived=SIZE)
        wait_until(lambda: session.bytes_a_to_b >= 7, message="the relay did not carry the session")
        for liar in ("A", "B", "C"):  # as each one's control connection reads it (here: synchronously)
            server.registry.get(liar).on_path_report(lie)
        assert direct_claims.direct_bytes(session) == (0, 0) and direct_claims.path(session) == "relay"
        assert not session.direct_held
    wait_until(lambda: not server.sessions.all(), message="the relayed session did not end")
    assert _tcp_direct(server) == [0, 0]


def test_a_direct_session_no_side_reports_is_let_go_by_the_relay_and_runs_on(server, make_client, tcp_echo,
                                                                              monkeypatch):
    a, b, proxy = _proxy(make_client, server, tcp_echo, "auto", "auto")
    for client in (a, b):  # as an older client: it goes direct but tells the relay nothing of it
        for name in ("went_direct", "tick", "ended"):
            monkeypatch.setattr(client.tcp_reports, name, lambda *args: None)
    monkeypatch.setattr(direct_claims, "UNREPORTED_HOLD", 0.5)
    with connect(proxy.local_port) as user:
        user.sendall(b"first")
        assert recv_exactly(user, 5) == b"first"
        (session,) = server.sessions.all()
        wait_until(lambda: session.direct_held, message="the relay does not hold the direct session")
        wait_until(lambda: not server.sessions.all(), message="the relay holds an unreported session forever")
        user.sendall(b"still direct")  # the relay let it go without a word to either side
        assert recv_exactly(user, 12) == b"still direct"
    assert _tcp_direct(server) == [0, 0] and _tcp_bytes(server) == 0
