"""Spreading clients over a relay cluster: ``--server-order random`` and a loaded node's
``register_redirect`` (relay nodes sharing a real redis-server on loopback, fixtures of
test_cluster.py).

A client follows a redirect only to a host of its --server list, of the same scheme, without
loops; otherwise it registers at its list's URL, which does not redirect it again.
"""

from __future__ import annotations

import logging
import random

import pytest

from chuantou_client.relays import MAX_REDIRECTS, RelayList, ordered, redirect_problem
from chuantou_server import cluster_keys as keys
from chuantou_server import cluster_redirect
from common.errors import ChuantouError

from helpers import connect, free_port, recv_exactly, relay_url, wait_until
import test_cluster
from test_cluster import REDIS_SERVER, TTL, on_node

redis_server = test_cluster.redis_server  # the fixture: a real redis-server on a free port

pytestmark = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed")


@pytest.fixture
def fresh_table(monkeypatch):
    """Nodes read the node table at every registration, so a test sees its latest counts."""
    monkeypatch.setattr(cluster_redirect, "TABLE_MAX_AGE", 0.0)


def node_table_shows(store, counts: dict) -> bool:
    import json
    for node, clients in counts.items():
        raw = store.get(keys.node_key(node))
        if raw is None or json.loads(raw)["clients"] != clients:
            return False
    return True


def wait_for_table(redis_server, counts: dict) -> None:
    store = redis_server.client()
    try:
        wait_until(lambda: node_table_shows(store, counts), timeout=TTL * 3,
                   message=f"the node table shows {counts} clients")
    finally:
        store.close()


# --- --server-order ------------------------------------------------------------------------------

URLS = ["ws://r1:8200", "ws://r2:8200", "ws://r3:8200"]


def test_random_order_is_a_permutation_that_differs_between_starts():
    orders = [ordered(URLS, "random", random.Random(seed)) for seed in range(20)]
    assert all(sorted(order) == sorted(URLS) for order in orders)
    assert len({order[0] for order in orders}) > 1, "different starts begin on different nodes"
    assert ordered(URLS, "in-order", random.Random(1)) == URLS
    assert ordered(URLS, "random", random.Random(7)) == ordered(URLS, "random", random.Random(7))


def test_random_order_then_goes_round_the_shuffled_list():
    relays = RelayList(URLS, "random", random.Random(3))
    seen = [relays.current]
    while relays.advance():
        seen.append(relays.current)
    assert seen == relays.urls and sorted(seen) == sorted(URLS), "each once, then a new round (backoff)"
    assert relays.current == relays.urls[0]


def test_clients_with_random_order_land_on_more_than_one_node(redis_server, make_server,
                                                              make_client):
    nodes = [make_server(cluster_url=redis_server.url, node_id=f"n{i}", cluster_ttl=TTL) for i in (1, 2, 3)]
    urls = [relay_url(node) for node in nodes]
    landed = set()
    for seed in range(6):
        client = make_client(",".join(urls), f"R{seed}", server_order="random", server_order_seed=seed)
        expected = ordered(urls, "random", random.Random(seed))[0]
        assert client.control.url == expected, "a client starts on the first of its shuffled list"
        assert client.status()["serverOrder"] == "random" and client.status()["relayUrl"] == expected
        landed.add(expected)
    assert len(landed) > 1
    counts = {node.config.node_id: len(node.registry) for node in nodes}
    assert sum(counts.values()) == 6 and sum(1 for n in counts.values() if n) == len(landed)


def test_server_order_on_the_command_line_is_saved_and_checked(tmp_path):
    import json
    from chuantou_client import Client
    from chuantou_client.cli import build_parser, make_app

    config_path = tmp_path / "client.json"
    args = build_parser().parse_args(["--server", "ws://r1:8200,ws://r2:8200", "--server-order", "random",
                                      "--config", str(config_path)])
    app = make_app(args, config_path)
    assert app.client.server_order == "random"
    assert json.loads(config_path.read_text())["serverOrder"] == "random"
    again = make_app(build_parser().parse_args(["--config", str(config_path)]), config_path)
    assert again.client.server_order == "random", "the saved order holds at the next start"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--server-order", "shuffle"])
    with pytest.raises(ChuantouError, match="server order 'shuffle' is invalid"):
        Client("ws://r1:8200", "X", server_order="shuffle")


# --- which redirects a client follows ---------------------------------------------------------------

def test_redirect_rules():
    listed = ["ws://relay1.example.com:8200", "ws://10.0.0.2:8200"]
    home = [listed[0]]
    assert redirect_problem(listed, home, "ws://10.0.0.2:8200") is None, "a listed URL"
    assert redirect_problem(listed, home, "ws://relay1.example.com:8300") is None, "a listed host, other port"
    assert "not the host" in redirect_problem(listed, home, "ws://evil.example.net:8200")
    assert "not the host" in redirect_problem(listed, home, "ws://192.168.1.1:80")
    assert "scheme" in redirect_problem(listed, home, "wss://10.0.0.2:8200")
    assert "loop" in redirect_problem(listed, [listed[0], listed[1]], listed[0])
    chain = [f"ws://10.0.0.2:{8200 + i}" for i in range(MAX_REDIRECTS + 1)]
    assert redirect_problem(listed, chain[:-1], chain[-1]) is None, f"{MAX_REDIRECTS} hops are followed"
    assert "in a row" in redirect_problem(listed, chain, "ws://10.0.0.2:9999")


# --- a loaded node redirects ---------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_a_redirect_lands_a_client_on_the_less_loaded_node(redis_server, make_server, make_client,
                                                           fresh_table, tcp_echo):
    n1, n2, n3 = (make_server(cluster_url=redis_server.url, node_id=f"n{i}", cluster_ttl=TTL,
                              cluster_redirect_margin=1) for i in (1, 2, 3))
    make_client(n1, "C1")  # n1: 0 clients, the others 0 too: no redirect
    make_client(n2, "C2")
    assert n1.registry.get("C1") is not None and n2.registry.get("C2") is not None
    wait_for_table(redis_server, {"n1": 1, "n2": 1, "n3": 0})

    client = make_client(n1, "D")  # only n1 in its list; n3 is on the same host
    assert client.control.url == relay_url(n3), "redirected to the least loaded node"
    assert n3.registry.get("D") is not None and n1.registry.get("D") is None
    store = redis_server.client()
    assert on_node(store, "D") == "n3", "the cluster registry holds D on n3 only"
    store.close()
    assert client.control.urls == [relay_url(n1)], "its own list is unchanged"

    proxy = client.create_proxy(0, "C1", tcp_echo.port, protocol="tcp")  # and it works from there
    with connect(proxy.local_port) as user:
        user.sendall(b"from n3")
        assert recv_exactly(user, 7) == b"from n3"
    proxy.close()


@pytest.mark.timeout(60)
def test_a_redirect_to_a_host_not_in_the_list_is_not_followed(redis_server, make_server, make_client,
                                                              fresh_table, caplog):
    far_port = free_port()
    n1 = make_server(cluster_url=redis_server.url, node_id="n1", cluster_ttl=TTL, cluster_redirect_margin=1)
    far = make_server(cluster_url=redis_server.url, node_id="far", cluster_ttl=TTL, port=far_port,
                      advertise=f"ws://localhost:{far_port}")  # another host name than the list's 127.0.0.1
    make_client(n1, "C1")
    wait_for_table(redis_server, {"n1": 1, "far": 0})

    with caplog.at_level(logging.INFO, logger="chuantou.client"):
        client = make_client(n1, "D")
    assert client.control.url == relay_url(n1), "registered at its own list's URL"
    assert n1.registry.get("D") is not None and far.registry.get("D") is None
    assert any("not following the redirect" in r.getMessage() and f"ws://localhost:{far_port}" in r.getMessage()
               and "not the host of any --server URL" in r.getMessage() for r in caplog.records)

    # listed, the same node is followed
    listed = make_client(f"{relay_url(n1)},ws://localhost:{far_port}", "E")
    assert listed.control.url == f"ws://localhost:{far_port}" and far.registry.get("E") is not None


def test_redirect_margin_reaches_the_server_and_is_checked(tmp_path):
    import json
    from chuantou_server import Server
    from chuantou_server.app import make_server
    from chuantou_server.cli import build_parser, make_app

    args = build_parser().parse_args(["--cluster", "redis://127.0.0.1:6399/0", "--redirect-margin", "5",
                                      "--config", str(tmp_path / "server.json")])
    (tmp_path / "server.json").write_text("{}")
    assert make_server(make_app(args).settings).config.cluster_redirect_margin == 5
    (tmp_path / "server.json").write_text(json.dumps({"cluster": "redis://127.0.0.1:6399/0", "redirectMargin": 3}))
    args = build_parser().parse_args(["--config", str(tmp_path / "server.json")])
    assert make_server(make_app(args).settings).config.cluster_redirect_margin == 3
    with pytest.raises(ChuantouError, match="redirect margin"):
        Server(cluster_redirect_margin=-1)


# --- a hostile node: redirects in a loop, and even when asked not to --------------------------------

class RedirectingRelay:
    """A stand-in for a hostile relay node on 127.0.0.1: it answers every register with a
    register_redirect to ``target`` (set after start), and records each register's payload."""

    def __init__(self):
        import socket
        import threading
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.url = f"ws://127.0.0.1:{self.port}"
        self.target = ""
        self.registers: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="svc-redirecting-relay", daemon=True)

    def start(self) -> "RedirectingRelay":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.listener.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                try:
                    self._answer(conn)
                except OSError:
                    pass

    def _answer(self, conn) -> None:
        import base64
        import hashlib
        import json
        import re
        head = b""
        while b"\r\n\r\n" not in head:
            head += conn.recv(4096) or b"\r\n\r\n"
        key = re.search(rb"Sec-WebSocket-Key: *(\S+)", head, re.I).group(1)
        accept = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
        conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n")
        send_text(conn, {"type": "challenge", "payload": {"nonce": "ab" * 32, "protocolVersion": 2}})
        self.registers.append(json.loads(read_masked_text(conn))["payload"])
        send_text(conn, {"type": "register_redirect", "payload": {"url": self.target, "node": "evil"}})


def send_text(conn, message: dict) -> None:
    import json
    data = json.dumps(message).encode()
    assert len(data) < 1 << 16
    head = bytes([0x81, len(data)]) if len(data) < 126 else bytes([0x81, 126]) + len(data).to_bytes(2, "big")
    conn.sendall(head + data)


def read_masked_text(conn) -> bytes:
    from helpers import recv_exactly as exactly
    _, size = exactly(conn, 2)
    size &= 0x7F
    if size == 126:
        size = int.from_bytes(exactly(conn, 2), "big")
    mask = exactly(conn, 4)
    return bytes(b ^ mask[i % 4] for i, b in enumerate(exactly(conn, size)))


@pytest.mark.timeout(60)
def test_hostile_nodes_redirecting_in_a_loop_leave_the_client_on_a_good_node(make_server, make_client, caplog):
    good = make_server()
    first, second = RedirectingRelay().start(), RedirectingRelay().start()
    first.target, second.target = second.url, first.url  # each to the other: a loop
    try:
        with caplog.at_level(logging.INFO, logger="chuantou.client"):
            client = make_client(f"{first.url},{second.url},{relay_url(good)}", "L")
        assert client.control.url == relay_url(good) and good.registry.get("L") is not None
    finally:
        first.stop()
        second.stop()
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "a redirect loop" in text and "although this client asked not to be redirected" in text
    assert first.registers[0]["followsRedirect"] is True
    assert "followsRedirect" not in first.registers[1], "back at its list's URL it asks not to be redirected"
