"""A cluster node's view of the other nodes: the node table as last read from Redis (each node's
advertised address and load), the nodes seen before whose key has expired, and the data-node
policy's choice among them.

The table is read by the refresher every TTL/3 (and by each status request), so the loads it
holds are a few seconds old at most; between two reads a node adds the sessions it placed on
others itself, so a burst of set-ups is spread rather than sent to one node.

Node records are written by other nodes (possibly of another version): every field is checked
before use, and a record without a string ``id`` is ignored.
"""

from __future__ import annotations

import threading
import time

from common.logsafe import escape_controls

LIVE, EXPIRED = "live", "expired"
B_NODE, LEAST_LOADED = "b", "least-loaded"
KEEP_EXPIRED = 300.0  # seconds an expired node stays listed
MAX_EXPIRED = 256
LOAD_FIELDS = ("clients", "sessions", "bytesPerSecond")


def _number(value: object) -> float:
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0 else 0


def clean_record(raw: object) -> dict | None:
    """The fields of a node record we use, each of the type we expect, or None."""
    if not isinstance(raw, dict) or not isinstance(raw.get("id"), str) or not raw["id"]:
        return None
    advertise = raw.get("advertise")
    # a record missing its load (another version, a hand-written key) is listed, never chosen
    complete = isinstance(advertise, str) and all(
        isinstance(raw.get(f), (int, float)) and not isinstance(raw.get(f), bool) for f in LOAD_FIELDS)
    # shown on a terminal (status) and a page: no control characters, bounded length
    return {"id": escape_controls(raw["id"][:128]),
            "advertise": escape_controls(advertise[:300]) if isinstance(advertise, str) else "",
            **{field: _number(raw.get(field)) for field in (*LOAD_FIELDS, "updatedAt")}, "complete": complete}


class NodeTable:
    def __init__(self, node_id: str):
        self.node_id = node_id
        self._lock = threading.Lock()
        self._live: dict[str, dict] = {}
        self._expired: dict[str, tuple[dict, float]] = {}  # id -> (last record, monotonic time it went)
        self._placed: dict[str, int] = {}  # sessions this node placed on each node since the last read

    def update(self, records: list) -> list[dict]:
        """Take a fresh read of the node table; returns its live records (cleaned)."""
        fresh = {rec["id"]: rec for rec in map(clean_record, records) if rec is not None}
        now = time.monotonic()
        with self._lock:
            for node_id, record in self._live.items():
                if node_id not in fresh:
                    self._expired[node_id] = (record, now)
            for node_id in fresh:
                self._expired.pop(node_id, None)
            for node_id, (_, gone) in list(self._expired.items()):
                if now - gone > KEEP_EXPIRED:
                    del self._expired[node_id]
            while len(self._expired) > MAX_EXPIRED:
                del self._expired[next(iter(self._expired))]
            self._live = fresh
            self._placed.clear()
            return list(fresh.values())

    def live_ids(self) -> set[str]:
        with self._lock:
            return set(self._live)

    def rows(self) -> list[dict]:
        """Every node known: live ones with their load, then expired ones (their last load)."""
        with self._lock:
            live = [{**rec, "state": LIVE} for rec in self._live.values()]
            expired = [{**rec, "state": EXPIRED} for rec, _ in self._expired.values()]
        return sorted(live, key=lambda r: r["id"]) + sorted(expired, key=lambda r: r["id"])

    # --- the data-node policy -------------------------------------------------------------------

    def choose(self, policy: str, own_sessions: int) -> str:
        """Where a session whose B is on this node is pumped: this node (B's), or under
        ``least-loaded`` the live node with the fewest sessions (ties: this node)."""
        if policy != LEAST_LOADED:
            return self.node_id
        with self._lock:
            best, fewest = self.node_id, own_sessions
            for node_id, record in sorted(self._live.items()):
                load = record["sessions"] + self._placed.get(node_id, 0)
                if node_id != self.node_id and record["complete"] and load < fewest:
                    best, fewest = node_id, load
            if best != self.node_id:
                self._placed[best] = self._placed.get(best, 0) + 1
            return best


MAX_LISTED_CLIENTS = 5000  # the admin view lists at most this many of the cluster's clients


def clients_view(store, own_node: str) -> dict:
    """The API's cluster clients: which node each is on (from the registry in Redis)."""
    from .cluster_store import StoreUnreachable
    try:
        found, more = store.client_nodes(MAX_LISTED_CLIENTS)
    except StoreUnreachable:
        return {"clients": [], "truncated": False}
    rows = [{"id": escape_controls(cid[:128]), "node": escape_controls(node[:128]), "here": node == own_node}
            for cid, node in sorted(found.items())]
    return {"clients": rows, "truncated": more}


def status_lines(view: dict) -> list[str]:
    """The cluster part of ``python -m chuantou_server status``, from the API's status["cluster"]."""
    lines = [f"  cluster:    node {view.get('node')} ({view.get('advertise')}), data node policy "
             f"{view.get('dataNode', B_NODE)}, store {view.get('store')}"]
    for node in view.get("table", []):
        mark = "*" if node.get("id") == view.get("node") else " "
        lines.append(f"   {mark} {node.get('id', '?'):<16} {node.get('state', '?'):<8} "
                     f"clients {int(_number(node.get('clients'))):>6}  sessions {int(_number(node.get('sessions'))):>6}"
                     f"  {_rate(_number(node.get('bytesPerSecond')))}  {node.get('advertise', '')}")
    return lines


def _rate(value: float) -> str:
    for unit in ("B/s", "KiB/s", "MiB/s", "GiB/s"):
        if value < 1024 or unit == "GiB/s":
            return f"{value:7.1f} {unit:<5}"
        value /= 1024
    return ""  # not reached
