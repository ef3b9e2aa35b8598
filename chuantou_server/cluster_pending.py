"""Pending cross-node sessions in the cluster store (part of ``Cluster``, cluster.py), and the
per-client cap on them (``maxPendingSessionsPerClient``) across nodes.

A cross-node session waiting for its data channels is ``pending:<session id>`` in Redis (id, A,
B, data node, sha256 of both secrets, deadline; TTL the join timeout) and a member of A's index
``pendingof:<A>``. No round trip is added to a set-up for them:

- A's node counts A's pending sessions in the script that already finds B's node and sends it
  ``connect``: A's index, plus A's pending sessions on A's node that the index does not hold
  (those between two local clients, which never touch Redis). At the cap it refuses A; else the
  request takes a place in the index (``t:<ticket>``) until the data node answers.
- The data node writes the key and moves the place to the session in the script that publishes
  its first message about it (``created`` to A's node, or ``offer`` to B's when it is A's node).
- The bus thread deletes the keys of sessions that joined or closed, in one pipeline, within a
  bus poll (0.5 s) of the join; A's node drops the place of a refused or timed-out request. A
  key nobody deletes (its node died) expires with the join timeout.

A session between two clients of A's node is checked against A's pending sessions on that node
plus those elsewhere as last read (at A's last cross-node request or refresh, TTL/3 at most).
"""

from __future__ import annotations

import collections
import hashlib
import json
import threading
import time
from typing import TYPE_CHECKING

from .cluster_store import ClusterStore, PendingKey, StoreUnreachable

if TYPE_CHECKING:
    from .server import Server
    from .sessions import Session

REQUEST_HOLD = 10.0  # a request's place in A's index lasts as long as its ticket (cluster.REQUEST_TIMEOUT)
VIEW_LIMIT = 5000  # pending keys read for /api/cluster


class PendingSide:
    # set by Cluster.__init__
    server: Server
    node_id: str
    store: ClusterStore
    _lock: threading.Lock

    def _mark(self, reachable: bool, why: str = "") -> None:
        raise NotImplementedError

    def _init_pending(self) -> None:
        self._pending_here: dict[str, Session] = {}  # cross-node sessions pumped here, not joined yet
        self._hosted_by: collections.Counter[str] = collections.Counter()  # client A -> of those
        self._pending_seen: dict[str, int] = {}  # our client A -> its pending sessions in the index, as last read
        self._forget: list[tuple[str, str]] = []  # (client A, session id or request place) to take out

    # --- A's node ------------------------------------------------------------------------------

    def pending_request(self, client_a: str) -> tuple[int, int]:
        """(the cap, A's pending sessions on this node that A's index does not hold) for A's request."""
        with self._lock:
            hosted = self._hosted_by.get(client_a, 0)
        return self.server.caps.pending_per_client, max(0, self.server.sessions.unjoined_by(client_a) - hosted)

    def pending_read(self, client_a: str, count: int) -> None:
        with self._lock:
            self._pending_seen[client_a] = count

    def pending_elsewhere(self, client_a: str) -> int:
        """A's pending sessions the index holds that this node does not pump (for SessionCaps)."""
        with self._lock:
            return max(0, self._pending_seen.get(client_a, 0) - self._hosted_by.get(client_a, 0))

    def drop_request_place(self, client_a: str | None, ticket: str) -> None:
        if client_a:
            with self._lock:
                self._forget.append((client_a, f"t:{ticket}"))

    # --- the data node -------------------------------------------------------------------------

    def pending_key(self, session: Session, message: dict) -> PendingKey:
        """The key of a session made here for a party elsewhere; from now until it joins, ours to delete."""
        join_timeout = self.server.config.session_join_timeout
        deadline = time.time() + join_timeout
        record = {"id": session.id, "a": session.client_a, "b": session.client_b, "dataNode": self.node_id,
                  "secretHashes": [_sha256(session.secret_a), _sha256(session.secret_b)],
                  "deadline": round(deadline, 3)}
        with self._lock:
            self._pending_here[session.id] = session
            self._hosted_by[session.client_a] += 1
        return PendingKey(session.id, session.client_a, json.dumps(record), max(1, int(join_timeout * 1000)),
                          int(deadline * 1000), f"t:{message['ticket']}")

    # --- upkeep ----------------------------------------------------------------------------------

    def _sweep_pending(self) -> None:
        """On the bus thread: delete the keys of sessions that joined or closed since the last look."""
        with self._lock:
            done = [s for s in self._pending_here.values() if s.joined or s.closed]
            for session in done:
                del self._pending_here[session.id]
                self._hosted_by[session.client_a] -= 1
                if self._hosted_by[session.client_a] <= 0:
                    del self._hosted_by[session.client_a]
            entries, self._forget = self._forget + [(s.client_a, s.id) for s in done], []
        if not entries:
            return
        try:
            self.store.forget_pending(entries)
        except StoreUnreachable as exc:
            self._mark(False, str(exc))  # they expire with the join timeout

    def _refresh_pending_seen(self) -> None:
        """On the refresher: read again the counts of our clients that had pending sessions."""
        with self._lock:
            seen = [c for c, n in self._pending_seen.items() if n > 0]
        clients = [c for c in seen if self.server.registry.get(c) is not None]
        try:
            counts = self.store.pending_counts(clients) if clients else {}
        except StoreUnreachable:
            counts = {}  # each node's own count still holds
        with self._lock:
            self._pending_seen = {c: n for c, n in counts.items() if n > 0}

    def _forget_all_pending(self) -> None:
        """A node stopping takes its pending keys out (its sessions end with it)."""
        with self._lock:
            for session in self._pending_here.values():
                self._forget.append((session.client_a, session.id))
            self._pending_here.clear()
            self._hosted_by.clear()
        self._sweep_pending()

    def pending_view(self) -> dict:
        """For /api/cluster: the cluster's pending cross-node sessions by data node."""
        try:
            by_node, truncated = self.store.pending_sessions(VIEW_LIMIT)
        except StoreUnreachable:
            return {}
        return {"pendingSessions": sum(by_node.values()), "pendingByNode": by_node,
                **({"pendingTruncated": True} if truncated else {})}


def _sha256(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()
