"""The admin JSON APIs over HTTP, with a real relay and real clients: the relay's /api/ on its
own port, the client's on its local admin port, and who may use them."""

from __future__ import annotations

import socket
import time

import pytest

from chuantou_server import Server
from chuantou_server import admin as server_admin
from chuantou_server.httpd import Request
from common import __version__

from admin_support import ADMIN_PORTS, ADMIN_TOKEN, CLIENT_API_KEYS, Pump
from admin_support import client_app, clients, relay, user_sockets  # noqa: F401 (fixtures)
from helpers import echo_bytes, free_port, http_json, wait_until

DEADLINE = 10.0
PAYLOAD = 300_000
TOKEN = "admin-test-token-0123456789"


# --- helpers ----------------------------------------------------------------------------------

def request(port: int, method: str, path: str, headers: dict | None = None, body=None):
    """helpers.http_json, as the fixture relay's admin and with a fixture client app's API secret
    unless ``headers`` say otherwise."""
    headers = dict(headers or {})
    if port in ADMIN_PORTS:
        headers.setdefault("Authorization", f"Bearer {ADMIN_TOKEN}")
    if port in CLIENT_API_KEYS:
        headers.setdefault("X-Chuantou-Key", CLIENT_API_KEYS[port])
    return http_json(port, method, path, headers, body)


def get_json(port: int, path: str, headers: dict | None = None):
    status, _, payload = request(port, "GET", path, headers)
    assert status == 200, payload
    return payload


def same_origin(port: int) -> dict:
    return {"Origin": f"http://127.0.0.1:{port}"}


# --- fixtures ---------------------------------------------------------------------------------

@pytest.fixture
def a_and_b(clients):
    return clients("A"), clients("B")


# --- the relay's API --------------------------------------------------------------------------

@pytest.mark.timeout(30)
def test_status_describes_the_relay(relay, a_and_b):
    status = get_json(relay.port, "/api/status")
    assert status["version"] == __version__
    assert status["port"] == relay.port
    assert status["clients"] == 2 and status["sessions"] == 0
    assert 0 <= status["uptime"] < 60
    assert status["heartbeatTimeout"] == relay.config.heartbeat_timeout
    assert status["processThreads"] >= status["threads"] > 0
    assert status["openSockets"] >= 4  # listener, UDP socket, two control channels
    assert status["rssBytes"] > 1_000_000
    assert status["totalBytes"] == 0 and status["bytesPerSecond"] == 0
    assert status["tokenRequired"] is False
    assert status["openRelay"] is True  # the page shows its open-relay warning from this


def test_a_relay_with_tokens_is_not_reported_open():
    with Server(host="127.0.0.1", port=0, client_tokens={"B": "b-token-of-sixteen+"},
                admin_token=ADMIN_TOKEN) as server:
        status = get_json(server.port, "/api/status", {"Authorization": f"Bearer {ADMIN_TOKEN}"})
        assert status["openRelay"] is False and status["tokenRequired"] is False


@pytest.mark.timeout(40)
def test_clients_sessions_and_traffic_follow_a_live_session(relay, a_and_b, tcp_echo, user_sockets):
    a, b = a_and_b
    proxy = a.create_proxy(0, "B", tcp_echo.port, "tcp")
    user = user_sockets(proxy.local_port)
    echo_bytes(user, PAYLOAD)

    def the_session():
        sessions = get_json(relay.port, "/api/sessions")["sessions"]
        return sessions[0] if len(sessions) == 1 and sessions[0]["bytesBToA"] >= PAYLOAD else None

    session = wait_until(the_session, DEADLINE, message="one session with the payload counted both ways")
    assert (session["a"], session["b"], session["port"], session["protocol"]) == ("A", "B", tcp_echo.port, "tcp")
    assert session["bytesAToB"] >= PAYLOAD and session["state"] == "relaying"
    assert session["shortId"] == session["id"][:8]
    assert time.time() - 30 < session["startedAt"] <= time.time()

    clients = {c["id"]: c for c in get_json(relay.port, "/api/clients")["clients"]}
    assert set(clients) == {"A", "B"}
    for info in clients.values():
        assert info["remote"].startswith("127.0.0.1:")
        assert info["sessions"] == 1
        assert time.time() - 30 < info["connectedAt"] <= info["lastSeen"] <= time.time() + 1
    assert clients["A"]["bytesSent"] >= PAYLOAD and clients["A"]["bytesReceived"] >= PAYLOAD
    assert clients["B"]["bytesReceived"] >= PAYLOAD and clients["B"]["bytesSent"] >= PAYLOAD

    pump = Pump(user, "svc-admin-pump")
    try:
        wait_until(lambda: get_json(relay.port, "/api/sessions")["sessions"][0]["rateAToB"] > 0, DEADLINE,
                 message="a current rate on the session")
        wait_until(lambda: get_json(relay.port, "/api/clients")["clients"][0]["rateSent"] > 0, DEADLINE,
                 message="a current rate on the client")
        wait_until(lambda: get_json(relay.port, "/api/status")["bytesPerSecond"] > 0, DEADLINE,
                   message="throughput in status")
    finally:
        pump.stop()

    traffic = get_json(relay.port, "/api/traffic")
    assert traffic["interval"] == 1.0
    assert traffic["totalBytes"] >= 2 * PAYLOAD
    times = [sample[0] for sample in traffic["samples"]]
    assert times == sorted(times) and len(times) >= 1
    assert any(rate > 0 for _, rate in traffic["samples"])
    assert get_json(relay.port, "/api/status")["totalBytes"] == pytest.approx(traffic["totalBytes"], rel=0.5)


@pytest.mark.timeout(30)
def test_bytes_of_ended_sessions_still_count(relay, a_and_b, tcp_echo, user_sockets):
    a, _ = a_and_b
    proxy = a.create_proxy(0, "B", tcp_echo.port, "tcp")
    user = user_sockets(proxy.local_port)
    echo_bytes(user, PAYLOAD)
    user.close()
    wait_until(lambda: not get_json(relay.port, "/api/sessions")["sessions"], DEADLINE, message="the session to end")
    clients = {c["id"]: c for c in get_json(relay.port, "/api/clients")["clients"]}
    assert clients["A"]["sessions"] == 0
    assert clients["A"]["bytesSent"] >= PAYLOAD and clients["B"]["bytesReceived"] >= PAYLOAD
    assert get_json(relay.port, "/api/status")["totalBytes"] >= 2 * PAYLOAD


@pytest.mark.timeout(30)
def test_traffic_history_is_a_ring_of_one_sample_a_second(relay):
    history = relay.traffic.history
    for _ in range(history._samples.maxlen + 20):
        history.sample()
    samples = get_json(relay.port, "/api/traffic")["samples"]
    assert len(samples) == 300  # five minutes
    assert all(len(sample) == 2 and sample[1] >= 0 for sample in samples)


@pytest.mark.timeout(30)
def test_close_session_action(relay, a_and_b, tcp_echo, user_sockets):
    a, _ = a_and_b
    proxy = a.create_proxy(0, "B", tcp_echo.port, "tcp")
    user = user_sockets(proxy.local_port)
    echo_bytes(user, 1000)
    session_id = wait_until(lambda: [s["id"] for s in get_json(relay.port, "/api/sessions")["sessions"]], DEADLINE,
                          message="the session")[0]

    status, _, reply = request(relay.port, "POST", "/api/sessions/ffffffffff/close", same_origin(relay.port))
    assert status == 404 and "not an open session" in reply["error"]
    status, _, reply = request(relay.port, "POST", f"/api/sessions/{session_id}/close", same_origin(relay.port))
    assert status == 200, reply
    assert reply["message"] == f"session {session_id[:8]} closed"

    user.settimeout(DEADLINE)
    with pytest.raises(ConnectionResetError):  # closed by the relay, not finished: a reset, never an EOF
        user.recv(1)
    assert get_json(relay.port, "/api/sessions")["sessions"] == []
    status, _, _ = request(relay.port, "GET", f"/api/sessions/{session_id}/close")
    assert status == 405


@pytest.mark.timeout(30)
def test_disconnect_client_action(relay, a_and_b):
    _, b = a_and_b
    old = relay.registry.get("B")
    status, _, reply = request(relay.port, "POST", "/api/clients/nobody/disconnect", same_origin(relay.port))
    assert status == 404 and "not online" in reply["error"]
    status, _, reply = request(relay.port, "POST", "/api/clients/B/disconnect")  # a script: no Origin
    assert status == 200, reply
    assert "B disconnected" in reply["message"]
    assert old.closed
    # The client notices and registers again on its own.
    wait_until(lambda: b.control.reconnects >= 1 and b.connected, DEADLINE, message="B to reconnect")
    wait_until(lambda: relay.registry.get("B") not in (None, old), DEADLINE, message="B's new registration")


@pytest.mark.timeout(30)
def test_cross_origin_post_is_refused(relay, a_and_b):
    for origin in ("http://evil.example", f"http://127.0.0.1:{relay.port + 1}", "null"):
        status, _, reply = request(relay.port, "POST", "/api/clients/B/disconnect", {"Origin": origin})
        assert status == 403 and "cross-origin" in reply["error"], origin
    assert relay.registry.get("B") is not None and not relay.registry.get("B").closed
    status, _, reply = request(relay.port, "POST", "/api/clients/B/disconnect",
                               {"Origin": f"http://localhost:{relay.port}", "Host": f"localhost:{relay.port}"})
    assert status == 200, reply

    status, _, reply = request(relay.port, "POST", "/api/clients/B/disconnect", {"Origin": "http://[not-a-url"})
    assert status == 403 and "cross-origin" in reply["error"]  # refused, not a bug in the handler


@pytest.mark.timeout(30)
def test_both_pages_answer_with_the_same_security_headers(relay, client_app):
    """One place (common/pages.py) gives every answer of both pages its headers."""
    page_headers = []
    for port in (relay.port, client_app.admin.port):
        for path in ("/", "/static/ui.js", "/api/nothing"):
            status, response, _ = request(port, "GET", path)
            assert response.getheader("Cache-Control") == "no-store", (port, path)
            assert response.getheader("X-Content-Type-Options") == "nosniff", (port, path)
        _, response, _ = request(port, "GET", "/")
        page_headers.append([response.getheader(name) for name in
                             ("Content-Security-Policy", "X-Frame-Options", "Referrer-Policy")])
        _, _, reply = request(port, "GET", "/api/nothing")
        assert reply == {"error": "no such endpoint: /api/nothing"}, port
        _, _, reply = request(port, "PUT" if port == relay.port else "POST", "/api/status")
        assert "not allowed" in (reply if isinstance(reply, str) else reply["error"]), port
    assert page_headers[0] == page_headers[1] and None not in page_headers[0]


@pytest.mark.timeout(30)
def test_relay_answers_head_with_the_headers_only(relay):
    with socket.create_connection(("127.0.0.1", relay.port), timeout=5) as sock:
        sock.sendall(f"HEAD /healthz HTTP/1.1\r\nHost: 127.0.0.1:{relay.port}\r\n\r\n".encode())
        reply = b""
        while chunk := sock.recv(4096):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK") and b"Content-Length: 3" in head and body == b""


@pytest.mark.timeout(30)
def test_admin_page_is_off_without_an_admin_token():
    with Server(host="127.0.0.1", port=0, token=TOKEN) as server:  # a registration token is not an admin one
        for path in ("/", "/api/status"):
            for headers in ({}, {"Authorization": f"Bearer {TOKEN}"}):
                status, _, body = request(server.port, "GET", path, headers)
                text = body if isinstance(body, str) else body["error"]
                assert status == 403 and "token --admin" in text and TOKEN not in text, (path, headers)
        status, _, reply = request(server.port, "POST", "/login", {"Authorization": f"Bearer {TOKEN}"})
        assert status == 403 and "no admin token" in reply["error"]
        status, _, _ = request(server.port, "GET", "/static/ui.js")
        assert status == 200  # the page's files hold no secrets


@pytest.mark.timeout(30)
def test_page_and_static_files(relay):
    status, response, body = request(relay.port, "GET", "/")
    assert status == 200 and response.getheader("Content-Type").startswith("text/html")
    assert "/static/server.js" in body and "/static/ui.js" in body
    assert "default-src 'self'" in response.getheader("Content-Security-Policy")
    assert response.getheader("X-Frame-Options") == "DENY"
    for name, kind in (("ui.js", "text/javascript"), ("ui.css", "text/css"), ("server.js", "text/javascript"),
                       ("icon.svg", "image/svg+xml")):
        status, response, _ = request(relay.port, "GET", f"/static/{name}")
        assert status == 200 and response.getheader("Content-Type").startswith(kind), name
    for path in ("/static/../admin.py", "/static/admin.py", "/static/%2e%2e/server.py", "/nothing"):
        status, _, _ = request(relay.port, "GET", path)
        assert status == 404, path
    status, _, reply = request(relay.port, "GET", "/api/nothing")
    assert status == 404 and "no such endpoint" in reply["error"]
    status, _, _ = request(relay.port, "DELETE", "/api/status")
    assert status == 405


@pytest.mark.timeout(30)
def test_admin_token_is_required():
    with Server(host="127.0.0.1", port=0, admin_token=TOKEN) as relay:
        _check_admin_token_is_required(relay)


def _check_admin_token_is_required(relay):
    port = relay.port
    status, _, reply = request(port, "GET", "/api/status")
    assert status == 401 and "Authorization: Bearer" in reply["error"]
    status, _, _ = request(port, "GET", "/api/status", {"Authorization": "Bearer wrong-token"})
    assert status == 401
    assert get_json(port, "/api/status", {"Authorization": f"Bearer {TOKEN}"})["adminLogin"] is True

    # Not logged in: the page is the login form, which never carries the token.
    status, _, page = request(port, "GET", "/")
    assert status == 200 and "login.js" in page and TOKEN not in page

    status, response, reply = request(port, "POST", "/login", {"Authorization": "Bearer nope", **same_origin(port)})
    assert status == 401 and response.getheader("Set-Cookie") is None
    status, response, reply = request(port, "POST", "/login", {"Authorization": f"Bearer {TOKEN}", **same_origin(port)})
    assert status == 200, reply
    cookie = response.getheader("Set-Cookie")
    assert cookie.startswith(f"chuantou_admin_{port}=")
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and TOKEN not in cookie
    jar = {"Cookie": cookie.split(";", 1)[0]}

    status, _, page = request(port, "GET", "/", jar)
    assert status == 200 and "server.js" in page and TOKEN not in page
    assert get_json(port, "/api/clients", jar) == {"clients": []}
    status, _, _ = request(port, "GET", "/api/status", {"Cookie": f"chuantou_admin_{port}={'0' * 64}"})
    assert status == 401
    # Logged in is not enough for a cross-origin action.
    status, _, _ = request(port, "POST", "/api/clients/A/disconnect", {**jar, "Origin": "http://evil.example"})
    assert status == 403

    # The relay answers from anywhere and for any host name, but only with the admin token.
    outside = ("203.0.113.9", 40000)
    headers = {"host": "relay.example.com:8200"}
    status, *_ = server_admin.handle(relay, Request("GET", "/api/status", "HTTP/1.1", headers), outside)
    assert status == 401
    headers["authorization"] = f"Bearer {TOKEN}"
    status, _, body, *_ = server_admin.handle(relay, Request("GET", "/api/status", "HTTP/1.1", headers), outside)
    assert status == 200 and TOKEN not in body

    status, response, _ = request(port, "POST", "/logout", {**jar, **same_origin(port)})
    assert status == 200 and "Max-Age=0" in response.getheader("Set-Cookie")


# --- the client's API -------------------------------------------------------------------------

@pytest.mark.timeout(40)
def test_client_api_lists_connections_both_ways_and_traffic(relay, client_app, clients, tcp_echo, user_sockets):
    b = clients("B")
    assert client_app.client.wait_connected(DEADLINE)
    api = client_app.admin.port
    local_port = free_port()
    status, _, reply = request(api, "POST", "/api/proxies", same_origin(api),
                               {"localPort": local_port, "targetClient": "B", "targetPort": tcp_echo.port,
                                "protocol": "tcp"})
    assert status == 201, reply
    user = user_sockets(local_port)
    echo_bytes(user, PAYLOAD)

    def a_connection():
        found = get_json(api, "/api/connections")["connections"]
        return found if found and found[0].get("bytesReceived", 0) >= PAYLOAD else None

    (conn,) = wait_until(a_connection, DEADLINE, message="A's connection with the payload")
    assert (conn["side"], conn["peer"], conn["port"], conn["protocol"]) == ("A", "B", tcp_echo.port, "tcp")
    assert conn["localPort"] == local_port and conn["bytesSent"] >= PAYLOAD
    assert time.time() - 30 < conn["startedAt"] <= time.time()
    (on_b,) = wait_until(b.connections, DEADLINE, message="B's side of it")
    assert (on_b["side"], on_b["peer"], on_b["port"]) == ("B", "A", tcp_echo.port)
    assert on_b["bytesReceived"] >= PAYLOAD and on_b["id"] == conn["id"]

    wait_until(lambda: any(s[1] > 0 and s[2] > 0 for s in get_json(api, "/api/traffic")["samples"]), DEADLINE,
             message="traffic samples in both directions")
    traffic = get_json(api, "/api/traffic")
    assert traffic["bytesReceived"] >= PAYLOAD and traffic["bytesSent"] >= PAYLOAD

    proxies = get_json(api, "/api/proxies")["proxies"]
    assert proxies[0]["activeConnections"] == 1 and proxies[0]["bytesReceived"] >= PAYLOAD
    user.close()
    wait_until(lambda: not get_json(api, "/api/connections")["connections"], DEADLINE, message="the connection to end")
    # Ended connections keep counting in the totals.
    assert get_json(api, "/api/traffic")["bytesReceived"] >= PAYLOAD


@pytest.mark.timeout(30)
def test_client_api_port_conflict_message(client_app, clients):
    clients("B")
    api = client_app.admin.port
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        status, _, reply = request(api, "POST", "/api/proxies", same_origin(api),
                                   {"localPort": port, "targetClient": "B", "targetPort": 22})
    assert status == 409
    assert reply["error"] == f"port {port} is already in use; choose another with --local-port"
    status, _, reply = request(api, "POST", "/api/proxies", same_origin(api),
                               {"localPort": "70000", "targetClient": "B", "targetPort": 22})
    assert status == 400 and "localPort must be a port number 1-65535" in reply["error"]


@pytest.mark.timeout(30)
def test_client_refuses_cross_origin_and_foreign_host(client_app):
    api = client_app.admin.port
    body = {"localPort": free_port(), "targetClient": "B", "targetPort": 22}
    status, _, reply = request(api, "POST", "/api/proxies", {"Origin": "http://evil.example"}, body)
    assert status == 403 and "cross-origin" in reply["error"]
    status, _, reply = request(api, "DELETE", "/api/proxies/9999", {"Origin": "http://evil.example"})
    assert status == 403
    assert get_json(api, "/api/proxies") == {"proxies": []}
    for path in ("/", "/static/client.js", "/api/status"):
        status, _, reply = request(api, "GET", path, {"Host": f"evil.example:{api}"})
        assert status == 403, path
    status, response, page = request(api, "GET", "/")
    assert status == 200 and response.getheader("Content-Type").startswith("text/html")
    assert "/static/client.js" in page
    assert "default-src 'self'" in response.getheader("Content-Security-Policy")
    status, _, _ = request(api, "GET", "/static/../admin.py")
    assert status == 404
