"""A relay cluster's data-node policy and its view: three nodes in this process on a real
redis-server (test_cluster.py starts it).

least-loaded pumps a session between A on n1 and B on n3 on n2 when n2 has the fewest sessions;
the admin API and status show each node's load and state, each client's node and where each
session is pumped; a record in Redis that no node wrote is shown escaped and never chosen.
"""

from __future__ import annotations

import json

import pytest

from chuantou_server import cluster_keys as keys
from chuantou_server.cluster_view import NodeTable, status_lines
from helpers import connect, exchange, http_json, random_bytes, recv_exactly, sha256, wait_until
from test_cluster import TTL, RedisProcess, on_node, scrape

MiB = 1024 * 1024
ADMIN = "admin-token-for-the-cluster-view"


@pytest.fixture
def redis_server(tmp_path):
    server = RedisProcess(tmp_path).start()
    yield server
    server.stop()


@pytest.fixture
def least_loaded(redis_server, make_server):
    """Three nodes n1, n2, n3 with the least-loaded policy and an admin token."""
    return {name: make_server(cluster_url=redis_server.url, node_id=name, cluster_ttl=TTL,
                              data_node="least-loaded", admin_token=ADMIN)
            for name in ("n1", "n2", "n3")}


def api(server, path: str):
    status, _, body = http_json(server.port, "GET", path, {"Authorization": f"Bearer {ADMIN}"})
    assert status == 200, body
    return body


def loads_seen_by(server) -> dict:
    return {row["id"]: row["sessions"] for row in server.cluster.table.rows() if row["state"] == "live"}


def hold_local_session(client, target: str, port: int):
    """A proxy from ``client`` to ``target`` (both on one node) with one joined connection open."""
    proxy = client.create_proxy(0, target, port, protocol="tcp")
    sock = connect(proxy.local_port)
    sock.sendall(b"busy")
    assert recv_exactly(sock, 4) == b"busy"
    return proxy, sock


@pytest.mark.timeout(120)
def test_least_loaded_pumps_a_session_from_n1_to_n3_on_n2_intact(least_loaded, make_client, redis_server,
                                                                  tcp_echo):
    n1, n2, n3 = least_loaded["n1"], least_loaded["n2"], least_loaded["n3"]
    a, b = make_client(n1, "A"), make_client(n3, "B")
    make_client(n1, "A2")
    make_client(n3, "B2")
    store = redis_server.client()
    wait_until(lambda: [on_node(store, c) for c in ("A", "A2", "B", "B2")] == ["n1", "n1", "n3", "n3"])
    store.close()
    held = [hold_local_session(a, "A2", tcp_echo.port), hold_local_session(b, "B2", tcp_echo.port)]
    wait_until(lambda: loads_seen_by(n3) == {"n1": 1, "n2": 0, "n3": 1}, timeout=TTL * 3,
               message="B's node sees n2 as the least loaded")

    proxy = a.create_proxy(0, "B", tcp_echo.port, protocol="tcp")
    payload = random_bytes(4 * MiB)
    with connect(proxy.local_port, timeout=60) as user:
        user.sendall(b"hello")
        assert recv_exactly(user, 5) == b"hello"
        assert [len(s.sessions) for s in (n1, n2, n3)] == [1, 1, 1], "the new session is n2's only one"
        (pumped,) = n2.sessions.all()
        assert (pumped.client_a, pumped.client_b, pumped.joined) == ("A", "B", True)
        (row,) = api(n2, "/api/sessions")["sessions"]
        assert (row["a"], row["b"], row["dataNode"], row["aNode"], row["bNode"]) == ("A", "B", "n2", "n1", "n3")
        assert exchange(user, payload) == (sha256(payload), len(payload)), "the bytes differ"
    figures = scrape(n2)
    assert figures["chuantou_relay_sessions_opened_total", (("protocol", "tcp"),)] == 1
    relayed = sum(v for (name, _), v in figures.items() if name == "chuantou_relay_bytes_relayed_total")
    assert relayed >= 2 * len(payload), "n2 pumped the bytes both ways"
    for node in (n1, n3):  # each holds its own local session, and made no other
        assert scrape(node)["chuantou_relay_sessions_opened_total", (("protocol", "tcp"),)] == 1
    wait_until(lambda: len(n2.sessions) == 0)
    for local_proxy, sock in held:
        sock.close()
        local_proxy.close()
    proxy.close()


def test_least_loaded_on_a_tie_pumps_on_b_s_node(least_loaded, make_client, redis_server, tcp_echo):
    a = make_client(least_loaded["n1"], "A")
    make_client(least_loaded["n3"], "B")
    store = redis_server.client()
    wait_until(lambda: on_node(store, "A") == "n1" and on_node(store, "B") == "n3")
    store.close()
    wait_until(lambda: loads_seen_by(least_loaded["n3"]) == {"n1": 0, "n2": 0, "n3": 0}, timeout=TTL * 3)
    proxy = a.create_proxy(0, "B", tcp_echo.port, protocol="tcp")
    with connect(proxy.local_port) as user:
        user.sendall(b"tie")
        assert recv_exactly(user, 3) == b"tie"
        assert [len(least_loaded[n].sessions) for n in ("n1", "n2", "n3")] == [0, 0, 1]
    proxy.close()


def test_a_refusal_by_b_reaches_a_across_three_nodes_before_the_join_deadline(least_loaded, make_client,
                                                                              redis_server, tcp_echo):
    """B (on n3, refusing every port) rejects a session pumped on n2: n2 closes it at once, not at
    its join deadline, and A's user sees the connection end."""
    n1, n2, n3 = least_loaded["n1"], least_loaded["n2"], least_loaded["n3"]
    a, b2 = make_client(n1, "A"), make_client(n3, "B2")
    make_client(n1, "A2")
    make_client(n3, "B", allow="none")
    make_client(n3, "C2")
    store = redis_server.client()
    wait_until(lambda: [on_node(store, c) for c in ("A", "A2", "B", "B2", "C2")] == ["n1", "n1", "n3", "n3", "n3"])
    store.close()
    held = [hold_local_session(a, "A2", tcp_echo.port), hold_local_session(b2, "C2", tcp_echo.port)]
    wait_until(lambda: loads_seen_by(n3) == {"n1": 1, "n2": 0, "n3": 1}, timeout=TTL * 3)
    proxy = a.create_proxy(0, "B", 9, protocol="tcp")
    with connect(proxy.local_port) as user:
        user.settimeout(n2.config.session_join_timeout / 2)  # the refusal, not the join deadline, ends it
        try:
            assert user.recv(1) == b""
        except ConnectionResetError:
            pass
    wait_until(lambda: len(n2.sessions) == 0, timeout=2, message="n2 closed the refused session")
    assert scrape(n2)["chuantou_relay_sessions_opened_total", (("protocol", "tcp"),)] == 1, "made on n2"
    assert not n3.cluster._offers, "B's node forgot the offer"
    for local_proxy, sock in held:
        sock.close()
        local_proxy.close()
    proxy.close()


# --- the view: API, status ------------------------------------------------------------------------

@pytest.fixture
def viewed(redis_server, make_server, make_client):
    """n1 and n2 (B's node policy) with an admin token, A on n1 and B on n2, and n3 with no client."""
    nodes = {name: make_server(cluster_url=redis_server.url, node_id=name, cluster_ttl=TTL, admin_token=ADMIN)
             for name in ("n1", "n2", "n3")}
    make_client(nodes["n1"], "A")
    make_client(nodes["n2"], "B")
    store = redis_server.client()
    wait_until(lambda: on_node(store, "A") == "n1" and on_node(store, "B") == "n2")
    store.close()
    return nodes


def test_the_api_shows_each_node_s_load_and_state_and_each_client_s_node(viewed):
    n1 = viewed["n1"]

    def loads() -> dict:
        return {row["id"]: (row["state"], row["clients"], row["sessions"])
                for row in api(n1, "/api/cluster")["nodes"]}
    wait_until(lambda: loads() == {"n1": ("live", 1, 0), "n2": ("live", 1, 0), "n3": ("live", 0, 0)},
               timeout=TTL * 3, message="each node's record shows its clients")
    view = api(n1, "/api/cluster")
    assert (view["node"], view["dataNode"], view["store"]) == ("n1", "b", "reachable")
    assert {row["id"]: row["advertise"] for row in view["nodes"]} == {
        name: f"ws://127.0.0.1:{server.port}" for name, server in viewed.items()}
    assert all(isinstance(row["bytesPerSecond"], (int, float)) for row in view["nodes"])
    assert view["clients"] == [{"id": "A", "node": "n1", "here": True}, {"id": "B", "node": "n2", "here": False}]
    assert [(c["id"], c["node"]) for c in api(n1, "/api/clients")["clients"]] == [("A", "n1")]
    assert api(n1, "/api/status")["cluster"]["node"] == "n1"

    viewed["n3"].stop()  # its key goes at once: n1 lists it as expired from its next read
    wait_until(lambda: loads().get("n3", ("?",))[0] == "expired", message="n3 shown as expired")
    assert loads()["n2"][0] == "live"


def test_a_relay_on_its_own_has_no_cluster_view(make_server):
    server = make_server(admin_token=ADMIN)
    status, _, body = http_json(server.port, "GET", "/api/cluster", {"Authorization": f"Bearer {ADMIN}"})
    assert status == 404 and "--cluster" in body["error"]
    assert "dataNode" not in api(server, "/api/sessions") and "cluster" not in api(server, "/api/status")


def test_status_prints_the_node_s_cluster_view(viewed):
    from chuantou_server.cli import fetch_status
    n2 = viewed["n2"]
    wait_until(lambda: loads_seen_by(n2).keys() == {"n1", "n2", "n3"}, timeout=TTL * 3)
    wait_until(lambda: any(r["clients"] == 1 for r in n2.cluster.table.rows() if r["id"] == "n1"), timeout=TTL * 3)
    status = fetch_status({"host": "127.0.0.1", "port": n2.port}, ADMIN)  # what status asks the running relay
    lines = status_lines(status["cluster"])
    assert lines[0].startswith("  cluster:    node n2 (ws://127.0.0.1:") and "policy b, store reachable" in lines[0]
    rows = {line.split()[1 if line.split()[0] == "*" else 0]: line for line in lines[1:]}
    assert sorted(rows) == ["n1", "n2", "n3"]
    assert rows["n2"].lstrip().startswith("* n2"), "this node is marked"
    assert "live" in rows["n1"] and "clients      1" in rows["n1"] and "sessions      0" in rows["n1"]


def test_a_node_record_no_node_wrote_is_shown_escaped_and_never_chosen(viewed, redis_server):
    store = redis_server.client()
    try:
        store.set(keys.node_key("evil"), json.dumps({"id": "<img src=x onerror=alert(1)>\x1b[2J", "sessions": "0",
                                                    "advertise": "ws://evil\x07:1"}), px=60000)
        store.set(keys.node_key("junk"), "not json at all", px=60000)
        store.zadd(keys.NODE_INDEX, {"evil": 2**50, "junk": 2**50})  # listed as live nodes are
        store.set(keys.client_key("Z"), "{broken", px=60000)
        n1 = viewed["n1"]
        view = api(n1, "/api/cluster")
        (evil,) = [row for row in view["nodes"] if row["id"].startswith("<img")]
        assert "\x1b" not in evil["id"] and "\\x1b[2J" in evil["id"] and "\x07" not in evil["advertise"]
        assert evil["sessions"] == 0 and not evil["complete"]
        assert "Z" not in {c["id"] for c in view["clients"]}
        assert not any("\x1b" in line for line in status_lines(n1.status()["cluster"]))
        table = NodeTable("x")  # among records as Redis holds them: a busy complete one and the evil one
        table.update([json.loads(store.get(keys.node_key("evil"))),
                      {"id": "x", "advertise": "ws://x:1", "clients": 1, "sessions": 3, "bytesPerSecond": 0}])
        assert table.choose("least-loaded", own_sessions=3) == "x", "an incomplete record is never chosen"
        assert "chuantou_relay_cluster_nodes" in {name for name, _ in scrape(n1)}
    finally:
        store.close()


def test_data_node_option_and_config_key(tmp_path):
    from chuantou_server.app import config_problems, make_server
    from chuantou_server.cli import build_parser, make_app
    path = tmp_path / "server.json"
    path.write_text(json.dumps({"cluster": "redis://127.0.0.1:6399/0", "dataNode": "least-loaded"}))
    assert config_problems(path) == []
    assert make_server(make_app(build_parser().parse_args(["--config", str(path)])).settings).config.data_node \
        == "least-loaded"
    args = build_parser().parse_args(["--config", str(path), "--data-node", "b"])
    assert make_server(make_app(args).settings).config.data_node == "b", "the command line wins"
    path.write_text(json.dumps({"dataNode": "random"}))
    (problem,) = config_problems(path)
    assert "dataNode" in problem and "least-loaded" in problem
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--data-node", "random"])


# --- caps cluster-wide ------------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_the_per_client_session_cap_holds_across_two_nodes(redis_server, make_server, make_client, tcp_echo):
    """A (on n1) may open 2 sessions: one pumped on n1 and one on n2 use them up, so a third on
    n1 is refused, though n1 alone holds only one of A's sessions."""
    from common import protocol as p
    from common.errors import RequestError
    n1, n2 = (make_server(cluster_url=redis_server.url, node_id=name, cluster_ttl=TTL, max_sessions_per_client=2)
              for name in ("n1", "n2"))
    a = make_client(n1, "A")
    make_client(n1, "B1")
    make_client(n2, "B2")
    store = redis_server.client()
    wait_until(lambda: [on_node(store, c) for c in ("A", "B1", "B2")] == ["n1", "n1", "n2"])

    def request(to: str):
        return a.control.request(p.ConnectRequest(toClientId=to, remotePort=tcp_echo.port, protocol="tcp"),
                                 timeout=10)
    request("B1")
    request("B2")
    assert (len(n1.sessions), len(n2.sessions)) == (1, 1)
    wait_until(lambda: n1.cluster.opened_elsewhere("A", "tcp") == 1, timeout=TTL * 3,
               message="n1 counts A's session on n2")
    assert store.hgetall(keys.opened_key("n2")) == {"tcp:A": "1", "to:B2": "1"}
    store.close()
    with pytest.raises(RequestError, match="already has 2 open TCP sessions \\(across the relay's cluster\\)"):
        request("B1")
    assert len(n1.sessions) == 1


@pytest.mark.timeout(60)
def test_the_per_target_session_cap_holds_across_two_nodes(redis_server, make_server, make_client, tcp_echo):
    """B (on n2) may be the target of 1 session: one pumped on n2 uses it up, so a request from A
    on n1 pumped on n1 (least-loaded: n1 has fewer sessions) is refused."""
    from common import protocol as p
    from common.errors import RequestError
    n1, n2 = (make_server(cluster_url=redis_server.url, node_id=name, cluster_ttl=TTL, max_sessions_per_target=1,
                          data_node="least-loaded") for name in ("n1", "n2"))
    a = make_client(n1, "A")
    c = make_client(n2, "C")
    make_client(n2, "B")
    store = redis_server.client()
    wait_until(lambda: [on_node(store, x) for x in ("A", "B", "C")] == ["n1", "n2", "n2"])
    store.close()
    c.control.request(p.ConnectRequest(toClientId="B", remotePort=tcp_echo.port, protocol="tcp"), timeout=10)
    wait_until(lambda: n1.cluster.opened_elsewhere("B", "to") == 1 and loads_seen_by(n2).get("n2", 1) == 1,
               timeout=TTL * 3, message="n1 counts the session to B on n2")
    with pytest.raises(RequestError, match="'B' already has 1 open sessions"):
        a.control.request(p.ConnectRequest(toClientId="B", remotePort=tcp_echo.port, protocol="tcp"), timeout=10)
    assert (len(n1.sessions), len(n2.sessions)) == (0, 1)
    assert scrape(n1)["chuantou_relay_sessions_refused_total", (("protocol", "tcp"), ("reason", "per_target"))] == 1, \
        "refused by n1, the data node, counting n2's session"
