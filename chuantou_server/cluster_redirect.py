"""Registration redirects: a cluster node that holds clearly more clients than the least loaded
live node answers ``register`` with ``register_redirect`` to that node's advertised URL, so
clients that all start on one node (the first of their list, a DNS name) spread over the cluster.

Off unless ``redirect_margin`` (``--redirect-margin``, server.json ``redirectMargin``) is > 0:
a node redirects when it has at least that many more clients than the least loaded other
live node. Only a client that says it follows redirects (``register.followsRedirect``) is
redirected, and only after its proof was checked (a stranger learns no node addresses), and
never a client whose ID is registered here (a reconnect replacing its stale connection is
replaced here at once; elsewhere it would need a takeover through the bus, or be in use).

The node table is read from Redis at most once per ``TABLE_MAX_AGE`` (a burst of registrations
costs one read), and the redirects this node sent since a node last refreshed its record count
as that node's clients, so a burst does not all go to the one node that looked emptiest.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from common import handshake
from common import protocol as p

from .cluster_store import StoreUnreachable

if TYPE_CHECKING:
    from .cluster import Cluster

log = logging.getLogger("chuantou.server")

TABLE_MAX_AGE = 1.0  # seconds a read of the node table serves registrations


def least_loaded(own_id: str, own_clients: int, nodes: list[dict], margin: int, now: float,
                 max_age: float, scheme: str) -> dict | None:
    """The node to redirect to, or None: the other live node with the fewest clients (ties: the
    lowest ID), if this node has at least ``margin`` more. ``nodes`` are node-table records
    ({id, advertise, clients, updatedAt}); one older than ``max_age`` or whose advertised URL is
    not of ``scheme`` (the client's TLS settings hold for one scheme) is not a candidate."""
    candidates = [n for n in nodes if n.get("id") != own_id and _usable(n, now, max_age, scheme)]
    if margin <= 0 or not candidates:
        return None
    best = min(candidates, key=lambda n: (n["clients"], str(n["id"])))
    return best if own_clients - best["clients"] >= margin else None


def _usable(node: dict, now: float, max_age: float, scheme: str) -> bool:
    advertise, clients, updated = node.get("advertise"), node.get("clients"), node.get("updatedAt")
    if not isinstance(advertise, str) or not isinstance(clients, int) or not isinstance(updated, (int, float)):
        return False
    if len(advertise) > p.MAX_REDIRECT_URL or not p.REDIRECT_URL_PATTERN.match(advertise):
        return False
    return urlsplit(advertise).scheme == scheme and now - updated <= max_age


class Redirector:
    def __init__(self, cluster: Cluster, margin: int):
        self.cluster = cluster
        self.margin = margin
        self._lock = threading.Lock()
        self._table: list[dict] = []
        self._read_at = float("-inf")  # monotonic time of the last read of the node table
        self._sent: collections.deque[tuple[float, str]] = collections.deque()  # (time.time(), node) of each redirect

    def answer(self, msg: p.Register) -> p.RegisterRedirect | None:
        """The redirect for this (verified) register, or None to register it here."""
        cluster = self.cluster
        if self.margin <= 0 or not msg.followsRedirect or cluster.server.registry.get(msg.clientId) is not None:
            return None
        table = self._nodes()
        now = time.time()
        with self._lock:
            while self._sent and now - self._sent[0][0] > cluster.ttl:
                self._sent.popleft()
            loads = [dict(n, clients=n["clients"] + self._sent_since(n)) if isinstance(n.get("clients"), int) else n
                     for n in table]
            target = least_loaded(cluster.node_id, len(cluster.server.registry), loads, self.margin, now,
                                  cluster.ttl, urlsplit(cluster.advertise).scheme)
            if target is None:
                return None
            self._sent.append((now, target["id"]))
        log.info("redirecting client %s to relay node %s (%s): this node has %d clients, that one %d",
                 msg.clientId, target["id"], target["advertise"], len(cluster.server.registry), target["clients"])
        return handshake.redirect_for(target["advertise"], target["id"],
                                      f"relay node {cluster.node_id} is more loaded than node {target['id']}")

    def _sent_since(self, node: dict) -> int:
        """Redirects to ``node`` sent after its record was written (its clients do not show yet)."""
        updated = node.get("updatedAt")
        if not isinstance(updated, (int, float)):
            return 0
        return sum(1 for at, node_id in self._sent if node_id == node.get("id") and at > updated)

    def _nodes(self) -> list[dict]:
        with self._lock:
            if time.monotonic() - self._read_at < TABLE_MAX_AGE:
                return self._table
        try:
            table = self.cluster.store.nodes()
        except StoreUnreachable:
            table = []  # no view of the others: register here
        with self._lock:
            self._table, self._read_at = table, time.monotonic()
        return table
