"""A relay cluster on a real Redis Cluster (three cluster-mode redis-servers, three masters, on
loopback): every multi-key step of the store names keys of one slot, so nothing fails with
CROSSSLOT; relay nodes reach it by ``redis+cluster://``, each through another master.

The registration, identity and pending-cap tests of test_cluster_identity.py and
test_cluster_pending.py run here again, against the Cluster (their ``redis_server`` is this
module's), beside a cross-node session carrying data intact and the URL's checks.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

from chuantou_server import cluster_keys as keys
from chuantou_server.app import make_server as server_from_settings
from chuantou_server.cli import build_parser, make_app
from chuantou_server.cluster_store import ClusterStore, StoreUnreachable
from common.errors import ChuantouError

from helpers import TcpService, connect, exchange, exchange_handler, free_port, random_bytes, sha256, wait_until
from test_cluster import REDIS_SERVER, TTL, RedisProcess, on_node
import test_cluster_identity
import test_cluster_pending

redis = pytest.importorskip("redis", reason="the cluster extra is not installed (pip install chuantou[cluster])")
from redis.cluster import RedisCluster, key_slot  # noqa: E402  (after the importorskip)

REDIS_CLI = shutil.which("redis-cli")
pytestmark = pytest.mark.skipif(REDIS_SERVER is None or REDIS_CLI is None,
                                reason="redis-server and redis-cli are not installed (apt-get install redis-server)")
MiB = 1024 * 1024
MASTERS = 3


class RedisClusterProcesses:
    """Three cluster-mode redis-servers (RedisProcess each, with its own bus port), joined by
    ``redis-cli --cluster create`` into one Redis Cluster of three masters and no replicas."""

    def __init__(self, tmp_path):
        self.masters = []
        for i in range(MASTERS):
            (tmp_path / f"m{i}").mkdir()
            self.masters.append(RedisProcess(tmp_path / f"m{i}", "--cluster-enabled", "yes", "--cluster-config-file",
                                             "nodes.conf", "--cluster-port", str(free_port()),
                                             "--cluster-node-timeout", "3000"))

    def url_of(self, i: int) -> str:
        return f"redis+cluster://127.0.0.1:{self.masters[i].port}"

    @property
    def url(self) -> str:
        return self.url_of(0)

    def start(self) -> "RedisClusterProcesses":
        for master in self.masters:
            master.start()
        subprocess.run([REDIS_CLI, "--cluster", "create", *(f"127.0.0.1:{m.port}" for m in self.masters),
                        "--cluster-replicas", "0", "--cluster-yes"],
                       check=True, timeout=30, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(self._all_ok, timeout=20, interval=0.05, message="every master says cluster_state:ok")
        return self

    def _all_ok(self) -> bool:
        for master in self.masters:
            probe = master.client()
            try:
                info = probe.cluster("info")
            except redis.RedisError:
                return False
            finally:
                probe.close()
            if info.get("cluster_state") != "ok" or int(info.get("cluster_known_nodes", 0)) != MASTERS:
                return False
        return True

    def flush(self) -> None:
        for master in self.masters:
            probe = master.client()
            try:
                probe.flushall()
            finally:
                probe.close()

    def stop(self) -> None:
        for master in self.masters:
            master.stop()

    def client(self) -> RedisCluster:
        return RedisCluster(host="127.0.0.1", port=self.masters[0].port, decode_responses=True,
                            socket_connect_timeout=1, socket_timeout=2)


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory):
    cluster = RedisClusterProcesses(tmp_path_factory.mktemp("redis-cluster"))
    try:
        yield cluster.start()
    finally:
        cluster.stop()
    assert all(m.proc is None for m in cluster.masters)


@pytest.fixture
def redis_server(redis_cluster):
    """The Cluster, emptied, in the place of test_cluster.py's one redis-server."""
    redis_cluster.flush()
    return redis_cluster


@pytest.fixture
def store(redis_server):
    client = redis_server.client()
    yield client
    client.close()


# the same tests as on one Redis, with their fixtures, against the Cluster
two_nodes = test_cluster_identity.two_nodes
test_the_old_node_s_client_is_told_replaced_and_closed = \
    test_cluster_identity.test_the_old_node_s_client_is_told_replaced_and_closed
test_another_token_cannot_take_over_on_another_node = \
    test_cluster_identity.test_another_token_cannot_take_over_on_another_node
test_without_takeover_the_same_token_is_in_use = test_cluster_identity.test_without_takeover_the_same_token_is_in_use
test_an_id_that_went_offline_on_one_node_stays_reserved_for_its_token_on_the_others = \
    test_cluster_identity.test_an_id_that_went_offline_on_one_node_stays_reserved_for_its_token_on_the_others
test_a_token_s_reservations_are_capped_cluster_wide_oldest_first = \
    test_cluster_identity.test_a_token_s_reservations_are_capped_cluster_wide_oldest_first
test_a_pending_cross_node_session_is_a_key_without_secrets_until_it_joins = \
    test_cluster_pending.test_a_pending_cross_node_session_is_a_key_without_secrets_until_it_joins
test_the_pending_cap_per_client_holds_across_nodes = \
    test_cluster_pending.test_the_pending_cap_per_client_holds_across_nodes


# --- the key layout ---------------------------------------------------------------------------------

def test_the_keys_of_each_script_and_transaction_share_a_slot_and_clients_spread():
    a, sid, fingerprint = "A", "0123abcd", "1a2b3c4d"
    one_slot = [
        [keys.pending_key(a, sid), keys.pending_index(a)],  # PUBLISH_PENDING, forget_pending
        [keys.node_key("n1"), keys.opened_key("n1"), keys.opened_key("n2"), keys.NODE_INDEX],  # share_opened, nodes
    ]
    for names in one_slot:
        assert len({key_slot(name.encode()) for name in names}) == 1, names
    assert key_slot(keys.client_key(a).encode()) == key_slot(a.encode()), "the tag is exactly the ID"
    assert key_slot(keys.reservations(fingerprint).encode()) == key_slot(fingerprint.encode())
    assert len({key_slot(keys.client_key(f"c{i}").encode()) for i in range(100)}) > 90, "clients spread"


# --- registration and the node table -----------------------------------------------------------------

def on_other_master(store, than: str, candidates) -> str:
    """The first of ``candidates`` whose record lives on another master than ``than``'s."""
    taken = store.get_node_from_key(keys.client_key(than)).port
    return next(c for c in candidates if store.get_node_from_key(keys.client_key(c)).port != taken)


def test_clients_on_two_nodes_register_and_each_node_sees_both(redis_server, make_server, make_client, store):
    n1 = make_server(cluster_url=redis_server.url_of(0), node_id="n1", cluster_ttl=TTL)
    n2 = make_server(cluster_url=redis_server.url_of(1), node_id="n2", cluster_ttl=TTL)
    assert n1.cluster.store.clustered and n2.cluster.store.clustered
    b_id = on_other_master(store, "A", ["B"] + [f"B{i}" for i in range(20)])
    make_client(n1, "A")
    make_client(n2, b_id)
    wait_until(lambda: on_node(store, "A") == "n1" and on_node(store, b_id) == "n2")
    assert 0 < store.pttl(keys.client_key("A")) <= TTL * 1000
    for node in (n1, n2):
        status = node.cluster.status()
        assert status["store"] == "reachable" and sorted(r["id"] for r in status["nodes"]) == ["n1", "n2"]
        assert node.cluster.client_ids() == sorted(["A", b_id]), "a SCAN of every master"
    n2.stop()
    assert store.get(keys.node_key("n2")) is None and store.get(keys.client_key(b_id)) is None
    assert [r["id"] for r in n1.cluster.status()["nodes"]] == ["n1"]


# --- a cross-node session ----------------------------------------------------------------------------

@pytest.mark.timeout(90)
def test_a_cross_node_session_carries_data_intact_both_ways(redis_server, make_server, make_client, services,
                                                             store):
    n1 = make_server(cluster_url=redis_server.url_of(0), node_id="n1", cluster_ttl=TTL)
    n2 = make_server(cluster_url=redis_server.url_of(2), node_id="n2", cluster_ttl=TTL)
    b_id = on_other_master(store, "A", ["B"] + [f"B{i}" for i in range(20)])
    a = make_client(n1, "A")
    make_client(n2, b_id)
    wait_until(lambda: on_node(store, "A") == "n1" and on_node(store, b_id) == "n2")
    upload, download = random_bytes(8 * MiB), random_bytes(8 * MiB)
    service = services(TcpService(exchange_handler(download), "exchange"))
    proxy = a.create_proxy(0, b_id, service.port, protocol="tcp")
    with connect(proxy.local_port, timeout=60) as user:
        received = exchange(user, upload)
    assert received == (sha256(download), len(download)), "the download differs"
    wait_until(lambda: service.results)
    assert service.results == [{"received": (sha256(upload), len(upload))}], "the upload differs"
    wait_until(lambda: len(n1.sessions) == 0 and len(n2.sessions) == 0)
    wait_until(lambda: not list(store.scan_iter(match=keys.PENDING_KEYS)), timeout=3,
               message="the joined session's pending key is taken out (within a bus poll)")
    proxy.close()


# --- the URL -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("url, fix", [
    ("redis-cluster://127.0.0.1:7000", "write redis+cluster://"),
    ("redis+cluster://127.0.0.1:7000/2", "only database 0: write redis+cluster://127.0.0.1:7000"),
    ("redis+cluster://", "names no host"),
    ("redis+cluster://:hunter2@127.0.0.1:x", "must look like"),
    ("http://127.0.0.1:7000", "redis+cluster://HOST:6379"),
])
def test_a_bad_cluster_url_is_refused_with_the_fix(tmp_path, url, fix):
    (tmp_path / "server.json").write_text("{}")
    args = build_parser().parse_args(["--cluster", url, "--config", str(tmp_path / "server.json")])
    with pytest.raises(ChuantouError, match="(?i)cluster URL") as refused:
        server_from_settings(make_app(args).settings)
    assert fix in str(refused.value) and "hunter2" not in str(refused.value)


def test_a_node_starts_while_the_cluster_is_unreachable(make_server):
    url = f"redis+cluster://127.0.0.1:{free_port()}"
    with pytest.raises(StoreUnreachable, match="cannot be connected"):
        ClusterStore(url, "n0", TTL).nodes()
    node = make_server(cluster_url=url, node_id="n0", cluster_ttl=TTL)
    assert node.cluster.status()["store"] == "cluster store unreachable" and not node.cluster.reachable
