"""Pending cross-node sessions as keys in the cluster store, and the per-client pending cap
across nodes (real nodes sharing a real redis-server on loopback, fixtures of test_cluster.py)."""

from __future__ import annotations

import hashlib
import json
import socket

import pytest

from common import protocol as p
from common.errors import RequestError
from common.frames import JoinRequest, JoinStatus, pack_data_header

from chuantou_server import cluster_keys as keys
from helpers import recv_exactly, wait_until
import test_cluster
from test_cluster import REDIS_SERVER, TTL, on_node
from security_support import ControlPeer

redis_server = test_cluster.redis_server  # the fixture: a real redis-server on a free port

pytestmark = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed")

JOIN_TIMEOUT = 20.0


@pytest.fixture
def store(redis_server):
    client = redis_server.client()
    yield client
    client.close()


def cluster_of(redis_server, make_server, **settings) -> dict:
    return {name: make_server(cluster_url=redis_server.url, node_id=name, cluster_ttl=TTL,
                              session_join_timeout=JOIN_TIMEOUT, **settings) for name in ("n1", "n2", "n3")}


def ask(peer: ControlPeer, to: str, port: int) -> p.CreateSession:
    """A's connect_request by hand (A has no key: the session is not sealed): A is told the
    session, but opens no data channel for it until the test does."""
    peer.send(p.ConnectRequest(toClientId=to, remotePort=port, protocol="tcp", requestId="r"))
    reply = peer.recv_until((p.CreateSession, p.Error), timeout=15)
    if isinstance(reply, p.Error):
        raise RequestError(reply.message)
    return reply


def registered(peers, server, client_id: str) -> ControlPeer:
    peer = peers(server)
    assert peer.register(client_id).success
    return peer


def pending_keys(store) -> list[str]:
    return sorted(store.scan_iter(match=keys.PENDING_KEYS))


def test_a_pending_cross_node_session_is_a_key_without_secrets_until_it_joins(redis_server, tcp_echo, make_server,
                                                                                make_client, peers, store):
    # (tcp_echo before the clients: B's half-joined sessions hold echo connections until B stops)
    nodes = cluster_of(redis_server, make_server)
    a = registered(peers, nodes["n1"], "A")
    make_client(nodes["n3"], "B", allow_unsealed=True)
    wait_until(lambda: on_node(store, "A") == "n1" and on_node(store, "B") == "n3")

    created = ask(a, "B", tcp_echo.port)
    session = nodes["n3"].sessions.get(created.sessionId)
    assert session is not None and not session.joined
    raw = store.get(keys.pending_key("A", created.sessionId))
    assert raw is not None, "the pending session is in the store"
    record = json.loads(raw)
    assert {k: record[k] for k in ("id", "a", "b", "dataNode")} == {"id": created.sessionId, "a": "A", "b": "B",
                                                                  "dataNode": "n3"}
    assert record["secretHashes"] == [hashlib.sha256(s.encode()).hexdigest()
                                      for s in (session.secret_a, session.secret_b)]
    assert session.secret_a not in raw and session.secret_b not in raw, "never the secrets themselves"
    assert 0 < store.pttl(keys.pending_key("A", created.sessionId)) <= JOIN_TIMEOUT * 1000
    assert store.zrange(keys.pending_index("A"), 0, -1) == [created.sessionId]
    view = nodes["n2"].cluster.api_view()
    assert view["pendingSessions"] == 1 and view["pendingByNode"] == {"n3": 1}

    wait_until(lambda: session.sock_b is not None, message="B joined its side")
    with socket.create_connection((created.relayAddr.host, created.relayAddr.port), timeout=5) as channel:
        channel.sendall(pack_data_header(JoinRequest("A", created.sessionId, created.secret)))
        assert recv_exactly(channel, 1) == bytes([JoinStatus.JOINED])
        channel.sendall(b"joined")
        assert recv_exactly(channel, 6) == b"joined"
        wait_until(lambda: pending_keys(store) == [] and not store.exists(keys.pending_index("A")),
                   message="the key and A's index entry go once the session joined")
    assert nodes["n2"].cluster.api_view()["pendingSessions"] == 0


def test_the_pending_cap_per_client_holds_across_nodes(redis_server, tcp_echo, make_server, make_client, peers,
                                                      store):
    cap = 3
    nodes = cluster_of(redis_server, make_server, max_pending_sessions_per_client=cap)
    a = registered(peers, nodes["n1"], "A")
    make_client(nodes["n1"], "L", allow_unsealed=True)
    make_client(nodes["n2"], "B", allow_unsealed=True)
    make_client(nodes["n3"], "C", allow_unsealed=True)
    wait_until(lambda: on_node(store, "B") == "n2" and on_node(store, "C") == "n3" and on_node(store, "L") == "n1")

    held = [ask(a, "B", tcp_echo.port), ask(a, "B", tcp_echo.port), ask(a, "C", tcp_echo.port)]
    assert [len(nodes[n].sessions) for n in ("n1", "n2", "n3")] == [0, 2, 1]
    for to in ("C", "B", "L"):  # each data node alone holds fewer than the cap, and so does A's node
        with pytest.raises(RequestError, match=r"already has 3 sessions waiting to be joined \(across the relay's "
                                               r"cluster\).*maxPendingSessionsPerClient"):
            ask(a, to, tcp_echo.port)
    assert [len(nodes[n].sessions) for n in ("n1", "n2", "n3")] == [0, 2, 1]
    assert store.zcard(keys.pending_index("A")) == 3 and len(pending_keys(store)) == 3

    nodes["n3"].close_session(nodes["n3"].sessions.get(held[2].sessionId), "test: one fewer pending")
    wait_until(lambda: store.zcard(keys.pending_index("A")) == 2, message="a closed session leaves A's index")
    assert ask(a, "C", tcp_echo.port).sessionId in store.zrange(keys.pending_index("A"), 0, -1)
