"""What the nodes of a relay cluster share, in Redis: the node table, the client registry and
one pub/sub channel per node for control messages between nodes. No relayed byte goes here.

Keys (``chuantou:`` prefix, each with a TTL its owner refreshes while it lives, so a killed
node's keys vanish by themselves):

- ``node:<node id>``   JSON {id, advertise, clients, sessions, updatedAt}
- ``client:<client id>`` JSON {node, credential (token fingerprint or null), lastSeen}
- ``opened:<node id>`` hash {"<protocol>:<client id>": sessions that client opened, pumped on that node;
  "to:<client id>": sessions leading to that client}
- channel ``bus:<node id>``: JSON messages for that node (see cluster.py for their types)

This module knows Redis and nothing of the relay; every call raises ``StoreUnreachable`` when
Redis cannot be reached, so callers decide what a missing store means.
"""

from __future__ import annotations

import json
import time

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


# Find the node holding an ID and publish a message to it, in one round trip (the set-up of a
# cross-node session waits for it). Returns {holder node or '', subscribers that got it}.
_SEND_TO_HOLDER = """
local cur = redis.call('GET', KEYS[1])
if not cur then return {'', 0} end
local ok, held = pcall(cjson.decode, cur)
if not ok or type(held['node']) ~= 'string' or held['node'] == ARGV[1] then return {'', 0} end
return {held['node'], redis.call('PUBLISH', ARGV[2] .. held['node'], ARGV[3])}
"""


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

    @staticmethod
    def node_key(node_id: str) -> str:
        return f"{PREFIX}node:{node_id}"

    @staticmethod
    def client_key(client_id: str) -> str:
        return f"{PREFIX}client:{client_id}"

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
    def publish(self, node_id: str, message: dict) -> int:
        """Send a message to a node's channel; returns how many subscribers got it (0: nobody listens)."""
        return self.redis.publish(self.channel(node_id), json.dumps(message))

    @_guard
    def publish_to_holder(self, client_id: str, message: dict) -> tuple[str | None, int]:
        """Send a message to the node holding ``client_id`` (another node than this one).
        Returns (that node or None when no other node holds it, subscribers that got it)."""
        node, heard = self._send_to_holder(keys=[self.client_key(client_id)],
                                           args=[self.node_id, self.channel(""), json.dumps(message)])
        return node or None, int(heard)

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
