"""This relay as one node of a cluster: several relays share one client registry in Redis
(cluster_store.py) and pass control messages to each other, so a client on one node reaches
a client on another.

A session between A (on the origin node) and B (on another) is set up like this:

1. A's ``connect_request`` finds B missing locally.
2. The origin node remembers a ticket and, in one Redis round trip (a script), finds B's node N
   in the registry and publishes ``connect`` to N's channel.
3. N asks its data-node policy (``--data-node``) where the session is pumped: N itself (``b``,
   the default) or the least-loaded live node D (cluster_data.py has that path). The **data
   node** checks its caps, creates the session in its own table, publishes ``created`` back
   (relayAddr: its advertised address, and A's secret) and sends B the offer (relayAddr: the
   data node; through N when D is not N); or publishes ``refused``.
4. The origin node sends A ``create_session`` (or the error). Both clients open their data
   channels to the data node, where the pump is a local pair of sockets, as on one relay.
5. When the data node closes the session it publishes ``closed`` to each party's node; when a
   party ends one (``session_closed``, UDP; B's ``reject_session``) its node publishes ``end``.

Messages between nodes (JSON objects on ``bus:<node>``), by ``type``:
``connect`` {ticket, origin, fromClientId, toClientId, remotePort, remoteHost, protocol, localPort},
``created`` {ticket, node, sessionId, secret, host, port, remotePort, protocol}, ``refused`` {ticket, code, message},
``closed`` {sessionId, clientId, reason}, ``end`` {sessionId, clientId, reason},
``keys`` {to, from, frame}; ``host`` and ``offer``: see cluster_data.py; ``drop``: cluster_identity.py.

When Redis is unreachable the node keeps serving everything that needs only itself (local
clients, local sessions) and refuses cross-node requests with "cluster store unreachable";
its refresher writes its keys again as soon as Redis answers.
"""

from __future__ import annotations

import itertools
import logging
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from common import protocol as p

from . import metrics
from .caps import pending_problem
from .cluster_data import DataSide
from .cluster_identity import IdentitySide
from .cluster_pending import PendingSide
from .cluster_redirect import Redirector
from .cluster_store import ClusterStore, StoreUnreachable
from .cluster_view import NodeTable, clients_view

if TYPE_CHECKING:
    from .server import Server
    from .signaling import ControlConnection

log = logging.getLogger("chuantou.server")

DEFAULT_TTL = 8.0  # a killed node's keys are gone this long after its last refresh
UNREACHABLE = "cluster store unreachable"
CODE_UNREACHABLE = "cluster_unreachable"
REQUEST_TIMEOUT = 10.0  # an origin node waits this long for the data node's answer
BUS_POLL = 0.5  # the bus thread looks at stop() and expired tickets this often
MAX_BACKOFF = 2.0
# the data node's refusal codes -> the origin's reasons in chuantou_relay_cluster_requests_refused
_REFUSAL_REASONS = {"client_offline": metrics.TARGET_OFFLINE, "limit": metrics.LIMIT}


@dataclass
class _Ticket:
    """A cross-node connect_request waiting for the data node's answer (on the origin node)."""
    conn: ControlConnection
    request_id: str | None
    to_client: str
    data_node: str
    deadline: float


def parse_advertise(url: str) -> tuple[str, int]:
    """``ws://host:port`` (or wss://) -> (host, port): where clients reach this node."""
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ValueError(f"advertise address {url!r} must look like ws://HOST:PORT")
    return parts.hostname, parts.port or (443 if parts.scheme == "wss" else 80)


class Cluster(PendingSide, DataSide, IdentitySide):  # (PendingSide first: DataSide declares pending_key)
    def __init__(self, server: Server, url: str, node_id: str, advertise: str | None, ttl: float = DEFAULT_TTL):
        self.server = server
        self.node_id = node_id
        self.ttl = ttl
        self.advertise: str = advertise or ""  # completed in start() when not given (the port may be 0 until then)
        self.store = ClusterStore(url, node_id, ttl)
        self.reachable = True  # as last seen by the refresher or a request
        self.redirects = Redirector(self, server.config.cluster_redirect_margin)  # register -> a less loaded node
        self._lock = threading.Lock()
        self._tickets: dict[str, _Ticket] = {}
        self._ticket_ids = itertools.count(1)
        # origin side, UDP sessions only (A ends those with session_closed): session -> (data node, A)
        self._outbound: dict[str, tuple[str, str | None]] = {}
        # data side: session -> {party on another node: its node} (A on the origin; B when B's node chose us)
        self._inbound: dict[str, dict[str, str]] = {}
        # B's side, pumped elsewhere: session -> (data node, B, deadline), until B's data channel is due
        self._offers: dict[str, tuple[str, str, float]] = {}
        self.table = NodeTable(node_id)  # the node table as last read, for the policy and the views
        self.policy = server.config.data_node
        self._opened_elsewhere: dict[tuple[str, str], int] = {}  # (client, protocol) -> sessions on other nodes
        server.caps.opened_elsewhere = self.opened_elsewhere
        self._init_pending()
        server.caps.pending_elsewhere = self.pending_elsewhere

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        if not self.advertise:
            cfg = self.server.config
            host = cfg.public_host or (cfg.host if cfg.host not in ("", "0.0.0.0", "::") else socket.getfqdn())
            scheme = "wss" if self.server.tls_context is not None else "ws"
            self.advertise = f"{scheme}://{host}:{cfg.public_port or self.server.port}"
        self.refresh_once()
        self.server.threads.spawn(f"cluster-refresh-{self.node_id}", self._refresh_loop)
        self.server.threads.spawn(f"cluster-bus-{self.node_id}", self._bus_loop)
        log.info("relay node %s in the cluster, advertised as %s", self.node_id, self.advertise)

    def stop(self) -> None:
        """Called after server.stopping is set: the loops end by themselves; take our keys out now."""
        registry = self.server.registry
        try:
            for conn in registry.connections():  # their IDs stay reserved for their tokens, as they go offline
                if conn.client_id:
                    self.store.release(conn.client_id, conn.credential,
                                       registry.reservation_time if conn.credential else 0.0,
                                       registry.max_reserved_per_credential)
            self._forget_all_pending()
            self.store.forget_node()
        except StoreUnreachable:
            pass  # they expire within the TTL
        self.store.close()

    # --- the node table and the registry's TTLs ----------------------------------------------

    def _refresh_loop(self) -> None:
        while not self.server.stopping.wait(self.ttl / 3):
            self.refresh_once()

    def refresh_once(self) -> None:
        server = self.server
        node = {"id": self.node_id, "advertise": self.advertise, "clients": len(server.registry),
                "sessions": len(server.sessions), "bytesPerSecond": server.traffic.history.current()[0],
                "updatedAt": time.time()}
        clients = [(conn.client_id, conn.credential) for conn in server.registry.connections() if conn.client_id]
        try:
            held_elsewhere = self.store.refresh(node, clients)
            self.table.update(self.store.nodes())
        except StoreUnreachable as exc:
            self._mark(False, str(exc))
            return
        self._mark(True)
        self._forget_dead_data_nodes(self.table.live_ids())
        self._share_opened()
        self._refresh_pending_seen()
        for client_id, holder in held_elsewhere:  # both registered while the store was down
            log.warning("client %s is also registered on node %s (registered during a store outage); "
                        "it stays on both until one goes offline", client_id, holder.get("node"))

    def _share_opened(self) -> None:
        """The per-client session caps hold cluster-wide: publish what our clients opened here,
        read what they opened on the others (as of their last refresh, TTL/3 at most)."""
        others = sorted(self.table.live_ids() - {self.node_id})
        try:
            self._opened_elsewhere = self.store.share_opened(self.server.sessions.opened_counts(), others)
        except StoreUnreachable as exc:
            self._mark(False, str(exc))
            self._opened_elsewhere = {}  # each node's own caps still hold

    def opened_elsewhere(self, client_id: str, protocol: str) -> int:
        """Sessions ``client_id`` opened that other nodes pump (for SessionCaps)."""
        return self._opened_elsewhere.get((client_id, protocol), 0)

    def _forget_dead_data_nodes(self, live: set[str]) -> None:
        """Sessions of ours pumped on a node that died end with it: drop what we kept for them."""
        with self._lock:
            for session_id in [sid for sid, (node, _) in self._outbound.items() if node not in live]:
                del self._outbound[session_id]
            for session_id in [sid for sid, (node, _, _) in self._offers.items() if node not in live]:
                del self._offers[session_id]

    def _mark(self, reachable: bool, why: str = "") -> None:
        if reachable and not self.reachable:
            log.warning("cluster store reachable again; node %s is part of the cluster again", self.node_id)
        elif not reachable and self.reachable:
            log.warning("%s (%s): serving local sessions only until it returns", UNREACHABLE, why)
        self.reachable = reachable

    def status(self) -> dict:
        """This node's view of the cluster, for status and the admin API."""
        view: dict = {"node": self.node_id, "advertise": self.advertise, "dataNode": self.policy,
                      "store": "reachable", "nodes": []}
        try:
            view["nodes"] = self.table.update(self.store.nodes())  # live ones, for the metrics
        except StoreUnreachable:
            view["store"] = UNREACHABLE
        view["table"] = self.table.rows()  # with the expired ones
        return view

    def api_view(self) -> dict:
        """GET /api/cluster: the node table with each node's load and state, and each client's node."""
        view = self.status()
        return {**{k: view[k] for k in ("node", "advertise", "dataNode", "store")}, "nodes": view["table"],
                **clients_view(self.store, self.node_id), **self.pending_view()}

    def placement(self, session) -> dict:
        """Where a session pumped here is pumped (this node) and where its two parties are."""
        with self._lock:
            remote = self._inbound.get(session.id, {})
            return {"dataNode": self.node_id, "aNode": remote.get(session.client_a, self.node_id),
                    "bNode": remote.get(session.client_b, self.node_id)}

    # --- origin side: A is ours, B is elsewhere ------------------------------------------------

    def connect_remote(self, conn: ControlConnection, msg: p.ConnectRequest) -> None:
        """A's connect_request for a client not on this node: ask B's node, answer A later."""
        def refuse(code: str, text: str) -> None:
            conn.send(p.Error(message=text, code=code, requestId=msg.requestId))

        ticket = f"{self.node_id}-{next(self._ticket_ids)}-{secrets.token_hex(4)}"
        waiting = _Ticket(conn, msg.requestId, msg.toClientId, "?", time.monotonic() + REQUEST_TIMEOUT)
        with self._lock:  # before the publish: the answer may come back before it returns
            self._tickets[ticket] = waiting
        cap, pending_here = self.pending_request(conn.client_id or "")
        try:
            # where B is, A's pending count and the request to B's node in one round trip (set-up latency)
            data_node, heard, pending, over = self.store.publish_to_holder(msg.toClientId, {
                "type": "connect", "ticket": ticket, "origin": self.node_id, "fromClientId": conn.client_id,
                "toClientId": msg.toClientId, "remotePort": msg.remotePort, "remoteHost": msg.remoteHost,
                "protocol": msg.protocol, "localPort": msg.localPort, "publicKey": conn.public_key},
                conn.client_id or "", cap, pending_here, f"t:{ticket}", int(REQUEST_TIMEOUT * 1000))
        except StoreUnreachable as exc:
            self._take_ticket(ticket)
            self._mark(False, str(exc))
            self.server.metrics.cluster_request_refused(metrics.STORE_UNREACHABLE)
            return refuse(CODE_UNREACHABLE, f"client '{msg.toClientId}' is not on this relay node and the "
                                            f"{UNREACHABLE}; try again when it is back")
        waiting.data_node = data_node or "?"
        self.pending_read(conn.client_id or "", pending)
        if over:
            self._take_ticket(ticket)
            self.server.metrics.cluster_request_refused(metrics.LIMIT)
            return refuse("limit", pending_problem(cap, True))
        if data_node is None:
            self._take_ticket(ticket)
            self.server.metrics.cluster_request_refused(metrics.TARGET_OFFLINE)
            return refuse("client_offline", f"client '{msg.toClientId}' is not online")
        self.server.metrics.cluster_request_sent()
        if not heard:
            self._take_ticket(ticket)
            self.drop_request_place(conn.client_id, ticket)
            self.server.metrics.cluster_request_refused(metrics.NODE_SILENT)
            refuse("client_offline", f"client '{msg.toClientId}' is registered on relay node {data_node}, "
                                     f"which does not answer")

    def _take_ticket(self, ticket: str) -> _Ticket | None:
        with self._lock:
            return self._tickets.pop(ticket, None)

    def _on_created(self, message: dict) -> None:
        waiting = self._take_ticket(message["ticket"])
        if waiting is None:
            return  # timed out already: the data node's session expires unjoined
        conn, session_id = waiting.conn, message["sessionId"]
        data_node = message["node"]  # (the answer can arrive before publish_to_holder returned)
        local = data_node == self.node_id  # A's node chosen as the data node: the session is in our table
        if message["protocol"] == "udp" and not local:  # a TCP session ends by its sockets, on the data node
            with self._lock:
                self._outbound[session_id] = (data_node, conn.client_id)
        told = conn.send(p.CreateSession(
            sessionId=session_id, peerClientId=waiting.to_client, secret=message["secret"],
            service=p.Service(port=message["remotePort"], protocol=message["protocol"]),
            relayAddr=p.RelayAddr(host=message["host"], port=message["port"], protocol=message["protocol"]),
            requestId=waiting.request_id, peerPublicKey=message.get("publicKey")))
        session = self.server.sessions.get(session_id) if local else None
        if not told and session is not None:
            self.server.close_session(session, "requesting client went offline")
        elif not told and not local:
            self._end_remote(session_id, conn.client_id, "requesting client went offline", data_node)

    def _on_refused(self, message: dict) -> None:
        waiting = self._take_ticket(message["ticket"])
        if waiting is not None:
            self.drop_request_place(waiting.conn.client_id, message["ticket"])
            self.server.metrics.cluster_request_refused(_REFUSAL_REASONS.get(message["code"], metrics.OTHER))
            waiting.conn.send(p.Error(message=message["message"], code=message["code"],
                                      requestId=waiting.request_id))

    def _on_closed(self, message: dict) -> None:
        """The data node closed a session one of our clients is in: tell that client."""
        session_id = message["sessionId"]
        with self._lock:
            self._outbound.pop(session_id, None)
            self._offers.pop(session_id, None)
        conn = self.server.registry.get(message["clientId"])
        if conn is not None:
            conn.send(p.SessionClosed(sessionId=session_id, reason=message["reason"]))

    def forward_session_closed(self, conn: ControlConnection, msg: p.SessionClosed) -> None:
        """Our client ended a session pumped on another node (a UDP flow): tell that node."""
        with self._lock:
            entry = self._outbound.get(msg.sessionId)
        if entry is not None and entry[1] == conn.client_id:
            self._end_remote(msg.sessionId, conn.client_id, msg.reason)

    def _expire_tickets(self) -> None:
        now = time.monotonic()
        self._expire_offers(now)
        with self._lock:
            late = [t for t, w in self._tickets.items() if w.deadline <= now]
            expired = [self._tickets.pop(t) for t in late]
        for ticket, waiting in zip(late, expired):
            self.drop_request_place(waiting.conn.client_id, ticket)
            self.server.metrics.cluster_request_refused(metrics.TIMEOUT)
            waiting.conn.send(p.Error(message=f"relay node {waiting.data_node}, where client "
                                              f"'{waiting.to_client}' is, did not answer within "
                                              f"{REQUEST_TIMEOUT:g} s", code="timeout",
                                      requestId=waiting.request_id))

    def _address(self) -> tuple[str, int]:
        return parse_advertise(self.advertise)

    def _origin_handle(self, reply: dict) -> None:
        """This node is both A's and the data node: its answer needs no bus."""
        (self._on_created if reply["type"] == "created" else self._on_refused)(reply)

    # --- the bus ----------------------------------------------------------------------------------

    def _bus_loop(self) -> None:
        stopping, pubsub, backoff = self.server.stopping, None, 0.1
        handlers = {"connect": self._on_connect, "created": self._on_created, "refused": self._on_refused,
                    "closed": self._on_closed, "end": self._on_end, "keys": self._on_keys,
                    "host": self._on_host, "offer": self._on_offer, "drop": self._on_drop}
        try:
            while not stopping.is_set():
                try:
                    if pubsub is None:
                        pubsub = self.store.subscribe()
                        backoff = 0.1
                    message = self.store.receive(pubsub, BUS_POLL)
                except StoreUnreachable as exc:
                    self._mark(False, str(exc))
                    _close_pubsub(pubsub)
                    pubsub = None
                    stopping.wait(backoff)  # a store that is down is asked again, less and less often
                    backoff = min(MAX_BACKOFF, backoff * 2)
                    continue
                self._expire_tickets()
                self._sweep_pending()
                handler = handlers.get(message.get("type")) if message else None
                if handler is None:
                    continue
                if handler in (self._on_connect, self._on_host, self._on_offer, self._on_drop):
                    # Its offer to B may wait on a client that does not read: never on this thread,
                    # which every other cross-node message goes through.
                    about = message.get("ticket") or message.get("sessionId") or message.get("clientId")
                    self.server.threads.spawn(f"cluster-{message['type']}-{str(about)[:24]}",
                                              self._handle, handler, message)
                else:
                    self._handle(handler, message)
        finally:
            _close_pubsub(pubsub)


    @staticmethod
    def _handle(handler, message: dict) -> None:
        try:
            handler(message)
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("bad cluster message %r: %s", message.get("type"), exc)


def _close_pubsub(pubsub) -> None:
    if pubsub is not None:
        try:
            pubsub.close()
        except Exception:  # the connection is already gone
            pass
