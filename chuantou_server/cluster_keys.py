"""The names of the cluster store's keys in Redis (cluster_store.py), chosen so that it works on
a Redis Cluster as on one Redis: every multi-key operation (a Lua script's KEYS, a MULTI) names
keys of one hash slot, by a hash tag (the part in braces, which alone picks the slot).

- ``chuantou:client:{<client id>}``        the ID's record (online on a node, or reserved offline)
- ``chuantou:reservedby:{<credential>}``   that credential's reserved IDs (zset id -> offline since)
- ``chuantou:pendingof:{<client A>}``      A's pending sessions (zset session id or ``t:<ticket>`` -> deadline)
- ``chuantou:pending:{<client A>}:<sid>``  one pending session, in its client A's slot
- ``chuantou:{nodes}:node:<node id>``      a node's record; all node keys share one slot (a few keys)
- ``chuantou:{nodes}:opened:<node id>``    sessions each client opened on that node
- ``chuantou:{nodes}:index``               the node table (zset node id -> expiry in ms), read
  instead of a SCAN, which a Redis Cluster answers per master
- channel ``chuantou:bus:<node id>``       (a channel, not a key: a Cluster broadcasts PUBLISH)

An ID's record and its credential's reservations are two slots: no script touches both (see
cluster_scripts.py). Client IDs (protocol.CLIENT_ID_PATTERN) and credential fingerprints hold no
brace, so each tag is exactly the ID. Nodes of older versions used names without braces: the
nodes of one cluster are upgraded together (docs/cluster.md).
"""

from __future__ import annotations

PREFIX = "chuantou:"
NODE_INDEX = f"{PREFIX}{{nodes}}:index"


def node_key(node_id: str) -> str:
    return f"{PREFIX}{{nodes}}:node:{node_id}"


def opened_key(node_id: str) -> str:
    return f"{PREFIX}{{nodes}}:opened:{node_id}"


def client_key(client_id: str) -> str:
    return f"{PREFIX}client:{{{client_id}}}"


CLIENT_KEYS = client_key("*")  # the pattern of every client record, for SCAN


def client_of(key: str) -> str:
    """The client ID in a client_key."""
    return key[len(PREFIX) + len("client:{"):-1]


def reservations(credential: str | None) -> str:
    return f"{PREFIX}reservedby:{{{credential or ''}}}"


def pending_index(client_a: str) -> str:
    return f"{PREFIX}pendingof:{{{client_a}}}"


def pending_key(client_a: str, session_id: str) -> str:
    return f"{PREFIX}pending:{{{client_a}}}:{session_id}"


PENDING_KEYS = f"{PREFIX}pending:{{*"  # every pending session's key, for SCAN (not pendingof:)


def channel(node_id: str) -> str:
    return f"{PREFIX}bus:{node_id}"
