"""What the nodes of a relay cluster share, in Redis: the node table, the client registry and
one pub/sub channel per node for control messages between nodes. No relayed byte goes here.

Keys (``chuantou:`` prefix, each with a TTL its owner refreshes while it lives, so a killed
node's keys vanish by themselves):

- ``node:<node id>``   JSON {id, advertise, clients, sessions, updatedAt}
- ``client:<client id>`` JSON {node, credential (token fingerprint or null), lastSeen}; once its client
  went offline, {node: null, credential, offlineSince}: the ID reserved for that credential
  (``idReservationTime``), indexed in ``reservedby:<credential>`` (zset id -> offline since)
- ``opened:<node id>`` hash {"<protocol>:<client id>": sessions that client opened, pumped on that node;
  "to:<client id>": sessions leading to that client}
- ``pending:<session id>`` JSON {id, a, b, dataNode, secretHashes, deadline}: a cross-node session
  waiting for its data channels (sha256 of both secrets, never the secrets), TTL = the join timeout
- ``pendingof:<client id>`` zset {session id, or ``t:<request>`` while the data node is asked:
  deadline in ms}: the sessions that client has pending in the cluster (its pending cap)
- channel ``bus:<node id>``: JSON messages for that node (see cluster.py for their types)

This module knows Redis and nothing of the relay; every call raises ``StoreUnreachable`` when
Redis cannot be reached, so callers decide what a missing store means.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from .cluster_scripts import CLAIM, FORGET_RESERVATION, PUBLISH_PENDING, RELEASE, SEND_TO_HOLDER

try:
    import redis
except ImportError:  # the extra is not installed: a relay without --cluster never imports us
    redis = None  # type: ignore[assignment]

PREFIX = "chuantou:"
# why a claim was not simply granted (see _CLAIM)
TAKEN, RESERVED, IN_USE, TOOK = "taken", "reserved", "in_use", "took"
CONNECT_TIMEOUT = 1.0  # a store that does not answer is treated as down, quickly
COMMAND_TIMEOUT = 2.0

@dataclass(frozen=True)
class PendingKey:
    """A cross-node session waiting for its data channels, as the store holds it (no secret in it)."""
    session_id: str
    client_a: str
    record: str  # JSON {id, a, b, dataNode, secretHashes: sha256 of A's and B's secrets, deadline}
    ttl_ms: int  # the join timeout
    deadline_ms: int  # epoch ms
    place: str  # the request's place in A's index, which the session takes


def _json_or_none(raw: bytes | str | None) -> dict | None:
    try:
        record = json.loads(raw) if raw else None
    except ValueError:  # not written by a node
        return None
    return record if isinstance(record, dict) else None


class StoreUnreachable(Exception):
    """Redis did not answer (down, refused, timed out)."""


def _guard(method):
    """Turn the redis package's connection errors into StoreUnreachable."""
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            raise StoreUnreachable(str(exc) or type(exc).__name__) from None
    wrapper.__name__ = method.__name__
    wrapper.__doc__ = method.__doc__
    return wrapper


class ClusterStore:
    def __init__(self, url: str, node_id: str, ttl: float):
        if redis is None:
            raise RuntimeError("--cluster needs the redis package: pip install chuantou[cluster]")
        self.node_id = node_id
        self.ttl_ms = max(1, int(ttl * 1000))
        self.redis = redis.Redis.from_url(url, socket_connect_timeout=CONNECT_TIMEOUT,
                                          socket_timeout=COMMAND_TIMEOUT, decode_responses=True)
        self._claim = self.redis.register_script(CLAIM)
        self._release = self.redis.register_script(RELEASE)
        self._forget_reservation = self.redis.register_script(FORGET_RESERVATION)
        self._send_to_holder = self.redis.register_script(SEND_TO_HOLDER)
        self._publish_pending = self.redis.register_script(PUBLISH_PENDING)

    @staticmethod
    def node_key(node_id: str) -> str:
        return f"{PREFIX}node:{node_id}"

    @staticmethod
    def client_key(client_id: str) -> str:
        return f"{PREFIX}client:{client_id}"

    @staticmethod
    def reservations(credential: str | None) -> str:
        return f"{PREFIX}reservedby:{credential or ''}"

    @staticmethod
    def pending_key(session_id: str) -> str:
        return f"{PREFIX}pending:{session_id}"

    @staticmethod
    def pending_index(client_id: str) -> str:
        return f"{PREFIX}pendingof:{client_id}"

    @staticmethod
    def channel(node_id: str) -> str:
        return f"{PREFIX}bus:{node_id}"

    def _client_record(self, credential: str | None) -> str:
        return json.dumps({"node": self.node_id, "credential": credential, "lastSeen": time.time()})

    # --- client registry ---------------------------------------------------------------------

    @_guard
    def claim(self, client_id: str, credential: str | None, takeover: bool = False) -> tuple[str, dict] | None:
        """Hold ``client_id`` for this node. None: granted; else (why, the holder's record): TAKEN,
        IN_USE, or TOOK (granted by taking it over: the holder was told to drop it, see _CLAIM)."""
        held = self._claim(keys=[self.client_key(client_id), self.reservations(credential)],
                           args=self._claim_args(client_id, credential, takeover))
        return (held[0], json.loads(held[1])) if held else None

    def _claim_args(self, client_id: str, credential: str | None, takeover: bool) -> list:
        drop = {"type": "drop", "clientId": client_id, "node": self.node_id, "credential": credential}
        return [self._client_record(credential), self.node_id, self.ttl_ms, credential or "",
                "1" if takeover else "0", self.channel(""), json.dumps(drop), client_id]

    @_guard
    def release(self, client_id: str, credential: str | None = None, reserve: float = 0.0,
                max_reserved: int = 0) -> list[str]:
        """Our client went offline: its record goes, or becomes a reservation of its ID for
        ``credential`` for ``reserve`` seconds (see RELEASE). Returns the IDs of that credential
        whose reservations were dropped to keep it within ``max_reserved``."""
        record = json.dumps({"node": None, "credential": credential, "offlineSince": time.time()})
        dropped = self._release(keys=[self.client_key(client_id), self.reservations(credential)],
                                args=[self.node_id, record, int(reserve * 1000), int(time.time() * 1000),
                                      max_reserved, client_id])
        if dropped:
            pipe = self.redis.pipeline(transaction=False)
            for old in dropped:
                self._forget_reservation(keys=[self.client_key(old)], args=[credential or ""], client=pipe)
            pipe.execute()
        return list(dropped or [])

    @_guard
    def lookup(self, client_id: str) -> dict | None:
        raw = self.redis.get(self.client_key(client_id))
        return json.loads(raw) if raw else None

    @_guard
    def client_ids(self, limit: int = 100_000) -> list[str]:
        """Every ID online somewhere in the cluster, not those only reserved (a SCAN and an MGET:
        for lists, not for each request)."""
        return sorted(self.client_nodes(limit)[0])

    @_guard
    def client_nodes(self, limit: int) -> tuple[dict[str, str], bool]:
        """{client ID: its node} for up to ``limit`` IDs online in the cluster, and whether there
        were more (a SCAN and an MGET: for the admin view, not for each request)."""
        start, keys = len(self.client_key("")), list[str]()
        for key in self.redis.scan_iter(match=self.client_key("*"), count=1000):
            if len(keys) == limit:
                return self._nodes_of(keys, start), True
            keys.append(key)
        return self._nodes_of(keys, start), False

    def _nodes_of(self, keys: list[str], start: int) -> dict[str, str]:
        found = {}
        for key, raw in zip(keys, self.redis.mget(keys) if keys else []):
            try:
                node = json.loads(raw).get("node") if raw else None
            except (ValueError, AttributeError):
                node = None
            if isinstance(node, str):
                found[key[start:]] = node
        return found

    # --- node table --------------------------------------------------------------------------

    @_guard
    def refresh(self, node: dict, clients: list[tuple[str, str | None]]) -> list[tuple[str, dict]]:
        """Write this node's record and re-claim each of its clients, in one round trip.
        Returns the (client ID, holder) pairs another node holds (after a store outage)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(self.node_key(self.node_id), json.dumps(node), px=self.ttl_ms)
        for client_id, credential in clients:  # never a takeover: a refresh only keeps what is ours
            self._claim(keys=[self.client_key(client_id), self.reservations(credential)],
                        args=self._claim_args(client_id, credential, False), client=pipe)
        replies = pipe.execute()
        return [(cid, json.loads(held[1])) for (cid, _), held in zip(clients, replies[1:]) if held]

    @_guard
    def share_opened(self, own: dict[tuple[str, str], int], others: list[str]) -> dict[tuple[str, str], int]:
        """Write the sessions each client opened on this node and sum those on ``others``, in one
        round trip: {(client, protocol): sessions on the other nodes} (cluster-wide caps)."""
        key = f"{PREFIX}opened:{self.node_id}"
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(key)
        if own:
            pipe.hset(key, mapping={f"{protocol}:{client}": count for (client, protocol), count in own.items()})
            pipe.pexpire(key, self.ttl_ms)
        for node_id in others:
            pipe.hgetall(f"{PREFIX}opened:{node_id}")
        replies = pipe.execute()[-len(others):] if others else []
        total: dict[tuple[str, str], int] = {}
        for fields in replies:
            for field, count in (fields or {}).items():
                protocol, _, client = str(field).partition(":")
                if client and str(count).isdigit():
                    total[client, protocol] = total.get((client, protocol), 0) + int(count)
        return total

    @_guard
    def node(self, node_id: str) -> dict | None:
        raw = self.redis.get(self.node_key(node_id))
        return json.loads(raw) if raw else None

    @_guard
    def nodes(self) -> list[dict]:
        keys = sorted(self.redis.scan_iter(match=self.node_key("*"), count=1000))
        return [record for record in map(_json_or_none, self.redis.mget(keys) if keys else []) if record]

    @_guard
    def forget_node(self) -> None:
        """A node stopping cleanly removes its record at once (a killed one's expires)."""
        self.redis.delete(self.node_key(self.node_id), f"{PREFIX}opened:{self.node_id}")

    # --- bus -----------------------------------------------------------------------------------

    @_guard
    def publish(self, node_id: str, message: dict, pending: PendingKey | None = None) -> int:
        """Send a message to a node's channel; returns how many subscribers got it (0: nobody
        listens). With ``pending``, that session's key is written in the same round trip."""
        if pending is None:
            return self.redis.publish(self.channel(node_id), json.dumps(message))
        return int(self._publish_pending(
            keys=[self.pending_key(pending.session_id), self.pending_index(pending.client_a)],
            args=[pending.record, pending.ttl_ms, pending.deadline_ms, pending.session_id, pending.place,
                  self.channel(node_id), json.dumps(message)]))

    @_guard
    def publish_to_holder(self, client_id: str, message: dict, client_a: str, cap: int, pending_here: int,
                          place: str, hold_ms: int) -> tuple[str | None, int, int, bool]:
        """Send a message to the node holding ``client_id`` (another node than this one) unless
        ``client_a`` has ``cap`` sessions pending in the cluster (``pending_here`` of them only on
        this node). Returns (that node or None when no other node holds it, subscribers that got
        it, A's pending sessions in the index, over the cap)."""
        now = int(time.time() * 1000)
        node, heard, pending, over = self._send_to_holder(
            keys=[self.client_key(client_id), self.pending_index(client_a)],
            args=[self.node_id, self.channel(""), json.dumps(message), cap, pending_here, now, place,
                  now + hold_ms, hold_ms])
        return node or None, int(heard), int(pending), bool(over)

    @_guard
    def forget_pending(self, entries: list[tuple[str, str]]) -> None:
        """Take (client A, session id or request place) out of the pending keys and A's index."""
        pipe = self.redis.pipeline(transaction=False)
        for client_a, member in entries:
            pipe.delete(self.pending_key(member))
            pipe.zrem(self.pending_index(client_a), member)
        pipe.execute()

    @_guard
    def pending_counts(self, clients: list[str]) -> dict[str, int]:
        """{client A: its sessions pending in the cluster's index}, expired ones dropped first."""
        now = int(time.time() * 1000)
        pipe = self.redis.pipeline(transaction=False)
        for client_a in clients:
            pipe.zremrangebyscore(self.pending_index(client_a), "-inf", now)
            pipe.zcard(self.pending_index(client_a))
        replies = pipe.execute()
        return {client_a: int(count) for client_a, count in zip(clients, replies[1::2])}

    @_guard
    def pending_sessions(self, limit: int) -> tuple[dict[str, int], bool]:
        """{data node: its pending cross-node sessions} over up to ``limit`` pending keys, and
        whether there were more (a SCAN and an MGET: for the admin view)."""
        keys = list[str]()
        for key in self.redis.scan_iter(match=self.pending_key("*"), count=1000):
            if len(keys) == limit:
                break
            keys.append(key)
        by_node: dict[str, int] = {}
        for record in map(_json_or_none, self.redis.mget(keys) if keys else []):
            node = record.get("dataNode") if record else None
            if isinstance(node, str):
                by_node[node] = by_node.get(node, 0) + 1
        return by_node, len(keys) == limit

    @_guard
    def subscribe(self):
        """A subscription to this node's channel; read it with ``receive``."""
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(self.channel(self.node_id))
        return pubsub

    @_guard
    def receive(self, pubsub, timeout: float) -> dict | None:
        message = pubsub.get_message(timeout=timeout)
        if message is None or message.get("type") != "message":
            return None
        try:
            return json.loads(message["data"])
        except ValueError:
            return None

    def close(self) -> None:
        self.redis.close()
