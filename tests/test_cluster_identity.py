"""Identity rules across a relay cluster, as on one relay: an ID is taken over on another node
by the same credential (the node that held it drops it, and its client is told why), refused
with another credential, or in use when the register asks not to take over (real nodes sharing
a real redis-server on loopback, fixtures of test_cluster.py)."""

from __future__ import annotations

import json
import threading

import pytest

from chuantou_client import Client
from common import auth
from common import protocol as p
from common.errors import ChuantouError

from chuantou_server import cluster_keys as keys
from helpers import connect, recv_exactly, relay_url, wait_until
import test_cluster
from test_cluster import REDIS_SERVER, TTL, on_node
from security_support import ControlPeer

redis_server = test_cluster.redis_server  # the fixture: a real redis-server on a free port

pytestmark = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed")

FIRST = "first-token-" + "1" * 20
SECOND = "second-token-" + "2" * 20


@pytest.fixture
def two_nodes(redis_server, make_server):
    """n1 and n2, each accepting both tokens."""
    return [make_server(cluster_url=redis_server.url, node_id=name, cluster_ttl=TTL, extra_tokens=[FIRST, SECOND])
            for name in ("n1", "n2")]


@pytest.fixture
def store(redis_server):
    client = redis_server.client()
    yield client
    client.close()


def register(peer: ControlPeer, client_id: str, token: str, takeover: bool = True) -> p.RegisterResponse:
    proof = auth.register_proof(token, peer.challenge.nonce, client_id)
    peer.send(p.Register(clientId=client_id, protocolVersion=p.PROTOCOL_VERSION, auth=proof,
                         takeover=None if takeover else False))
    return peer.recv_until(p.RegisterResponse)


def echoes(port: int, payload: bytes) -> bool:
    with connect(port) as user:
        user.sendall(payload)
        return recv_exactly(user, len(payload)) == payload


def test_the_same_id_and_token_on_another_node_takes_it_over(two_nodes, make_client, store, tcp_echo):
    n1, n2 = two_nodes
    old = make_client(n1, "X", token=FIRST, reconnect_max_delay=0.5)
    a = make_client(n1, "A", token=FIRST)
    wait_until(lambda: on_node(store, "X") == "n1")

    new = make_client(n2, "X", token=FIRST)
    assert new.control.register_reply.existingKicked
    assert on_node(store, "X") == "n2"
    wait_until(lambda: n1.registry.get("X") is None, message="node 1 dropped its connection for X")
    assert n2.registry.get("X") is not None
    wait_until(lambda: "registered by a new connection on relay node n2" in (old.control.last_error or ""),
               message="the old client is told why")

    proxy = a.create_proxy(0, "X", tcp_echo.port, protocol="tcp")
    with connect(proxy.local_port) as user:
        user.sendall(b"via node two")
        assert recv_exactly(user, 12) == b"via node two"
        assert len(n2.sessions) == 1 and len(n1.sessions) == 0, "pumped on X's node now, n2"
    # the replaced client retries without taking the ID back: it stays on n2
    assert n1.registry.get("X") is None and on_node(store, "X") == "n2"
    assert new.control.registered.is_set()
    proxy.close()


def test_the_old_node_s_client_is_told_replaced_and_closed(two_nodes, peers, store):
    n1, n2 = two_nodes
    old = peers(n1)
    assert register(old, "X", FIRST).success
    reply = register(peers(n2), "X", FIRST)
    assert reply.success and reply.existingKicked
    told = old.recv_until(p.Error)
    assert told.code == "replaced" and "relay node n2" in told.message
    assert old.closed_by_relay(3.0)
    wait_until(lambda: n1.registry.get("X") is None)


def test_another_token_cannot_take_over_on_another_node(two_nodes, peers, store):
    n1, n2 = two_nodes
    live = peers(n1)
    assert register(live, "X", FIRST).success
    reply = register(peers(n2), "X", SECOND)
    assert not reply.success and reply.code == p.ID_TAKEN and "different credential" in reply.error
    with pytest.raises(ChuantouError, match="different credential"):
        Client(relay_url(n2), "X", token=SECOND, connect_timeout=5).start().stop()
    assert on_node(store, "X") == "n1" and n1.registry.get("X").credential == auth.fingerprint(FIRST)
    assert still_open(live), "the live connection is untouched"


def test_without_takeover_the_same_token_is_in_use(two_nodes, peers, store):
    n1, n2 = two_nodes
    live = peers(n1)
    assert register(live, "X", FIRST).success
    reply = register(peers(n2), "X", FIRST, takeover=False)
    assert not reply.success and reply.code == p.ID_IN_USE and "relay node n1" in reply.error
    assert on_node(store, "X") == "n1" and n1.registry.get("X") is not None
    assert n2.registry.get("X") is None


def test_a_drop_on_the_bus_never_drops_another_credential_s_client_nor_one_whose_key_is_its_own(
        two_nodes, peers, store):
    """The old node drops only a connection of the credential the message names, and only when
    the ID's key is no longer its own (a newer claim there wins)."""
    n1, n2 = two_nodes
    live = peers(n1)
    assert register(live, "X", FIRST).success
    record = store.get(keys.client_key("X"))
    store.set(keys.client_key("X"), json.dumps({"node": "n2", "credential": auth.fingerprint(FIRST)}))
    drop_then_wait(store, peers, two_nodes, "M1", [auth.fingerprint(SECOND), None])  # not X's credential
    assert n1.registry.get("X") is not None and still_open(live)
    store.set(keys.client_key("X"), record)
    drop_then_wait(store, peers, two_nodes, "M2", [auth.fingerprint(FIRST)])  # X's, but n1 holds the key
    assert n1.registry.get("X") is not None and still_open(live)


def drop_then_wait(store, peers, two_nodes, marker: str, credentials: list) -> None:
    """Publish ``drop`` for X to n1 with each credential, then wait until n1 has handled them: a
    real takeover of ``marker`` after them is handled after them (the bus is read in order)."""
    n1, n2 = two_nodes
    assert register(peers(n1), marker, FIRST).success
    for credential in credentials:
        assert store.publish(keys.channel("n1"), json.dumps({"type": "drop", "clientId": "X", "node": "n2",
                                                            "credential": credential})) == 1
    assert register(peers(n2), marker, FIRST).success
    wait_until(lambda: n1.registry.get(marker) is None)
    wait_until(lambda: not [t for t in threading.enumerate() if "cluster-drop-X" in t.name])


def still_open(peer: ControlPeer) -> bool:
    peer.send(p.Heartbeat(timestamp=42.0))
    return peer.recv_until(p.Heartbeat).timestamp == 42.0


def test_two_tokens_racing_for_one_id_on_two_nodes_one_wins(two_nodes, peers, store):
    from concurrent.futures import ThreadPoolExecutor
    n1, n2 = two_nodes
    for round_ in range(5):
        client_id = f"R{round_}"
        contenders = [(peers(n1), FIRST), (peers(n2), SECOND)]
        with ThreadPoolExecutor(2, thread_name_prefix="svc-race") as pool:
            replies = list(pool.map(lambda c: register(c[0], client_id, c[1]), contenders))
        assert sorted(r.success for r in replies) == [False, True], replies
        winner = n1 if replies[0].success else n2
        assert on_node(store, client_id) == ("n1" if winner is n1 else "n2")
        assert [n.registry.get(client_id) is not None for n in (n1, n2)] == [winner is n1, winner is n2]


# --- reservations after going offline, cluster-wide ------------------------------------------------

def goes_offline(peer: ControlPeer, server, client_id: str) -> None:
    peer.send(p.Unregister())
    assert peer.closed_by_relay(3.0)
    wait_until(lambda: server.registry.get(client_id) is None)


def test_an_id_that_went_offline_on_one_node_stays_reserved_for_its_token_on_the_others(
        redis_server, make_server, peers, store):
    n1, n2 = [make_server(cluster_url=redis_server.url, node_id=name, cluster_ttl=TTL,
                          extra_tokens=[FIRST, SECOND], id_reservation_time=600) for name in ("n1", "n2")]
    owner = peers(n1)
    assert register(owner, "X", FIRST).success
    goes_offline(owner, n1, "X")
    record = json.loads(store.get(keys.client_key("X")))
    assert record["node"] is None and record["credential"] == auth.fingerprint(FIRST)
    assert TTL * 1000 < store.pttl(keys.client_key("X")) <= 600_000, "kept for the reservation time, not the TTL"
    assert n2.cluster.client_ids() == [] and on_node(store, "X") is None, "reserved is not online"

    reply = register(peers(n2), "X", SECOND)
    assert not reply.success and reply.code == p.ID_TAKEN and "reserved for the token" in reply.error
    assert n2.registry.get("X") is None
    back = peers(n2)
    assert register(back, "X", FIRST, takeover=False).success, "its own token takes it back, on any node"
    assert on_node(store, "X") == "n2"
    assert store.zcard(keys.reservations(auth.fingerprint(FIRST))) == 0


def test_a_token_s_reservations_are_capped_cluster_wide_oldest_first(redis_server, make_server, peers, store):
    n1, n2 = [make_server(cluster_url=redis_server.url, node_id=name, cluster_ttl=TTL,
                          extra_tokens=[FIRST, SECOND], max_reserved_ids_per_token=2) for name in ("n1", "n2")]
    for client_id, node in (("I1", n1), ("I2", n1), ("I3", n2)):  # n1 alone holds two: within its own cap
        peer = peers(node)
        assert register(peer, client_id, FIRST).success
        goes_offline(peer, node, client_id)
    assert store.get(keys.client_key("I1")) is None, "the oldest reservation went for the cap"
    assert sorted(store.zrange(keys.reservations(auth.fingerprint(FIRST)), 0, -1)) == ["I2", "I3"]
    assert register(peers(n2), "I1", SECOND).success
    reply = register(peers(n2), "I2", SECOND)
    assert not reply.success and reply.code == p.ID_TAKEN
