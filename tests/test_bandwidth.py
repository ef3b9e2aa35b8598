"""Bandwidth limits (issue 16 item 3): per proxy on A and per client on the relay, both as
backpressure on TCP (the achieved rate, measured here, is the limit within 15%) and as counted
drops on UDP; a session without a limit is not slowed by one that has one. Also the pieces
(the unit parser, RateLimit), the API field and saved config, and check-config (item 5)."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest

from admin_support import CLIENT_API_KEYS
from admin_support import client_app, clients, relay  # noqa: F401 (fixtures)
from chuantou_client.app import ClientApp
from cli_support import cli  # noqa: F401 (a fixture)
from common.bandwidth import format_bandwidth, parse_bandwidth
from common.errors import ChuantouError
from common.limits import RateLimit
from common.pipe import Pipe
from common.threads import ThreadGroup
from helpers import HOST, TcpService, connect, free_port, http_json, relay_url, udp_roundtrip, wait_until

MiB = 1024 * 1024
LIMIT = 2 * MiB
WARMUP = 0.5  # seconds skipped before measuring: the bucket's initial burst and TCP's slow start
WINDOW = 3.0  # seconds measured
CHUNK = bytes(64 * 1024)


def measure_rate(sock: socket.socket, warmup: float = WARMUP, window: float = WINDOW) -> float:
    """Bytes per second read from ``sock`` over ``window`` seconds, starting ``warmup`` seconds
    after its first byte."""
    buf = bytearray(256 * 1024)
    sock.settimeout(10.0)
    n = sock.recv_into(buf)
    assert n, "the stream ended before its first byte"
    start = time.monotonic() + warmup
    end = start + window
    counted = 0
    while True:
        n = sock.recv_into(buf)
        assert n, "the stream ended while being measured"
        now = time.monotonic()
        if now >= end:
            return counted / (now - start)
        if now >= start:
            counted += n


def send_forever(conn: socket.socket, service: TcpService) -> None:
    """A service that sends until its peer goes away (or the service stops)."""
    while True:
        conn.sendall(CHUNK)


def measure_upload(conn: socket.socket, service: TcpService) -> None:
    """A service that reports the rate it receives at."""
    service.results.append(measure_rate(conn))


def upload_until_closed(port: int, stop: threading.Event) -> threading.Thread:
    """A user that uploads to the proxy on ``port`` until ``stop``."""
    def run():
        with connect(port) as user:
            while not stop.is_set():
                try:
                    user.sendall(CHUNK)
                except OSError:
                    return

    thread = threading.Thread(target=run, name="svc-uploader", daemon=True)
    thread.start()
    return thread


def download_rate(port: int, rates: dict, key: str) -> threading.Thread:
    def run():
        with connect(port) as user:
            rates[key] = measure_rate(user)

    thread = threading.Thread(target=run, name=f"svc-download-{key}", daemon=True)
    thread.start()
    return thread


def assert_near(rate: float, limit: float) -> None:
    assert 0.85 * limit <= rate <= 1.15 * limit, \
        f"achieved {rate / MiB:.2f} MiB/s under a {limit / MiB:.2f} MiB/s limit"


# --- the pieces --------------------------------------------------------------------------------

@pytest.mark.parametrize("text, rate", [("10MiB/s", 10 * MiB), ("512 KiB", 512 * 1024), ("2000000", 2_000_000),
                                        (2_000_000, 2_000_000), ("1GiB/s", 1024 * MiB), ("100B/s", 100), (0, 0)])
def test_bandwidth_text_parses_to_bytes_per_second(text, rate):
    assert parse_bandwidth(text) == rate


@pytest.mark.parametrize("text", ["10Mb/s", "10MB/s", "10 mbit", "fast", -1, True, 1.5, "1e3"])
def test_bits_decimal_units_and_nonsense_are_refused(text):
    with pytest.raises(ChuantouError, match="bandwidth"):
        parse_bandwidth(text)


def test_bandwidth_is_shown_in_binary_units():
    assert format_bandwidth(10 * MiB) == "10MiB/s"
    assert parse_bandwidth(format_bandwidth(1536 * 1024)) == 1536 * 1024
    assert format_bandwidth(0) == "unlimited"


def test_rate_limit_paces_takers_sharing_it():
    limit = RateLimit(1 * MiB, burst=64 * 1024)
    start = time.monotonic()
    threads = [threading.Thread(target=lambda: [limit.take(64 * 1024) for _ in range(4)], name=f"svc-take-{i}")
               for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # 512 KiB through a 1 MiB/s limit, 64 KiB of it free (the burst): 0.4375 s at least
    assert time.monotonic() - start >= 0.42


def test_try_take_spends_nothing_when_it_refuses():
    limit = RateLimit(1000, burst=1000)
    assert limit.try_take(1000)
    assert not limit.try_take(500)
    assert limit.available(0)


def test_an_abort_wakes_a_pump_waiting_for_its_bucket():
    user, a = socket.socketpair()
    b, service = socket.socketpair()
    group = ThreadGroup("chuantou-test-pipe")
    done = threading.Event()
    slow = RateLimit(1024, burst=4096)  # reads of 4 KiB, each but the first waiting 4 s
    pipe = Pipe(a, b, on_done=lambda _: done.set(), limits=(slow, None))
    group.spawn("run", pipe.run, group, "pump")
    try:
        user.sendall(bytes(64 * 1024))
        wait_until(lambda: pipe.sent[0] > 0)  # the first burst passed; the next read waits
        service.sendall(b"the other way is not limited")
        assert user.recv(100) == b"the other way is not limited"
        started = time.monotonic()
        pipe.abort()
        assert done.wait(5)
        assert time.monotonic() - started < 2.0
        assert pipe.sent[0] < 64 * 1024 and pipe.aborted
    finally:
        pipe.abort()
        user.close()
        service.close()
        assert group.join_all(timeout=5) == []


# --- on A: a proxy's limit ---------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_a_proxy_limit_holds_its_rate_and_an_unlimited_proxy_is_not_slowed(server, client_a, client_b, services):
    source = services(TcpService(send_forever, "source"))
    limited = client_a.create_proxy(0, "B", source.port, protocol="tcp", bandwidth="2MiB/s")
    unlimited = client_a.create_proxy(0, "B", source.port, protocol="tcp")
    assert limited.info()["bandwidth"] == LIMIT and unlimited.info()["bandwidth"] == 0
    rates: dict[str, float] = {}
    threads = [download_rate(limited.local_port, rates, "limited"), download_rate(unlimited.local_port, rates, "free")]
    for thread in threads:
        thread.join(30)
    assert_near(rates["limited"], LIMIT)
    assert rates["free"] >= 3 * LIMIT, f"the unlimited proxy ran at {rates['free'] / MiB:.2f} MiB/s"


@pytest.mark.timeout(60)
def test_a_proxy_limit_holds_uploads_too(server, client_a, client_b, services):
    sink = services(TcpService(measure_upload, "sink"))
    proxy = client_a.create_proxy(0, "B", sink.port, protocol="tcp", bandwidth=LIMIT)
    stop = threading.Event()
    uploader = upload_until_closed(proxy.local_port, stop)
    try:
        (rate,) = wait_until(lambda: sink.results, timeout=20)
    finally:
        stop.set()
        uploader.join(10)
    assert_near(rate, LIMIT)


def udp_user() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((HOST, 0))
    return sock


def blast(sock: socket.socket, port: int, count: int = 400, size: int = 1024) -> None:
    for _ in range(count):
        sock.sendto(bytes(size), (HOST, port))


def test_udp_over_a_proxy_limit_is_dropped_and_counted(server, client_a, client_b, udp_echo):
    proxy = client_a.create_proxy(0, "B", udp_echo.port, protocol="udp", bandwidth="64KiB/s")
    with udp_user() as user:
        assert udp_roundtrip(user, proxy.local_port, b"first") == b"first"
        blast(user, proxy.local_port)  # 400 KiB at once: far over a 64 KiB burst
        wait_until(lambda: proxy.bandwidth_drops > 100, message="datagrams over the limit dropped")
    assert proxy.info()["bandwidthDrops"] == proxy.bandwidth_drops


# --- on the relay: per client, whatever the client says --------------------------------------

@pytest.mark.timeout(60)
def test_the_relay_holds_each_client_to_its_rate(make_server, make_client, services):
    server = make_server(bandwidth_per_client=LIMIT)
    a, c = make_client(server, "A"), make_client(server, "C")
    make_client(server, "B")
    make_client(server, "D")
    source = services(TcpService(send_forever, "source"))
    first = a.create_proxy(0, "B", source.port, protocol="tcp")  # the client asks for no limit
    second = c.create_proxy(0, "D", source.port, protocol="tcp")
    rates: dict[str, float] = {}
    threads = [download_rate(first.local_port, rates, "A"), download_rate(second.local_port, rates, "C")]
    for thread in threads:
        thread.join(30)
    # the relay relays ciphertext (about 1% more than the bytes measured here)
    assert_near(rates["A"], LIMIT)
    assert_near(rates["C"], LIMIT)  # its own bucket: A's traffic does not slow C


@pytest.mark.timeout(60)
def test_one_clients_sessions_share_its_relay_bucket(make_server, make_client, services):
    server = make_server(bandwidth_per_client=LIMIT)
    a = make_client(server, "A")
    make_client(server, "B")
    sink = services(TcpService(measure_upload, "sink"))
    proxy = a.create_proxy(0, "B", sink.port, protocol="tcp")
    stop = threading.Event()
    uploaders = [upload_until_closed(proxy.local_port, stop) for _ in range(2)]
    try:
        rates = wait_until(lambda: len(sink.results) == 2 and sink.results, timeout=20)
    finally:
        stop.set()
        for uploader in uploaders:
            uploader.join(10)
    assert_near(sum(rates), LIMIT)


@pytest.mark.timeout(60)
def test_the_relay_total_is_shared_by_every_client(make_server, make_client, services):
    server = make_server(bandwidth_total=LIMIT)
    a, c = make_client(server, "A"), make_client(server, "C")
    make_client(server, "B")
    source = services(TcpService(send_forever, "source"))
    first = a.create_proxy(0, "B", source.port, protocol="tcp")
    second = c.create_proxy(0, "B", source.port, protocol="tcp")
    rates: dict[str, float] = {}
    threads = [download_rate(first.local_port, rates, "A"), download_rate(second.local_port, rates, "C")]
    for thread in threads:
        thread.join(30)
    assert_near(rates["A"] + rates["C"], LIMIT)


def test_udp_over_a_relay_limit_is_dropped_and_counted(make_server, make_client, udp_echo):
    server = make_server(bandwidth_per_client=64 * 1024)
    a = make_client(server, "A", path="relay")  # on one host the flow would go direct, past the relay's limit
    make_client(server, "B")
    proxy = a.create_proxy(0, "B", udp_echo.port, protocol="udp")
    with udp_user() as user:
        assert udp_roundtrip(user, proxy.local_port, b"first") == b"first"
        blast(user, proxy.local_port)
        wait_until(lambda: server.udp.drops["bandwidth_limited"] > 100, message="datagrams over the limit dropped")


# --- the API field and the saved config --------------------------------------------------------

@pytest.mark.timeout(30)
def test_the_api_takes_saves_and_shows_a_bandwidth(client_app, clients, relay, tmp_path):
    clients("B")
    api = client_app.admin.port
    headers = {"Origin": f"http://127.0.0.1:{api}", "X-Chuantou-Key": CLIENT_API_KEYS[api]}
    port = free_port()
    status, _, reply = http_json(api, "POST", "/api/proxies", headers,
                                 {"localPort": port, "targetClient": "B", "targetPort": 22, "bandwidth": "10MiB/s"})
    assert status == 201, reply
    assert reply["proxy"]["bandwidth"] == 10 * MiB
    saved = json.loads((tmp_path / "client.json").read_text())["proxies"]
    assert saved == [{"localPort": port, "targetClient": "B", "targetPort": 22, "protocol": "both",
                      "bandwidth": 10 * MiB}]
    status, _, reply = http_json(api, "POST", "/api/proxies", headers,
                                 {"localPort": free_port(), "targetClient": "B", "targetPort": 22,
                                  "bandwidth": "10Mb/s"})
    assert status == 400 and "bandwidth '10Mb/s'" in reply["error"]
    # restored with its limit by the next start
    client_app.stop()
    again = ClientApp(tmp_path / "client.json", {"server": relay_url(relay), "clientId": "A2", "adminPort": 0},
                      api_secret_path=tmp_path / "again.secret").start()
    try:
        assert [p["bandwidth"] for p in again.proxies()] == [10 * MiB]
    finally:
        again.stop()


# --- check-config ------------------------------------------------------------------------------

def test_server_check_config_accepts_a_good_file(cli, tmp_path):
    path = tmp_path / "server.json"
    path.write_text(json.dumps({"port": 8300, "bandwidthPerClient": "2MiB/s", "bandwidthTotal": 100 * MiB}))
    done = cli.server("check-config", "--config", path)
    assert (done.returncode, done.stdout.strip()) == (0, f"config OK: {path}"), done.stderr


def test_server_check_config_names_each_problem(cli, tmp_path):
    path = tmp_path / "server.json"
    path.write_text(json.dumps({"port": 99999, "bogus": 1, "bandwidthPerClient": "10Mb/s", "token": "short"}))
    done = cli.server("check-config", "--config", path)
    assert done.returncode == 1 and done.stdout == ""
    problems = [line for line in done.stderr.splitlines() if line.startswith("problem: ")]
    assert len(problems) == 4, done.stderr
    for what in ("unknown key 'bogus'", "key 'port'", "key 'bandwidthPerClient'", "key 'token'"):
        assert any(what in line for line in problems), (what, done.stderr)
    assert "short" not in done.stderr  # a secret is never shown, not even a bad one


@pytest.mark.parametrize("text, problem", [
    ("{bad", "not valid JSON"),
    (json.dumps({"tlsCert": "/nonexistent.pem", "tlsKey": "/nonexistent.key"}), "cannot load TLS certificate"),
    (json.dumps({"tlsOnly": True}), "tlsOnly needs tlsCert"),
])
def test_server_check_config_catches_what_a_start_would(cli, tmp_path, text, problem):
    path = tmp_path / "server.json"
    path.write_text(text)
    done = cli.server("check-config", "--config", path)
    assert done.returncode == 1 and problem in done.stderr, done.stderr


def test_check_config_of_a_missing_file(cli, tmp_path):
    done = cli.server("check-config", "--config", tmp_path / "none.json")
    assert done.returncode == 1 and "does not exist" in done.stderr
    done = cli.client("check-config")  # the default file, not made yet: the defaults are fine
    assert done.returncode == 0 and done.stdout.startswith("config OK: "), done.stderr
    assert not (cli.config_dir / "client.json").exists()  # checking writes nothing


def test_client_check_config_accepts_a_good_file_and_names_each_problem(cli, tmp_path):
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"proxies": [{"localPort": 9000, "targetClient": "B", "targetPort": 80,
                                             "bandwidth": "1MiB/s"}]}))
    done = cli.client("check-config", "--config", good)
    assert (done.returncode, done.stdout.strip()) == (0, f"config OK: {good}"), done.stderr
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"server": "http://x", "token": "short", "proxies": [
        {"localPort": 9000, "targetClient": "B", "targetPort": 80, "bandwidth": "fast"},
        {"localPort": 9000, "targetClient": "B", "targetPort": 81},
        {"targetClient": "B"},
    ]}))
    done = cli.client("check-config", "--config", bad)
    assert done.returncode == 1
    problems = [line for line in done.stderr.splitlines() if line.startswith("problem: ")]
    for what in ("key 'server'", "proxies[0]: key 'bandwidth'", "proxies[1]: local port 9000 is also",
                 "proxies[2]: missing key 'localPort'", "proxies[2]: missing key 'targetPort'", "token saved in"):
        assert any(what in line for line in problems), (what, done.stderr)
    assert len(problems) == 6
