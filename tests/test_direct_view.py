"""Seeing the direct path (issue 15): each session's path on both clients and on the relay, and
the bytes that went direct, which the relay learns only from the clients' ``path_report``
claims: kept per side, bounded, never lowered, and labelled as reported by clients.
"""

from __future__ import annotations

import socket
import time

import pytest

from chuantou_server import direct_claims
from chuantou_client.apicmds import connection_rows, path_summary
from common import protocol as p

from admin_support import relay  # noqa: F401 (fixture)
from helpers import UdpEchoService, udp_roundtrip, wait_until
from security_support import registered_peer
from test_admin_api import get_json
from test_metrics import scrape

ROUNDS = 20


def _user() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    return sock


def _udp_flow(client) -> dict | None:
    flows = [c for c in client.connections() if c["protocol"] == "udp"]
    return flows[0] if flows else None


def _relay_session(server) -> dict | None:
    sessions = get_json(server.port, "/api/sessions")["sessions"]
    return sessions[0] if sessions else None


@pytest.mark.timeout(40)
def test_a_direct_flow_shows_as_direct_everywhere_and_its_bytes_reach_the_relay_as_reported(
        relay, make_client, services):  # noqa: F811 (fixture)
    echo = services(UdpEchoService())
    # no keepalive pings during the test: each is a direct datagram, counted after `sent` is read
    a = make_client(relay, "A", udp_idle_timeout=1.5, path="auto", direct_keepalive=60.0)
    b = make_client(relay, "B", udp_idle_timeout=30.0, path="auto", direct_keepalive=60.0)
    proxy = a.create_proxy(0, "B", echo.port, protocol="udp")
    with _user() as user:
        for i in range(ROUNDS):
            assert udp_roundtrip(user, proxy.local_port, b"direct %03d" % i) == b"direct %03d" % i
        # both clients: the flow's path, and the bytes it moved that way (sealed datagrams, as sent)
        mine = _udp_flow(a)
        assert mine["path"] == "direct" and _udp_flow(b)["path"] == "direct"
        sent, received = mine["directBytesSent"], mine["directBytesReceived"]
        assert sent >= ROUNDS * len(b"direct 000") and received >= ROUNDS * len(b"direct 000")
        assert path_summary(a.connections(), proxy.local_port) == "1 direct"
        # the relay: told at once that the flow went direct (it saw none of its payload)
        session = wait_until(lambda: (s := _relay_session(relay)) and s["path"] == "direct" and s,
                             message="the relay to learn the flow goes direct")
        assert "A" in session["pathReportedBy"] and session["bytesAToB"] == 0
    # the flow ends idle on A; A's last report comes before its session_closed
    wait_until(lambda: not get_json(relay.port, "/api/sessions")["sessions"], timeout=10.0,
               message="the flow to end")
    status = get_json(relay.port, "/api/status")
    assert status["directBytesReported"] == sent + received
    assert status["totalBytes"] == 0 and relay.udp.relayed_bytes == 0  # claims never count as relayed
    clients = {c["id"]: c for c in get_json(relay.port, "/api/clients")["clients"]}
    assert (clients["A"]["directBytesSent"], clients["A"]["directBytesReceived"]) == (sent, received)
    figures = scrape(relay.port)
    assert figures.value("chuantou_relay_bytes_direct_reported_total", protocol="udp", direction="a_to_b") == sent
    assert figures.value("chuantou_relay_bytes_direct_reported_total", protocol="udp", direction="b_to_a") == received


def test_a_relayed_flow_reports_nothing_and_shows_as_relayed(relay, make_client, services):  # noqa: F811
    echo = services(UdpEchoService())
    a = make_client(relay, "A", path="relay")
    make_client(relay, "B")
    proxy = a.create_proxy(0, "B", echo.port, protocol="udp")
    with _user() as user:
        assert udp_roundtrip(user, proxy.local_port, b"relayed") == b"relayed"
        flow = _udp_flow(a)
        assert flow["path"] == "relay" and "directBytesSent" not in flow
        session = _relay_session(relay)
        assert session["path"] == "relay" and session["pathReportedBy"] == []
        assert session["directAToB"] == session["directBToA"] == 0
    assert get_json(relay.port, "/api/status")["directBytesReported"] == 0


def _session_between(peers, server, a: str, b: str):
    """Two bare control channels registered as ``a`` and ``b``, and a UDP session from a to b."""
    pa, pb = registered_peer(peers, server, a, token=None), registered_peer(peers, server, b, token=None)
    pa.send(p.ConnectRequest(toClientId=b, remotePort=9, protocol="udp", requestId="r1"))
    created = pa.recv_until(p.CreateSession)
    pb.recv_until(p.ConnectOffer)
    return pa, pb, server.sessions.get(created.sessionId)


def test_claims_are_bounded_never_lowered_and_only_a_sessions_own_clients_make_them(relay, peers):  # noqa: F811
    pa, pb, session = _session_between(peers, relay, "A", "B")
    outsider = registered_peer(peers, relay, "C", token=None)
    huge = p.MAX_REPORTED_BYTES
    pa.send(p.PathReport(sessionId=session.id, path="direct", directBytesSent=huge, directBytesReceived=5))
    wait_until(lambda: session.claims[0][1] == 5, message="A's claim")
    age = time.monotonic() - session.created_mono
    assert session.claims[0][0] <= direct_claims.CLAIM_SLACK + direct_claims.MAX_CLAIM_RATE * age  # capped
    capped = session.claims[0][0]
    pa.send(p.PathReport(sessionId=session.id, path="direct", directBytesSent=1, directBytesReceived=1))
    outsider.send(p.PathReport(sessionId=session.id, path="direct", directBytesSent=huge, directBytesReceived=huge))
    outsider.send(p.PathReport(sessionId="0" * 32, path="direct", directBytesSent=7))  # no such session
    pb.send(p.PathReport(sessionId=session.id, path="relay", directBytesSent=3, directBytesReceived=4))
    wait_until(lambda: session.claims[1] == [3, 4], message="B's claim")
    assert session.claims[0] == [capped, 5]  # a lower report does not lower it; C's changed nothing
    assert direct_claims.direct_bytes(session) == (capped, 5)  # a direction: its sender's or its receiver's word
    listed = _relay_session(relay)
    assert listed["path"] == "direct" and listed["pathReportedBy"] == ["A", "B"]
    assert get_json(relay.port, "/api/status")["directBytesReported"] == capped + 5
    clients = {c["id"]: c for c in get_json(relay.port, "/api/clients")["clients"]}
    assert (clients["C"]["directBytesSent"], clients["C"]["directBytesReceived"]) == (0, 0)
    assert (clients["B"]["directBytesSent"], clients["B"]["directBytesReceived"]) == (3, 4)


@pytest.mark.parametrize("payload", [
    {"sessionId": "ab", "path": "direct", "directBytesSent": 2 ** 64},
    {"sessionId": "ab", "path": "direct", "directBytesSent": -1},
    {"sessionId": "ab", "path": "direct", "directBytesReceived": 1.5},
    {"sessionId": "ab", "path": "sideways"},
    {"sessionId": "x" * 65, "path": "direct"},
])
def test_a_malformed_report_is_refused_by_name_and_the_channel_and_pages_carry_on(relay, peers, payload):  # noqa: F811
    import json

    pa, _, session = _session_between(peers, relay, "A", "B")
    pa.send(json.dumps({"type": "path_report", "payload": payload}))
    error = pa.recv_until(p.Error)
    assert error.code == "bad_message" and "path_report" in error.message
    pa.send(p.PathReport(sessionId=session.id, path="direct", directBytesSent=11))
    wait_until(lambda: session.claims[0][0] == 11, message="the next, valid report")
    assert get_json(relay.port, "/api/status")["directBytesReported"] == 11
    assert scrape(relay.port).value("chuantou_relay_bytes_direct_reported_total", protocol="udp",
                                    direction="a_to_b") == 11


def test_proxy_list_rows_name_each_sessions_path():
    connections = [
        {"id": "a" * 32, "shortId": "aaaaaaaa", "side": "A", "localPort": 9090, "peer": "B", "port": 53,
         "protocol": "udp", "path": "direct", "directBytesSent": 2048, "directBytesReceived": 10},
        {"id": "b" * 32, "shortId": "bbbbbbbb", "side": "A", "localPort": 9090, "peer": "B", "port": 80,
         "protocol": "tcp", "path": "relay", "bytesSent": 5, "bytesReceived": 6},
        {"id": "c" * 32, "shortId": "cccccccc", "side": "B", "peer": "C", "port": 22, "protocol": "udp",
         "path": "relay"},
    ]
    assert path_summary(connections, 9090) == "1 direct, 1 relay"
    assert path_summary(connections, 9091) == "-"
    rows = connection_rows(connections)
    assert rows[0][4] == "PATH"
    assert rows[1] == ("aaaaaaaa", "A from :9090", "B", "udp", "direct", "2.0 KiB", "10 B")
    assert rows[2][4:] == ("relay", "5 B", "6 B")
    assert rows[3] == ("cccccccc", "B to :22", "C", "udp", "relay", "-", "-")
