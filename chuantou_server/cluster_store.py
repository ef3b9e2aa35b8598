"""What the nodes of a relay cluster share, in Redis: the node table, the client registry and
one pub/sub channel per node for control messages between nodes. No relayed byte goes here.

Keys (named in cluster_keys.py; each with a TTL its owner refreshes while it lives, so a killed
node's keys vanish by themselves):

- a node's record: JSON {id, advertise, clients, sessions, updatedAt}, listed in the node index
- a client's record: JSON {node, credential (token fingerprint or null), lastSeen}; once its client
  went offline, {node: null, credential, offlineSince}: the ID reserved for that credential
  (``idReservationTime``), indexed in that credential's reservations (zset id -> offline since)
- ``opened`` per node: hash {"<protocol>:<client id>": sessions that client opened, pumped on that
  node; "to:<client id>": sessions leading to that client}
- a pending session: JSON {id, a, b, dataNode, secretHashes, deadline}: a cross-node session
  waiting for its data channels (sha256 of both secrets, never the secrets), TTL = the join timeout
- A's pending index: zset {session id, or ``t:<request>`` while the data node is asked: deadline
  in ms}: the sessions that client has pending in the cluster (its pending cap)
- channel ``bus:<node id>``: JSON messages for that node (see cluster.py for their types)

The store is one Redis or a Redis Cluster (cluster_url.py has the URLs). Every multi-key step
names keys of one slot, so both behave alike. On a Cluster the cross-node set-up costs two round
trips more: B's record and A's index are two slots, and the store publishes after a script
rather than in it (cluster_scripts.py says why).

This module knows Redis and nothing of the relay; every call raises ``StoreUnreachable`` when
Redis cannot be reached, so callers decide what a missing store means.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from typing import Any

from . import cluster_keys as keys
from .cluster_url import split, url_problem
from .cluster_scripts import CLAIM, FORGET_RESERVATION, PUBLISH_PENDING, RELEASE, RESERVE, SEND_TO_HOLDER

try:
    import redis
    import redis.cluster
    from redis.backoff import ExponentialBackoff
    from redis.retry import Retry
except ImportError:  # the extra is not installed: a relay without --cluster never imports us
    redis = None  # type: ignore[assignment]

PREFIX = keys.PREFIX
# why a claim was not simply granted (see CLAIM)
TAKEN, RESERVED, IN_USE, TOOK = "taken", "reserved", "in_use", "took"
CONNECT_TIMEOUT = 1.0  # a store that does not answer is treated as down, quickly
COMMAND_TIMEOUT = 2.0
CLUSTER_RETRIES = 2

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


def _unreachable(exc: BaseException) -> bool:
    if isinstance(exc, (redis.ConnectionError, redis.TimeoutError, OSError, redis.exceptions.ClusterDownError,
                        redis.exceptions.TryAgainError, redis.exceptions.SlotNotCoveredError)):
        return True
    # the Cluster client found no node to ask (at its start, or all of them gone)
    return isinstance(exc, redis.exceptions.RedisClusterException) and "cannot be connected" in str(exc)


def _guard(method):
    """Turn the redis package's connection errors into StoreUnreachable."""
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except Exception as exc:
            if _unreachable(exc):
                raise StoreUnreachable(str(exc) or type(exc).__name__) from None
            raise
    wrapper.__name__ = method.__name__
    wrapper.__doc__ = method.__doc__
    return wrapper


class ClusterStore:
    node_key = staticmethod(keys.node_key)
    client_key = staticmethod(keys.client_key)
    reservations = staticmethod(keys.reservations)
    pending_key = staticmethod(keys.pending_key)
    pending_index = staticmethod(keys.pending_index)
    channel = staticmethod(keys.channel)

    def __init__(self, url: str, node_id: str, ttl: float):
        if redis is None:
            raise RuntimeError("--cluster needs the redis package: pip install chuantou[cluster]")
        problem = url_problem(url)
        if problem:
            raise ValueError(problem)
        self.node_id = node_id
        self.ttl_ms = max(1, int(ttl * 1000))
        self.clustered, self._url = split(url)
        self._bus = "" if self.clustered else keys.channel("")  # scripts publish on one Redis only
        self._connect_lock = threading.Lock()
        self._redis: Any = None  # redis.Redis or redis.cluster.RedisCluster
        if not self.clustered:
            self._redis = redis.Redis.from_url(self._url, socket_connect_timeout=CONNECT_TIMEOUT,
                                               socket_timeout=COMMAND_TIMEOUT, decode_responses=True)
            self._scripts()

    @property
    def redis(self):
        """The client; a Cluster's is made at first use (making it asks a node for the slots, and a
        node must start while the store is down)."""
        if self._redis is None:
            with self._connect_lock:
                if self._redis is None:
                    # a retry or two for a moved slot, not the package's ten with backoff to 10 s
                    self._redis = redis.cluster.RedisCluster.from_url(
                        self._url, socket_connect_timeout=CONNECT_TIMEOUT, socket_timeout=COMMAND_TIMEOUT,
                        decode_responses=True, retry=Retry(ExponentialBackoff(cap=0.4, base=0.1), CLUSTER_RETRIES))
                    self._scripts()
        return self._redis

    def _scripts(self) -> None:
        client = self._redis
        self._claim = client.register_script(CLAIM)
        self._release = client.register_script(RELEASE)
        self._reserve = client.register_script(RESERVE)
        self._forget_reservation = client.register_script(FORGET_RESERVATION)
        self._send_to_holder = client.register_script(SEND_TO_HOLDER)
        self._publish_pending = client.register_script(PUBLISH_PENDING)

    def _pipelined(self, queue, transaction: bool = False) -> list:
        """Run the commands ``queue(pipe)`` adds in one pipeline, in one round trip: its scripts
        go by hash alone (``_queue_script``); when Redis (a master) does not know one, new or
        restarted, load them all and run the pipeline again."""
        for attempt in (1, 2):
            pipe = self.redis.pipeline(transaction=transaction)
            queue(pipe)
            try:
                return pipe.execute()
            except redis.exceptions.NoScriptError:
                if attempt == 2:
                    raise
                for script in (CLAIM, RELEASE, RESERVE, FORGET_RESERVATION, SEND_TO_HOLDER, PUBLISH_PENDING):
                    self.redis.script_load(script)  # on every master of a Cluster
        raise AssertionError("unreachable")

    @staticmethod
    def _queue_script(pipe, script, names: list[str], args: list) -> None:
        """EVALSHA in a pipeline (the redis package's Script would ask SCRIPT EXISTS first: a round trip)."""
        pipe.evalsha(script.sha, len(names), *names, *args)

    def _mget(self, names: list[str]) -> list:
        if not names:
            return []
        return self.redis.mget_nonatomic(names) if self.clustered else self.redis.mget(names)

    def _client_record(self, credential: str | None) -> str:
        return json.dumps({"node": self.node_id, "credential": credential, "lastSeen": time.time()})

    # --- client registry ---------------------------------------------------------------------

    @_guard
    def claim(self, client_id: str, credential: str | None, takeover: bool = False) -> tuple[str, dict] | None:
        """Hold ``client_id`` for this node. None: granted; else (why, the holder's record): TAKEN,
        IN_USE, or TOOK (granted by taking it over: the holder was told to drop it, see CLAIM).
        In the same round trip the ID leaves its credential's reservations: after this claim it is
        online, or another credential's."""
        def queue(pipe) -> None:
            self._queue_script(pipe, self._claim, [keys.client_key(client_id)],
                               self._claim_args(client_id, credential, takeover))
            if credential:
                pipe.zrem(keys.reservations(credential), client_id)
        held = self._pipelined(queue)[0]
        if not held:
            return None
        holder = json.loads(held[1])
        if held[0] == TOOK and self.clustered:  # (on one Redis CLAIM published it)
            self.redis.publish(keys.channel(str(holder.get("node"))), self._drop(client_id, credential))
        return held[0], holder

    def _claim_args(self, client_id: str, credential: str | None, takeover: bool) -> list:
        return [self._client_record(credential), self.node_id, self.ttl_ms, credential or "",
                "1" if takeover else "0", self._bus, self._drop(client_id, credential)]

    def _drop(self, client_id: str, credential: str | None) -> str:
        return json.dumps({"type": "drop", "clientId": client_id, "node": self.node_id, "credential": credential})

    @_guard
    def release(self, client_id: str, credential: str | None = None, reserve: float = 0.0,
                max_reserved: int = 0) -> list[str]:
        """Our client went offline: its record goes, or becomes a reservation of its ID for
        ``credential`` for ``reserve`` seconds (see RELEASE and RESERVE). Returns the IDs of that
        credential whose reservations were dropped to keep it within ``max_reserved``."""
        record = json.dumps({"node": None, "credential": credential, "offlineSince": time.time()})
        reserved = self._release(keys=[keys.client_key(client_id)], args=[self.node_id, record, int(reserve * 1000)])
        if not int(reserved or 0):
            return []
        dropped = self._reserve(keys=[keys.reservations(credential)],
                                args=[int(time.time() * 1000), int(reserve * 1000), max_reserved, client_id])
        if dropped:
            self._pipelined(lambda pipe: [self._queue_script(pipe, self._forget_reservation, [keys.client_key(old)],
                                                             [credential or ""]) for old in dropped])
        return list(dropped or [])

    @_guard
    def lookup(self, client_id: str) -> dict | None:
        raw = self.redis.get(keys.client_key(client_id))
        return json.loads(raw) if raw else None

    @_guard
    def client_ids(self, limit: int = 100_000) -> list[str]:
        """Every ID online somewhere in the cluster, not those only reserved (a SCAN and an MGET:
        for lists, not for each request)."""
        return sorted(self.client_nodes(limit)[0])

    @_guard
    def client_nodes(self, limit: int) -> tuple[dict[str, str], bool]:
        """{client ID: its node} for up to ``limit`` IDs online in the cluster, and whether there
        were more (a SCAN, of each master on a Cluster, and an MGET: for the admin view, not for
        each request)."""
        names = list[str]()
        for key in self.redis.scan_iter(match=keys.CLIENT_KEYS, count=1000):
            if len(names) == limit:
                return self._nodes_of(names), True
            names.append(key)
        return self._nodes_of(names), False

    def _nodes_of(self, names: list[str]) -> dict[str, str]:
        found = {}
        for key, raw in zip(names, self._mget(names)):
            try:
                node = json.loads(raw).get("node") if raw else None
            except (ValueError, AttributeError):
                node = None
            if isinstance(node, str):
                found[keys.client_of(key)] = node
        return found

    # --- node table --------------------------------------------------------------------------

    @_guard
    def refresh(self, node: dict, clients: list[tuple[str, str | None]]) -> list[tuple[str, dict]]:
        """Write this node's record and re-claim each of its clients, in one round trip.
        Returns the (client ID, holder) pairs another node holds (after a store outage)."""
        now = int(time.time() * 1000)

        def queue(pipe) -> None:
            pipe.set(keys.node_key(self.node_id), json.dumps(node), px=self.ttl_ms)
            pipe.zadd(keys.NODE_INDEX, {self.node_id: now + self.ttl_ms})
            pipe.zremrangebyscore(keys.NODE_INDEX, "-inf", now)
            pipe.pexpire(keys.NODE_INDEX, self.ttl_ms * 10)
            for client_id, credential in clients:  # never a takeover: a refresh only keeps what is ours
                self._queue_script(pipe, self._claim, [keys.client_key(client_id)],
                                   self._claim_args(client_id, credential, False))
        replies = self._pipelined(queue)
        return [(cid, json.loads(held[1])) for (cid, _), held in zip(clients, replies[4:]) if held]

    @_guard
    def share_opened(self, own: dict[tuple[str, str], int], others: list[str]) -> dict[tuple[str, str], int]:
        """Write the sessions each client opened on this node and sum those on ``others``, in one
        round trip (one slot, one MULTI): {(client, protocol): sessions on the other nodes}."""
        key = keys.opened_key(self.node_id)

        def queue(pipe) -> None:
            pipe.delete(key)
            if own:
                pipe.hset(key, mapping={f"{protocol}:{client}": count for (client, protocol), count in own.items()})
                pipe.pexpire(key, self.ttl_ms)
            for node_id in others:
                pipe.hgetall(keys.opened_key(node_id))
        replies = self._pipelined(queue, transaction=True)[-len(others):] if others else []
        total: dict[tuple[str, str], int] = {}
        for fields in replies:
            for field, count in (fields or {}).items():
                protocol, _, client = str(field).partition(":")
                if client and str(count).isdigit():
                    total[client, protocol] = total.get((client, protocol), 0) + int(count)
        return total

    @_guard
    @_guard
    def nodes(self) -> list[dict]:
        """The live nodes' records: those in the node index whose key has not expired."""
        ids = self.redis.zrangebyscore(keys.NODE_INDEX, int(time.time() * 1000), "+inf")
        names = [keys.node_key(node_id) for node_id in sorted(ids)]
        return [record for record in map(_json_or_none, self.redis.mget(names) if names else []) if record]

    @_guard
    def forget_node(self) -> None:
        """A node stopping cleanly removes its record at once (a killed one's expires)."""
        self._pipelined(lambda pipe: (pipe.delete(keys.node_key(self.node_id), keys.opened_key(self.node_id)),
                                      pipe.zrem(keys.NODE_INDEX, self.node_id)), transaction=True)

    # --- bus -----------------------------------------------------------------------------------

    @_guard
    def publish(self, node_id: str, message: dict, pending: PendingKey | None = None) -> int:
        """Send a message to a node's channel; returns how many subscribers got it (0: nobody
        listens). With ``pending``, that session's key is written first, in the same round trip on one Redis."""
        if pending is not None:
            heard = int(self._publish_pending(
                keys=[keys.pending_key(pending.client_a, pending.session_id), keys.pending_index(pending.client_a)],
                args=[pending.record, pending.ttl_ms, pending.deadline_ms, pending.session_id, pending.place,
                      self._bus and keys.channel(node_id), json.dumps(message)]))
            if not self.clustered:
                return heard
        return self.redis.publish(keys.channel(node_id), json.dumps(message))

    @_guard
    def publish_to_holder(self, client_id: str, message: dict, client_a: str, cap: int, pending_here: int,
                          place: str, hold_ms: int) -> tuple[str | None, int, int, bool]:
        """Send a message to the node holding ``client_id`` (another node than this one) unless
        ``client_a`` has ``cap`` sessions pending in the cluster (``pending_here`` of them only on
        this node). Returns (that node or None when no other node holds it, subscribers that got
        it, A's pending sessions in the index, over the cap). One round trip on one Redis, three on a Cluster."""
        now = int(time.time() * 1000)
        args: list[Any] = [self.node_id, self._bus, json.dumps(message), cap, pending_here, now, place,
                           now + hold_ms, hold_ms]
        if self.clustered:  # B's record is another slot than A's index: read it first
            raw = self.redis.get(keys.client_key(client_id))
            holder = _json_or_none(raw)
            if not holder or not isinstance(holder.get("node"), str) or holder["node"] == self.node_id:
                return None, 0, 0, False
            node, heard, pending, over = self._send_to_holder(keys=[keys.pending_index(client_a)], args=[*args, raw])
            if node and not int(over):  # the script counted A's request; B's node is asked now
                heard = self.redis.publish(keys.channel(node), args[2])
        else:
            node, heard, pending, over = self._send_to_holder(
                keys=[keys.client_key(client_id), keys.pending_index(client_a)], args=args)
        return node or None, int(heard), int(pending), bool(over)

    @_guard
    def forget_pending(self, entries: list[tuple[str, str]]) -> None:
        """Take (client A, session id or request place) out of the pending keys and A's index."""
        def queue(pipe) -> None:
            for client_a, member in entries:
                pipe.delete(keys.pending_key(client_a, member))
                pipe.zrem(keys.pending_index(client_a), member)
        self._pipelined(queue)

    @_guard
    def pending_counts(self, clients: list[str]) -> dict[str, int]:
        """{client A: its sessions pending in the cluster's index}, expired ones dropped first."""
        now = int(time.time() * 1000)

        def queue(pipe) -> None:
            for client_a in clients:
                pipe.zremrangebyscore(keys.pending_index(client_a), "-inf", now)
                pipe.zcard(keys.pending_index(client_a))
        replies = self._pipelined(queue)
        return {client_a: int(count) for client_a, count in zip(clients, replies[1::2])}

    @_guard
    def pending_sessions(self, limit: int) -> tuple[dict[str, int], bool]:
        """{data node: its pending cross-node sessions} over up to ``limit`` pending keys, and
        whether there were more (a SCAN, of each master on a Cluster, and an MGET: for the admin view)."""
        names = list[str]()
        for key in self.redis.scan_iter(match=keys.PENDING_KEYS, count=1000):
            if len(names) == limit:
                break
            names.append(key)
        by_node: dict[str, int] = {}
        for record in map(_json_or_none, self._mget(names)):
            node = record.get("dataNode") if record else None
            if isinstance(node, str):
                by_node[node] = by_node.get(node, 0) + 1
        return by_node, len(names) == limit

    @_guard
    def subscribe(self):
        """A subscription to this node's channel; read it with ``receive``."""
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(keys.channel(self.node_id))
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
        if self._redis is not None:
            self._redis.close()
