"""What the nodes of a relay cluster share, in Redis: the node table, the client registry and
one pub/sub channel per node for control messages between nodes. No relayed byte goes here.

Keys (``chuantou:`` prefix, each with a TTL its owner refreshes while it lives, so a killed
node's keys vanish by themselves):

- ``node:<node id>``   JSON {id, advertise, clients, sessions, updatedAt}
- ``client:<client id>`` JSON {node, credential (token fingerprint or null), lastSeen}
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

try:
    import redis
except ImportError:  # the extra is not installed: a relay without --cluster never imports us
    redis = None  # type: ignore[assignment]

PREFIX = "chuantou:"
# why a claim was not simply granted (see _CLAIM)
TAKEN, IN_USE, TOOK = "taken", "in_use", "took"
CONNECT_TIMEOUT = 1.0  # a store that does not answer is treated as down, quickly
COMMAND_TIMEOUT = 2.0

# Claim an ID for this node unless another node holds it (atomic: two nodes racing for one ID
# cannot both win). ARGV: record, node, TTL in ms, credential ('' for none), takeover ('1'/'0'),
# channel prefix, the message that tells the holder to drop it. Returns nil when granted; else
# {why, the holder's record}: 'taken' (another credential), 'in_use' (same credential, no
# takeover) or 'took' (same credential, takeover: granted, and the holder was told on its channel).
_CLAIM = """
local cur = redis.call('GET', KEYS[1])
if cur then
  local ok, held = pcall(cjson.decode, cur)
  if ok and type(held) == 'table' and held['node'] ~= ARGV[2] then
    local cred = held['credential']
    if type(cred) ~= 'string' then cred = '' end
    if cred ~= ARGV[4] then return {'taken', cur} end
    if ARGV[5] ~= '1' or type(held['node']) ~= 'string' then return {'in_use', cur} end
    redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
    redis.call('PUBLISH', ARGV[6] .. held['node'], ARGV[7])
    return {'took', cur}
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
return false
"""
# Delete an ID's record only if this node still holds it.
_RELEASE = """
local cur = redis.call('GET', KEYS[1])
if cur then
  local ok, held = pcall(cjson.decode, cur)
  if ok and held['node'] == ARGV[1] then redis.call('DEL', KEYS[1]) return 1 end
end
return 0
"""


# Find the node holding B's ID and publish ``connect`` to it, in one round trip (the set-up of a
# cross-node session waits for it), unless A already has too many sessions pending in the
# cluster: those in A's pending index (KEYS[2], zset member -> deadline in ms) plus ARGV[5], A's
# pending ones on this node that the index does not hold. A granted request holds a place in the
# index (ARGV[7], until ARGV[8]) until the data node puts the session itself there.
# Returns {holder node or '', subscribers that got it, A's pending sessions in the index, 1: over the cap}.
_SEND_TO_HOLDER = """
local cur = redis.call('GET', KEYS[1])
if not cur then return {'', 0, 0, 0} end
local ok, held = pcall(cjson.decode, cur)
if not ok or type(held) ~= 'table' or type(held['node']) ~= 'string' or held['node'] == ARGV[1] then
  return {'', 0, 0, 0}
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[6])
local pending = redis.call('ZCARD', KEYS[2])
if pending + tonumber(ARGV[5]) >= tonumber(ARGV[4]) then return {held['node'], 0, pending, 1} end
redis.call('ZADD', KEYS[2], ARGV[8], ARGV[7])
if redis.call('PTTL', KEYS[2]) < tonumber(ARGV[9]) then redis.call('PEXPIRE', KEYS[2], ARGV[9]) end
return {held['node'], redis.call('PUBLISH', ARGV[2] .. held['node'], ARGV[3]), pending + 1, 0}
"""
# The data node's first message about a new cross-node session, with the session's pending key
# (KEYS[1]) written and A's index (KEYS[2]) moved from the request's place to the session, in
# the same round trip. Returns the subscribers that got the message.
_PUBLISH_PENDING = """
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('ZREM', KEYS[2], ARGV[5])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[4])
if redis.call('PTTL', KEYS[2]) < tonumber(ARGV[2]) then redis.call('PEXPIRE', KEYS[2], ARGV[2]) end
return redis.call('PUBLISH', ARGV[6], ARGV[7])
"""


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
        self._claim = self.redis.register_script(_CLAIM)
        self._release = self.redis.register_script(_RELEASE)
        self._send_to_holder = self.redis.register_script(_SEND_TO_HOLDER)
        self._publish_pending = self.redis.register_script(_PUBLISH_PENDING)

    @staticmethod
    def node_key(node_id: str) -> str:
        return f"{PREFIX}node:{node_id}"

    @staticmethod
    def client_key(client_id: str) -> str:
        return f"{PREFIX}client:{client_id}"

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
        held = self._claim(keys=[self.client_key(client_id)],
                           args=self._claim_args(client_id, credential, takeover))
        return (held[0], json.loads(held[1])) if held else None

    def _claim_args(self, client_id: str, credential: str | None, takeover: bool) -> list:
        drop = {"type": "drop", "clientId": client_id, "node": self.node_id, "credential": credential}
        return [self._client_record(credential), self.node_id, self.ttl_ms, credential or "",
                "1" if takeover else "0", self.channel(""), json.dumps(drop)]

    @_guard
    def release(self, client_id: str) -> None:
        self._release(keys=[self.client_key(client_id)], args=[self.node_id])

    @_guard
    def lookup(self, client_id: str) -> dict | None:
        raw = self.redis.get(self.client_key(client_id))
        return json.loads(raw) if raw else None

    @_guard
    def client_ids(self) -> list[str]:
        """Every ID online somewhere in the cluster (a SCAN: for lists, not for each request)."""
        start = len(self.client_key(""))
        return sorted(key[start:] for key in self.redis.scan_iter(match=self.client_key("*"), count=1000))

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
            self._claim(keys=[self.client_key(client_id)], args=self._claim_args(client_id, credential, False),
                        client=pipe)
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
