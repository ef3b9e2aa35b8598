"""Prometheus metrics and health checks over real sockets (issue 16 items 1, 2): the relay's
/metrics and /healthz on its own port, the client's on its local API. Every scrape is parsed
with prometheus_client's own parser."""

from __future__ import annotations

import http.client
import json
import socket
import threading

import pytest
import websocket
from prometheus_client.parser import text_string_to_metric_families

from chuantou_server import metrics as relay_metrics

from admin_support import CLIENT_API_KEYS, client_app, relay  # noqa: F401 (fixtures)
from helpers import HOST, IO_TIMEOUT, connect, recv_exactly, wait_until

METRICS_TOKEN = "metrics-test-token-0123456789"
ADMIN_TOKEN = "metrics-test-admin-token-0123"
SEAL_SLACK = 16 * 1024  # the sealed stream's handshake and record overhead the relay also carries


# --- helpers ----------------------------------------------------------------------------------

def get(port: int, path: str, headers: dict | None = None) -> tuple[int, str, bytes]:
    """(status, content type, body) of GET ``path`` on 127.0.0.1:port."""
    conn = http.client.HTTPConnection(HOST, port, timeout=IO_TIMEOUT)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type", ""), response.read()
    finally:
        conn.close()


class Scrape:
    """One parsed scrape: ``value(sample name, **labels)``."""

    def __init__(self, text: str):
        self.samples = {}
        self.types = {}
        for family in text_string_to_metric_families(text):
            self.types[family.name] = family.type
            for sample in family.samples:
                self.samples[sample.name, tuple(sorted(sample.labels.items()))] = sample.value

    def value(self, name: str, **labels) -> float:
        return self.samples[name, tuple(sorted(labels.items()))]

def scrape(port: int, headers: dict | None = None) -> Scrape:
    status, content_type, body = get(port, "/metrics", headers)
    assert status == 200, body
    assert content_type.startswith("text/plain") and "version=" in content_type
    return Scrape(body.decode())


def relayed(server, direction: str, protocol: str = "tcp") -> float:
    return scrape(server.port).value("chuantou_relay_bytes_relayed_total", protocol=protocol, direction=direction)


def sessions_open(server, protocol: str = "tcp", state: str = "relaying") -> float:
    return scrape(server.port).value("chuantou_relay_sessions_open", protocol=protocol, state=state)


def refused(server, reason: str, protocol: str = "tcp") -> float:
    return scrape(server.port).value("chuantou_relay_sessions_refused_total", protocol=protocol, reason=reason)


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def refused_by_relay(sock: socket.socket) -> bool:
    """The proxy ends a user's connection whose session the relay refused."""
    try:
        return sock.recv(1) == b""
    except ConnectionError:
        return True


# --- the relay's /metrics ---------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_clients_and_sessions_follow_a_session_opening_and_closing(make_server, make_client, tcp_echo):
    server = make_server()
    other = make_server()  # a second relay in this process keeps its own figures
    a, _b = make_client(server, "A"), make_client(server, "B")
    first = scrape(server.port)
    assert first.types["chuantou_relay_sessions_opened"] == "counter"
    assert first.types["chuantou_relay_sessions_open"] == "gauge"
    assert first.value("chuantou_relay_clients_online") == 2
    assert first.value("chuantou_relay_sessions_opened_total", protocol="tcp") == 0
    assert first.value("chuantou_relay_threads") > 0
    assert first.value("process_open_fds") > 0
    assert first.value("chuantou_relay_descriptor_headroom") > 0

    proxy = a.create_proxy(0, "B", tcp_echo.port, protocol="tcp")
    with connect(proxy.local_port) as user:
        user.sendall(b"hello")
        assert recv_exactly(user, 5) == b"hello"
        wait_until(lambda: sessions_open(server) == 1, message="one TCP session relaying")
        during = scrape(server.port)
        assert during.value("chuantou_relay_sessions_opened_total", protocol="tcp") == 1
        assert during.value("chuantou_relay_sessions_open", protocol="udp", state="relaying") == 0
    wait_until(lambda: sessions_open(server) == 0, message="the session closed")
    after = scrape(server.port)
    assert after.value("chuantou_relay_sessions_opened_total", protocol="tcp") == 1
    # sessions are sealed: the relay counts ciphertext, the 5 bytes plus the TLS handshake and records
    assert 5 < after.value("chuantou_relay_bytes_relayed_total", protocol="tcp", direction="a_to_b") < SEAL_SLACK

    untouched = scrape(other.port)
    assert untouched.value("chuantou_relay_clients_online") == 0
    assert untouched.value("chuantou_relay_sessions_opened_total", protocol="tcp") == 0
    proxy.close()


@pytest.mark.timeout(60)
def test_bytes_advance_while_a_long_transfer_runs_and_match_the_admin_api(make_server, make_client, tcp_echo):
    server = make_server(admin_token=ADMIN_TOKEN)
    a, _b = make_client(server, "A"), make_client(server, "B")
    proxy = a.create_proxy(0, "B", tcp_echo.port, protocol="tcp")
    chunk = 256 * 1024
    with connect(proxy.local_port) as user:
        seen = []
        for _ in range(3):  # the session stays open throughout: nothing here has ended
            user.sendall(b"x" * chunk)
            recv_exactly(user, chunk)
            wait_until(lambda: relayed(server, "b_to_a") >= chunk * (len(seen) + 1) + 16 * (len(seen) + 1),
                       message="the echo's bytes counted while the session runs")
            seen.append((relayed(server, "a_to_b"), relayed(server, "b_to_a")))
            assert sessions_open(server) == 1
        assert seen[0] < seen[1] < seen[2]
        assert all(3 * chunk < n < 3 * chunk + SEAL_SLACK for n in seen[2])  # ciphertext: a little more
        status, _, body = get(server.port, "/api/sessions", bearer(ADMIN_TOKEN))
        (session,) = json.loads(body)["sessions"]
        assert (session["bytesAToB"], session["bytesBToA"]) == seen[2]
    wait_until(lambda: sessions_open(server) == 0)
    ended = (relayed(server, "a_to_b"), relayed(server, "b_to_a"))  # ended: still counted (plus the closing records)
    assert all(seen[2][i] <= ended[i] < 3 * chunk + SEAL_SLACK for i in (0, 1)), (seen[2], ended)
    proxy.close()


@pytest.mark.timeout(60)
def test_refused_sessions_are_counted_by_reason(make_server, make_client, tcp_echo):
    server = make_server(max_sessions_per_client=1)
    a, _b = make_client(server, "A"), make_client(server, "B")
    to_nobody = a.create_proxy(0, "nobody", tcp_echo.port, protocol="tcp")
    with connect(to_nobody.local_port) as user:
        wait_until(lambda: refused_by_relay(user), message="the proxy ends the refused connection")
    wait_until(lambda: refused(server, relay_metrics.TARGET_OFFLINE) == 1, message="a refusal: target offline")

    proxy = a.create_proxy(0, "B", tcp_echo.port, protocol="tcp")
    with connect(proxy.local_port) as first:
        first.sendall(b"1")
        assert recv_exactly(first, 1) == b"1"
        with connect(proxy.local_port) as second:  # over maxSessionsPerClient
            wait_until(lambda: refused_by_relay(second), message="the second connection is refused")
        wait_until(lambda: refused(server, "per_client") == 1, message="a refusal: per-client cap")
    final = scrape(server.port)
    assert final.value("chuantou_relay_sessions_opened_total", protocol="tcp") == 1
    assert final.value("chuantou_relay_sessions_refused_total", protocol="tcp", reason="total") == 0
    to_nobody.close()
    proxy.close()


def test_udp_datagrams_from_strangers_are_counted_as_dropped(server):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as stranger:
        stranger.sendto(b"not from any session", (HOST, server.port))

        def drops():
            return scrape(server.port).value("chuantou_relay_udp_datagrams_dropped_total", reason="unknown_sender")

        wait_until(lambda: drops() == 1, message="the stranger's datagram dropped")
    assert scrape(server.port).value("chuantou_relay_udp_datagrams_dropped_total", reason="send_failed") == 0


@pytest.mark.timeout(30)
def test_a_control_channel_that_never_registers_is_counted(make_server):
    server = make_server(handshake_timeout=0.3)
    ws = websocket.create_connection(f"ws://{HOST}:{server.port}/ws", timeout=IO_TIMEOUT)
    try:
        wait_until(lambda: scrape(server.port).value("chuantou_relay_handshakes_in_progress",
                                                     stage="registration") == 1)
        wait_until(lambda: scrape(server.port).value("chuantou_relay_registration_timeouts_total") == 1,
                   message="closed for not registering")
        wait_until(lambda: scrape(server.port).value("chuantou_relay_handshakes_in_progress",
                                                     stage="registration") == 0)
    finally:
        ws.shutdown()


@pytest.mark.timeout(30)
def test_a_silent_client_is_counted_as_a_heartbeat_timeout(make_server, make_client):
    server = make_server(heartbeat_timeout=0.5)
    make_client(server, "quiet", heartbeat_interval=30.0)  # sends nothing after registering
    wait_until(lambda: scrape(server.port).value("chuantou_relay_heartbeat_timeouts_total") >= 1, timeout=10,
               message="the silent client dropped")


# --- who may scrape ---------------------------------------------------------------------------

def test_loopback_may_scrape_without_a_credential_by_default(server):
    assert get(server.port, "/metrics")[0] == 200


def test_without_the_loopback_rule_a_scrape_needs_the_metrics_or_the_admin_token(make_server):
    server = make_server(metrics_loopback_open=False, metrics_token=METRICS_TOKEN, admin_token=ADMIN_TOKEN)
    status, _, body = get(server.port, "/metrics")
    assert status == 401 and b"chuantou_relay" not in body
    assert get(server.port, "/metrics", bearer("wrong-token-of-some-length"))[0] == 401
    assert get(server.port, "/metrics", bearer(METRICS_TOKEN))[0] == 200
    assert get(server.port, "/metrics", bearer(ADMIN_TOKEN))[0] == 200
    # the metrics token opens nothing else
    assert get(server.port, "/api/status", bearer(METRICS_TOKEN))[0] == 401


def test_a_relay_without_an_admin_token_still_serves_metrics_to_its_token(make_server):
    server = make_server(metrics_loopback_open=False, metrics_token=METRICS_TOKEN)
    assert get(server.port, "/metrics")[0] == 401
    assert get(server.port, "/metrics", bearer(METRICS_TOKEN))[0] == 200


def test_the_metrics_token_may_not_be_a_client_token():
    from chuantou_server.settings import ServerConfig
    from common.errors import ChuantouError
    with pytest.raises(ChuantouError, match="metrics token"):
        ServerConfig(token=METRICS_TOKEN, metrics_token=METRICS_TOKEN)


def test_loopback_is_recognised_also_as_an_ipv4_mapped_address():
    assert relay_metrics.is_loopback("127.0.0.1") and relay_metrics.is_loopback("::1")
    assert relay_metrics.is_loopback("::ffff:127.0.0.1")
    assert not relay_metrics.is_loopback("192.0.2.1") and not relay_metrics.is_loopback("::ffff:192.0.2.1")


# --- the relay's /healthz ---------------------------------------------------------------------

def test_healthz_answers_200_with_no_detail_and_no_credential(make_server):
    server = make_server(metrics_loopback_open=False, admin_token=ADMIN_TOKEN)
    status, content_type, body = get(server.port, "/healthz")
    assert (status, body) == (200, b"ok\n")
    assert content_type.startswith("text/plain")


def test_healthz_answers_503_when_the_relay_is_out_of_descriptors(make_server):
    server = make_server(descriptor_reserve=1 << 30)  # no descriptor is free above this reserve
    assert get(server.port, "/healthz")[:3:2] == (503, b"unavailable\n")


@pytest.mark.timeout(30)
def test_healthz_answers_503_while_the_relay_stops(make_server):
    server = make_server()
    arrived, go = threading.Event(), threading.Event()
    serve_http = server.serve_http

    def held_serve_http(sock, addr, request):  # a request that reaches the relay as it begins to stop
        arrived.set()
        go.wait(IO_TIMEOUT)
        serve_http(sock, addr, request)

    server.serve_http = held_serve_http
    answers = []
    asker = threading.Thread(target=lambda: answers.append(get(server.port, "/healthz")), name="svc-healthz")
    asker.start()
    assert arrived.wait(IO_TIMEOUT)
    stopper = threading.Thread(target=server.stop, name="svc-stop")
    stopper.start()
    wait_until(server.stopping.is_set)
    go.set()
    asker.join(IO_TIMEOUT)
    stopper.join(IO_TIMEOUT)
    assert [(status, body) for status, _, body in answers] == [(503, b"unavailable\n")]


# --- the client's local API -------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_client_api_metrics_behind_its_secret_and_healthz_follows_registration(relay, client_app):  # noqa: F811
    port = client_app.admin.port
    key = {"X-Chuantou-Key": CLIENT_API_KEYS[port]}
    assert get(port, "/metrics")[0] == 401
    wait_until(lambda: scrape(port, key).value("chuantou_client_connected") == 1, message="registered")
    figures = scrape(port, key)
    assert figures.value("chuantou_client_proxies", protocol="tcp") == 0
    assert figures.value("chuantou_client_bytes_total", direction="sent") == 0
    assert figures.value("chuantou_client_sessions_open", side="A", protocol="tcp") == 0
    assert get(port, "/healthz")[:3:2] == (200, b"ok\n")

    relay.stop()
    wait_until(lambda: get(port, "/healthz")[0] == 503, timeout=15, message="unhealthy once the relay is gone")
    assert get(port, "/healthz")[2] == b"unavailable\n"
    assert scrape(port, key).value("chuantou_client_connected") == 0


def test_a_metrics_token_given_on_the_command_line_is_saved_and_used(tmp_path):
    from chuantou_server.app import ServerApp, make_server
    from chuantou_server.cli import build_parser, make_app

    (tmp_path / "server.json").write_text("{}")
    args = build_parser().parse_args(["--config", str(tmp_path / "server.json"), "--metrics-token", METRICS_TOKEN])
    app = make_app(args)
    app.ensure_token()  # what start does before the relay runs: a given token goes to the file
    saved = json.loads((tmp_path / "server.json").read_text())
    assert saved["metricsToken"] == METRICS_TOKEN
    later = ServerApp(tmp_path / "server.json", {})  # a background worker reads it from the file
    assert make_server(later.settings).config.metrics_token == METRICS_TOKEN
    assert make_server(later.settings).config.metrics_loopback_open is True


@pytest.mark.timeout(60)
def test_client_api_metrics_follow_its_proxies_sessions_and_bytes(relay, client_app, make_client,  # noqa: F811
                                                                   tcp_echo):
    port = client_app.admin.port
    key = {"X-Chuantou-Key": CLIENT_API_KEYS[port]}
    make_client(relay, "B")
    assert client_app.client.wait_connected(IO_TIMEOUT)
    proxy = client_app.client.create_proxy(0, "B", tcp_echo.port, protocol="tcp")
    assert scrape(port, key).value("chuantou_client_proxies", protocol="tcp") == 1

    def figures():
        scraped = scrape(port, key)
        return (scraped.value("chuantou_client_sessions_open", side="A", protocol="tcp"),
                scraped.value("chuantou_client_bytes_total", direction="sent"),
                scraped.value("chuantou_client_bytes_total", direction="received"))

    with connect(proxy.local_port) as user:
        for sent in (100_000, 200_000):  # counted while the session runs
            user.sendall(b"y" * 100_000)
            recv_exactly(user, 100_000)
            wait_until(lambda: figures() == (1, sent, sent), message=f"{sent} bytes each way, session open")
    wait_until(lambda: figures() == (0, 200_000, 200_000), message="the session ended, its bytes kept")
    proxy.close()
    wait_until(lambda: scrape(port, key).value("chuantou_client_proxies", protocol="tcp") == 0)
    assert figures()[1:] == (200_000, 200_000)


def test_wrong_metrics_tokens_are_limited_like_failed_admin_logins(make_server):
    server = make_server(metrics_loopback_open=False, metrics_token=METRICS_TOKEN, admin_login_failures_per_minute=2)
    assert [get(server.port, "/metrics", bearer("wrong-token-of-some-length"))[0] for _ in range(3)] == [401, 401, 429]
    assert get(server.port, "/metrics", bearer(METRICS_TOKEN))[0] == 429  # not even tried while limited
