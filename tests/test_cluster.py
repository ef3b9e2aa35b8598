"""A relay cluster on Redis: three nodes in this process share a real redis-server on loopback.

A client on one node reaches a client on another; the session is pumped on the target's node;
one ID is online once in the cluster; without Redis local sessions go on and cross-node ones
fail with a clear error, until Redis is back; a client with several relay URLs starts on the
first that answers.
"""

from __future__ import annotations

import hashlib
import shutil
import socket
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from chuantou_client import Client

from chuantou_server import cluster_keys as keys
from helpers import (
    TcpService,
    connect,
    exchange,
    exchange_handler,
    free_port,
    random_bytes,
    recv_exactly,
    recv_until_eof,
    relay_url,
    sha256,
    wait_until,
)

redis = pytest.importorskip("redis", reason="the cluster extra is not installed (pip install chuantou[cluster])")
REDIS_SERVER = shutil.which("redis-server")
pytestmark = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed (apt-get install "
                                                             "redis-server)")
MiB = 1024 * 1024
TTL = 3.0


class RedisProcess:
    """A redis-server on 127.0.0.1 with no persistence, in a temporary directory; restartable.
    ``options``: more redis-server options (test_cluster_slots.py starts cluster-mode ones)."""

    def __init__(self, tmp_path, *options: str):
        self.dir = tmp_path
        self.port = free_port()
        self.options = options
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisProcess":
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
             "--save", "", "--appendonly", "no", *self.options],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        probe = redis.Redis(port=self.port, socket_connect_timeout=0.5, socket_timeout=0.5)

        def answers() -> bool:
            try:
                return probe.ping()
            except redis.RedisError:
                assert self.proc.poll() is None, "redis-server exited"
                return False
        try:
            wait_until(answers, timeout=10, message="redis-server answers PING")
        finally:
            probe.close()
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def client(self):
        return redis.Redis(port=self.port, socket_connect_timeout=1, socket_timeout=2, decode_responses=True)


@pytest.fixture
def redis_server(tmp_path):
    server = RedisProcess(tmp_path).start()
    yield server
    server.stop()


@pytest.fixture
def nodes(redis_server, make_server):
    """Three started relay nodes n1, n2, n3 sharing redis_server."""
    return {name: make_server(cluster_url=redis_server.url, node_id=name, cluster_ttl=TTL)
            for name in ("n1", "n2", "n3")}


def on_node(store, client_id: str) -> str | None:
    """Which node the cluster registry says ``client_id`` is on."""
    import json
    raw = store.get(keys.client_key(client_id))
    return json.loads(raw)["node"] if raw else None


@pytest.fixture
def a_on_n1_b_on_n3(nodes, make_client, redis_server):
    a = make_client(nodes["n1"], "A")
    b = make_client(nodes["n3"], "B")
    store = redis_server.client()
    wait_until(lambda: on_node(store, "A") == "n1" and on_node(store, "B") == "n3")
    store.close()
    return a, b


# --- the node table and the registry -------------------------------------------------------------

def test_nodes_and_clients_are_in_redis_with_ttls(nodes, a_on_n1_b_on_n3, redis_server):
    store = redis_server.client()
    try:
        for name, server in nodes.items():
            import json
            record = json.loads(store.get(keys.node_key(name)))
            assert record["advertise"] == f"ws://127.0.0.1:{server.port}"
            assert 0 < store.pttl(keys.node_key(name)) <= TTL * 1000
        assert 0 < store.pttl(keys.client_key("A")) <= TTL * 1000
        wait_until(lambda: "clients" in store.get(keys.node_key("n1")) and
                   json.loads(store.get(keys.node_key("n1")))["clients"] == 1)
    finally:
        store.close()


def test_a_stopped_node_takes_its_keys_out(nodes, make_client, redis_server):
    make_client(nodes["n2"], "C")
    store = redis_server.client()
    try:
        wait_until(lambda: on_node(store, "C") == "n2")
        nodes["n2"].stop()
        assert store.get(keys.node_key("n2")) is None
        assert store.get(keys.client_key("C")) is None
    finally:
        store.close()


# --- cross-node sessions --------------------------------------------------------------------------

@pytest.mark.timeout(120)
def test_64_mib_each_way_from_n1_to_n3_pumped_on_n3(nodes, a_on_n1_b_on_n3, services):
    a, _b = a_on_n1_b_on_n3
    upload, download = random_bytes(64 * MiB), random_bytes(64 * MiB)
    service = services(TcpService(exchange_handler(download), "exchange"))
    proxy = a.create_proxy(0, "B", service.port, protocol="tcp")
    with connect(proxy.local_port, timeout=60) as user:
        seen_on = []
        watcher = threading.Thread(
            target=lambda: seen_on.append(wait_until(lambda: [n for n, s in nodes.items() if len(s.sessions)],
                                                     timeout=30)),
            name="svc-watch", daemon=True)
        watcher.start()
        received = exchange(user, upload)
        watcher.join(30)
    assert received == (sha256(download), len(download)), "the download differs"
    wait_until(lambda: service.results)
    assert service.results == [{"received": (sha256(upload), len(upload))}], "the upload differs"
    assert seen_on == [["n3"]], "the session is pumped on B's node, and only there"
    wait_until(lambda: all(len(s.sessions) == 0 for s in nodes.values()))
    proxy.close()


@pytest.mark.timeout(90)
def test_50_concurrent_cross_node_connections(nodes, a_on_n1_b_on_n3, tcp_echo):
    a, _b = a_on_n1_b_on_n3
    proxy = a.create_proxy(0, "B", tcp_echo.port, protocol="tcp")
    count = 50
    all_open = threading.Barrier(count, timeout=30)

    def user(i: int) -> bool:
        payload = hashlib.sha256(str(i).encode()).digest() * 2048  # 64 KiB, different per connection
        with connect(proxy.local_port, timeout=30) as sock:
            sock.sendall(b"hello %03d" % i)
            assert recv_exactly(sock, 9) == b"hello %03d" % i
            all_open.wait()
            sock.sendall(payload)
            assert recv_exactly(sock, len(payload)) == payload
            sock.shutdown(socket.SHUT_WR)
            assert recv_until_eof(sock) == b""
        return True

    with ThreadPoolExecutor(max_workers=count, thread_name_prefix="svc-user") as pool:
        assert list(pool.map(user, range(count), timeout=60)) == [True] * count
    wait_until(lambda: all(len(s.sessions) == 0 for s in nodes.values()))
    proxy.close()


def test_a_refused_cross_node_session_reaches_a_with_the_data_nodes_reason(nodes, make_client, redis_server):
    a = make_client(nodes["n1"], "A")
    make_client(nodes["n2"], "B", allow="none")
    store = redis_server.client()
    wait_until(lambda: on_node(store, "B") == "n2")
    store.close()
    proxy = a.create_proxy(0, "B", 9, protocol="tcp")
    with connect(proxy.local_port) as user:
        assert recv_until_eof_or_reset(user) == b""
    wait_until(lambda: all(len(s.sessions) == 0 for s in nodes.values()))
    proxy.close()


def recv_until_eof_or_reset(sock) -> bytes:
    try:
        return recv_until_eof(sock)
    except ConnectionResetError:
        return b""


# --- identity, cluster-wide -----------------------------------------------------------------------

# (takeover by the same token and in_use without it: test_cluster_identity.py)

def test_the_same_id_with_another_token_on_another_node_is_taken(redis_server, make_server, make_client):
    from common.errors import ChuantouError
    n1 = make_server(cluster_url=redis_server.url, node_id="n1", token="t" * 32, cluster_ttl=TTL)
    n2 = make_server(cluster_url=redis_server.url, node_id="n2", token="u" * 32, cluster_ttl=TTL)
    make_client(n1, "Y", token="t" * 32)
    store = redis_server.client()
    wait_until(lambda: on_node(store, "Y") == "n1")
    store.close()
    second = Client(relay_url(n2), "Y", token="u" * 32)
    try:
        with pytest.raises(ChuantouError, match="different credential"):
            second.start()
    finally:
        second.stop()


# --- Redis down -----------------------------------------------------------------------------------

@pytest.mark.timeout(90)
def test_without_redis_local_sessions_work_cross_node_fail_clearly_then_recover(nodes, make_client, redis_server,
                                                                                tcp_echo):
    from common.errors import RequestError
    a = make_client(nodes["n1"], "A")
    local_b = make_client(nodes["n1"], "LB")
    remote_b = make_client(nodes["n3"], "B")
    store = redis_server.client()
    wait_until(lambda: on_node(store, "B") == "n3" and on_node(store, "LB") == "n1")
    store.close()
    local = a.create_proxy(0, "LB", tcp_echo.port, protocol="tcp")

    redis_server.stop()
    with connect(local.local_port) as user:
        user.sendall(b"still here")
        assert recv_exactly(user, 10) == b"still here"
    with pytest.raises(RequestError, match="cluster store unreachable"):
        a.control.request(connect_request("B", tcp_echo.port), timeout=10)

    redis_server.start()  # empty: the nodes write their keys again by themselves
    def crosses() -> bool:
        try:
            a.control.request(connect_request("B", tcp_echo.port), timeout=10)
            return True
        except RequestError:
            return False
    wait_until(crosses, timeout=TTL * 3, message="a cross-node request works again")
    remote = a.create_proxy(0, "B", tcp_echo.port, protocol="tcp")
    with connect(remote.local_port) as user:
        user.sendall(b"back again")
        assert recv_exactly(user, 10) == b"back again"
    assert remote_b.control.registered.is_set() and local_b.control.registered.is_set()
    local.close()
    remote.close()


def connect_request(to: str, port: int):
    from common import protocol as p
    return p.ConnectRequest(toClientId=to, remotePort=port, protocol="tcp")


# --- the command line, the config file, a killed node ----------------------------------------------

def test_cluster_options_and_config_keys_reach_the_server(tmp_path):
    import json
    from chuantou_server.app import make_server
    from chuantou_server.cli import build_parser, make_app

    args = build_parser().parse_args(["--cluster", "redis://127.0.0.1:6399/0", "--node-id", "n7",
                                      "--advertise", "ws://relay7.example.com:8200",
                                      "--config", str(tmp_path / "server.json")])
    (tmp_path / "server.json").write_text(json.dumps({"clusterTtl": 5}))
    cfg = make_server(make_app(args).settings).config
    assert (cfg.cluster_url, cfg.node_id, cfg.advertise, cfg.cluster_ttl) == (
        "redis://127.0.0.1:6399/0", "n7", "ws://relay7.example.com:8200", 5)

    (tmp_path / "server.json").write_text(json.dumps({"cluster": "redis://10.0.0.1:6379/0", "nodeId": "n8",
                                                       "advertise": "ws://relay8.example.com:8200"}))
    args = build_parser().parse_args(["--config", str(tmp_path / "server.json")])
    cfg = make_server(make_app(args).settings).config
    assert (cfg.cluster_url, cfg.node_id, cfg.advertise) == ("redis://10.0.0.1:6379/0", "n8",
                                                             "ws://relay8.example.com:8200")
    (tmp_path / "plain.json").write_text("{}")
    assert make_server(make_app(build_parser().parse_args(
        ["--config", str(tmp_path / "plain.json")])).settings).cluster is None, "without --cluster: no cluster"


@pytest.mark.timeout(90)
def test_a_killed_node_s_keys_expire_and_its_client_is_reachable_again_elsewhere(redis_server, tmp_path,
                                                                                 make_server, make_client,
                                                                                 tcp_echo):
    """SIGKILL the node B is on (a real process): B's keys expire within their TTL, B registers on
    the next URL, a new connection through A's proxy works, and a session on another node goes on."""
    import json
    import os
    import signal
    import sys
    import time

    kill_ttl = 2.0
    config_file = tmp_path / "server.json"
    config_file.write_text(json.dumps({"clusterTtl": kill_ttl, "noAuth": True}))
    port = free_port()
    env = dict(os.environ, **{f"XDG_{name}_HOME": str(tmp_path / name.lower())
                              for name in ("CONFIG", "STATE", "CACHE", "DATA")})
    proc = subprocess.Popen([sys.executable, "-m", "chuantou_server", "--host", "127.0.0.1", "--port", str(port),
                             "--config", str(config_file), "--cluster", redis_server.url, "--node-id", "doomed"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    store = redis_server.client()
    try:
        n1 = make_server(cluster_url=redis_server.url, node_id="n1", cluster_ttl=TTL)
        n2 = make_server(cluster_url=redis_server.url, node_id="n2", cluster_ttl=TTL)
        wait_until(lambda: store.get(keys.node_key("doomed")), timeout=20, message="the node wrote its record")
        a = make_client(n1, "A")
        make_client(n2, "C")
        b = make_client(f"ws://127.0.0.1:{port},{relay_url(n2)}", "B", reconnect_max_delay=0.5)
        wait_until(lambda: on_node(store, "B") == "doomed" and on_node(store, "C") == "n2")
        to_b = a.create_proxy(0, "B", tcp_echo.port, protocol="tcp")
        to_c = a.create_proxy(0, "C", tcp_echo.port, protocol="tcp")
        with connect(to_b.local_port) as user:
            user.sendall(b"before")
            assert recv_exactly(user, 6) == b"before"
        with connect(to_c.local_port) as on_n2:
            on_n2.sendall(b"ping")
            assert recv_exactly(on_n2, 4) == b"ping"

            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            killed_at = time.monotonic()
            wait_until(lambda: store.get(keys.node_key("doomed")) is None, timeout=5,
                       message="the killed node's record expired")
            assert time.monotonic() - killed_at <= kill_ttl + 0.5, "gone within the TTL"
            wait_until(lambda: on_node(store, "B") == "n2", timeout=15, message="B registered again on n2")
            assert b.control.url == relay_url(n2)

            on_n2.sendall(b"pong")  # a session pumped on another node did not notice
            assert recv_exactly(on_n2, 4) == b"pong"
        with connect(to_b.local_port) as user:
            user.sendall(b"after")
            assert recv_exactly(user, 5) == b"after"
        to_b.close()
        to_c.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        store.close()


# --- clients with several relay URLs ------------------------------------------------------------------

def test_a_client_with_three_urls_whose_first_is_down_starts_on_the_second(nodes, make_client):
    down = f"ws://127.0.0.1:{free_port()}"
    urls = [down, relay_url(nodes["n2"]), relay_url(nodes["n3"])]
    client = make_client(",".join(urls), "M")
    assert client.control.url == urls[1]
    assert nodes["n2"].registry.get("M") is not None and nodes["n3"].registry.get("M") is None


@pytest.mark.timeout(60)
def test_a_client_whose_node_goes_away_moves_to_the_next_url_and_is_reachable_there(nodes, make_client,
                                                                                    redis_server, tcp_echo):
    a = make_client(nodes["n1"], "A")
    b = make_client(f"{relay_url(nodes['n2'])},{relay_url(nodes['n3'])}", "B", reconnect_max_delay=1.0)
    store = redis_server.client()
    wait_until(lambda: on_node(store, "B") == "n2")
    nodes["n2"].stop()
    wait_until(lambda: on_node(store, "B") == "n3", timeout=15, message="B registered again on n3")
    store.close()
    assert b.control.url == relay_url(nodes["n3"])
    proxy = a.create_proxy(0, "B", tcp_echo.port, protocol="tcp")
    with connect(proxy.local_port) as user:
        user.sendall(b"moved over")
        assert recv_exactly(user, 10) == b"moved over"
    proxy.close()


def test_server_may_be_repeated_or_comma_separated_on_the_command_line():
    from chuantou_client.cli import build_parser
    from chuantou_client.client import check_server_url

    args = build_parser().parse_args(["--server", "ws://r1:8200", "--server", "ws://r2:8200,ws://r3:8200"])
    assert args.server == "ws://r1:8200,ws://r2:8200,ws://r3:8200"
    assert check_server_url(" ws://r1:8200, ws://r2:8200") == "ws://r1:8200,ws://r2:8200"
    from common.errors import ChuantouError
    with pytest.raises(ChuantouError, match="must look like"):
        check_server_url("ws://r1:8200,http://r2")


def test_status_and_client_list_show_the_whole_cluster(nodes, a_on_n1_b_on_n3):
    from common import protocol as p
    a, _b = a_on_n1_b_on_n3
    reply = a.control.request(p.GetClientList(), timeout=10)
    assert sorted(c.id for c in reply.clients) == ["A", "B"]
    view = nodes["n2"].status()["cluster"]
    assert view["node"] == "n2" and view["store"] == "reachable"
    assert sorted(n["id"] for n in view["nodes"]) == ["n1", "n2", "n3"]


def test_a_cross_node_udp_flow_passes_and_closing_it_on_a_ends_it_on_the_data_node(nodes, a_on_n1_b_on_n3,
                                                                                    udp_echo):
    from helpers import udp_roundtrip
    a, b = a_on_n1_b_on_n3
    proxy = a.create_proxy(0, "B", udp_echo.port, protocol="udp")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as user:
        user.bind(("127.0.0.1", 0))
        assert udp_roundtrip(user, proxy.local_port, b"ping across") == b"ping across"
    assert wait_until(lambda: len(nodes["n3"].sessions) == 1 and len(b.sessions) == 1, 5)
    assert len(nodes["n1"].sessions) == 0, "pumped on B's node only"
    proxy.close()  # A tells n1, n1 tells n3 ("end"), n3 tells B
    assert wait_until(lambda: len(nodes["n3"].sessions) == 0 and len(b.sessions) == 0, 5)


# --- metrics ----------------------------------------------------------------------------------------

def scrape(server) -> dict:
    """{(sample name, sorted labels): value} of the relay's /metrics, parsed by prometheus_client."""
    import http.client
    from prometheus_client.parser import text_string_to_metric_families
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        body = response.read().decode()
        assert response.status == 200, body
    finally:
        conn.close()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(body) for sample in family.samples}


def refused(figures: dict, reason: str) -> float:
    return figures["chuantou_relay_cluster_requests_refused_total", (("reason", reason),)]


@pytest.mark.timeout(60)
def test_a_node_s_metrics_show_the_node_table_the_store_and_its_cross_node_requests(redis_server, make_server,
                                                                                   make_client, tcp_echo):
    from common.errors import RequestError
    n1 = make_server(cluster_url=redis_server.url, node_id="n1", cluster_ttl=TTL)
    n2 = make_server(cluster_url=redis_server.url, node_id="n2", cluster_ttl=TTL, max_pending_sessions_per_client=1)
    a = make_client(n1, "A")
    make_client(n2, "B")
    make_client(n2, "B2")
    store = redis_server.client()
    wait_until(lambda: on_node(store, "A") == "n1" and on_node(store, "B") == "n2" and on_node(store, "B2") == "n2")
    store.close()

    def table_shows_the_clients() -> dict | None:
        figures = scrape(n1)
        clients = {node: figures.get(("chuantou_relay_cluster_node_clients", (("node", node),)))
                   for node in ("n1", "n2")}
        return figures if clients == {"n1": 1, "n2": 2} else None
    figures = wait_until(table_shows_the_clients, timeout=TTL * 2, message="the node table has each node's clients")
    assert figures["chuantou_relay_cluster_nodes", ()] == 2
    assert figures["chuantou_relay_cluster_store_up", ()] == 1
    assert figures["chuantou_relay_cluster_node_sessions", (("node", "n2"),)] == 0
    assert 0 <= figures["chuantou_relay_cluster_node_update_age_seconds", (("node", "n2"),)] <= TTL
    assert figures["chuantou_relay_cluster_requests_sent_total", ()] == 0

    # one request A never joins, so n2 refuses the next by its pending cap, with the cap's own words
    a.control.request(connect_request("B", tcp_echo.port), timeout=10)
    with pytest.raises(RequestError, match="waiting to be joined"):
        a.control.request(connect_request("B2", tcp_echo.port), timeout=10)
    with pytest.raises(RequestError, match="not online"):
        a.control.request(connect_request("nobody", tcp_echo.port), timeout=10)
    figures = scrape(n1)
    assert figures["chuantou_relay_cluster_requests_sent_total", ()] == 2, "the offline target's was never sent"
    assert refused(figures, "limit") == 1 and refused(figures, "target_offline") == 1
    on_n2 = scrape(n2)
    assert on_n2["chuantou_relay_sessions_opened_total", (("protocol", "tcp"),)] == 1
    assert on_n2["chuantou_relay_sessions_refused_total", (("protocol", "tcp"), ("reason", "pending"))] == 1

    redis_server.stop()
    with pytest.raises(RequestError, match="cluster store unreachable"):
        a.control.request(connect_request("B", tcp_echo.port), timeout=10)
    figures = scrape(n1)
    assert figures["chuantou_relay_cluster_store_up", ()] == 0
    assert figures["chuantou_relay_cluster_nodes", ()] == 0
    assert not [key for key in figures if key[0] == "chuantou_relay_cluster_node_clients"]
    assert refused(figures, "store_unreachable") == 1
    assert "chuantou_relay_cluster_nodes" not in {name for name, _ in scrape(make_server())}, "a relay on its own"
