"""What the relay learns of direct TCP sessions (issue 15): the relay holds a session that went
direct until its clients end it, its clients report the bytes it carried (at once, periodically
while it runs, and at its end), and those claims are bounded: a session the relay carried cannot
be claimed direct, nor another client's. On 127.0.0.1; the NAT case is in test_direct_tcp.py."""

from __future__ import annotations

import os

import pytest

from chuantou_server import direct_claims
from common import protocol as p

from admin_support import ADMIN_PORTS, ADMIN_TOKEN
from helpers import connect, recv_exactly, sha256, wait_until
from test_admin_api import get_json
from test_direct_tcp_loopback import _echo_through, _proxy, _tcp_bytes
from test_metrics import scrape

SIZE = 1 << 20


def _tcp_direct(server) -> list[int]:
    """[A->B, B->A] bytes clients reported went direct in TCP sessions (live and ended)."""
    totals = server.traffic.direct_by_direction()
    return [totals.get(("tcp", 0), 0), totals.get(("tcp", 1), 0)]


def _often_reporting(make_client, server, tcp_echo):
    """As _proxy (both on ``--path auto``), with clients that report every 0.1 s: their heartbeat
    loop (which sends the reports) ticks every 0.1 s."""
    b = make_client(server, "B", path="auto", heartbeat_interval=0.1)
    a = make_client(server, "A", path="auto", heartbeat_interval=0.1)
    for client in (a, b):
        client.tcp_reports.every = 0.1
    wait_until(lambda: a.direct.relay_knows and b.direct.relay_knows, message="no registration")
    return a, b, a.create_proxy(0, "B", tcp_echo.port, protocol="tcp")


def test_a_live_direct_session_is_held_by_the_relay_and_its_bytes_are_reported_while_it_runs(
        server, make_client, tcp_echo):
    a, b, proxy = _often_reporting(make_client, server, tcp_echo)
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


@pytest.fixture
def admin_relay(make_server):
    """A relay whose admin API answers (admin_support.relay)."""
    server = make_server(admin_token=ADMIN_TOKEN)
    ADMIN_PORTS.add(server.port)
    yield server
    ADMIN_PORTS.discard(server.port)


def _claimed(server, client_id: str) -> int:
    """The smaller of what ``client_id`` claims it sent and received directly, per the client list."""
    clients = {c["id"]: c for c in get_json(server.port, "/api/clients")["clients"]}
    return min(clients[client_id]["directBytesSent"], clients[client_id]["directBytesReceived"])


def test_the_relay_page_api_and_metrics_show_a_direct_tcp_session_and_its_reported_bytes(
        admin_relay, make_client, tcp_echo):
    relay = admin_relay
    a, b, proxy = _often_reporting(make_client, relay, tcp_echo)
    payload = os.urandom(SIZE)
    with connect(proxy.local_port) as user:
        user.sendall(payload)
        assert sha256(recv_exactly(user, SIZE)) == sha256(payload)
        session = wait_until(lambda: (s := get_json(relay.port, "/api/sessions")["sessions"]) and
                             s[0]["directAToB"] >= SIZE and s[0]["directBToA"] >= SIZE and s[0],
                             timeout=10.0, message="the relay's page never shows the direct bytes")
        assert (session["path"], session["state"]) == ("direct", "direct")
        assert sorted(session["pathReportedBy"]) == ["A", "B"]
        assert (session["bytesAToB"], session["bytesBToA"]) == (0, 0)
        # each client's own claims, per client (live): what it sent and received directly
        wait_until(lambda: min(_claimed(relay, "A"), _claimed(relay, "B")) >= SIZE,
                   timeout=10.0, message="each side's reports never reach the relay's client list")
    wait_until(lambda: not get_json(relay.port, "/api/sessions")["sessions"], message="the session to end")
    status = get_json(relay.port, "/api/status")
    assert status["directBytesReported"] >= 2 * SIZE and status["totalBytes"] == 0
    assert min(_claimed(relay, "A"), _claimed(relay, "B")) >= SIZE  # kept once ended
    figures = scrape(relay.port)
    for direction in ("a_to_b", "b_to_a"):
        assert figures.value("chuantou_relay_bytes_direct_reported_total", protocol="tcp", direction=direction) >= SIZE
        assert figures.value("chuantou_relay_bytes_relayed_total", protocol="tcp", direction=direction) == 0
