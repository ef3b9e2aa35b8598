"""This relay as one node of a cluster: several relays share one client registry in Redis
(cluster_store.py) and pass control messages to each other, so a client on one node reaches
a client on another.

A session between A (on the origin node) and B (on another) is set up like this:

1. A's ``connect_request`` finds B missing locally.
2. The origin node remembers a ticket and, in one Redis round trip (a script), finds B's node N
   in the registry and publishes ``connect`` to N's channel.
3. N (the **data node**: B's node) checks its caps, creates the session in its own table,
   publishes ``created`` back (relayAddr: N's advertised address, and A's secret) and sends B
   the offer (relayAddr: N); or publishes ``refused``.
4. The origin node sends A ``create_session`` (or the error). Both clients open their data
   channels to N, where the pump is a local pair of sockets, as on one relay.
5. When N closes the session it publishes ``closed`` to the origin node for A; when A ends one
   (``session_closed``, UDP) the origin node publishes ``end`` to N.

Messages between nodes (JSON objects on ``bus:<node>``), by ``type``:
``connect`` {ticket, origin, fromClientId, toClientId, remotePort, remoteHost, protocol, localPort},
``created`` {ticket, node, sessionId, secret, host, port, remotePort, protocol}, ``refused`` {ticket, code, message},
``closed`` {sessionId, clientId, reason}, ``end`` {sessionId, clientId, reason}.

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
from .cluster_redirect import Redirector
from .cluster_store import ClusterStore, StoreUnreachable

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


class Cluster:
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
        self._inbound: dict[str, tuple[str, str]] = {}  # data side: session -> (origin node, remote client A)

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
        try:
            for client_id in self.server.registry.ids():
                self.store.release(client_id)
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
                "sessions": len(server.sessions), "updatedAt": time.time()}
        clients = [(conn.client_id, conn.credential) for conn in server.registry.connections() if conn.client_id]
        try:
            held_elsewhere = self.store.refresh(node, clients)
        except StoreUnreachable as exc:
            self._mark(False, str(exc))
            return
        self._mark(True)
        self._forget_dead_data_nodes()
        for client_id, holder in held_elsewhere:  # both registered while the store was down
            log.warning("client %s is also registered on node %s (registered during a store outage); "
                        "it stays on both until one goes offline", client_id, holder.get("node"))

    def _forget_dead_data_nodes(self) -> None:
        """UDP sessions of ours pumped on a node that died end with it: drop what we kept for them."""
        with self._lock:
            if not self._outbound:
                return
        try:
            live = {node.get("id") for node in self.store.nodes()}
        except StoreUnreachable:
            return
        with self._lock:
            for session_id in [sid for sid, (node, _) in self._outbound.items() if node not in live]:
                del self._outbound[session_id]

    def _mark(self, reachable: bool, why: str = "") -> None:
        if reachable and not self.reachable:
            log.warning("cluster store reachable again; node %s is part of the cluster again", self.node_id)
        elif not reachable and self.reachable:
            log.warning("%s (%s): serving local sessions only until it returns", UNREACHABLE, why)
        self.reachable = reachable

    def status(self) -> dict:
        """This node's view of the cluster, for status and the admin API."""
        view: dict = {"node": self.node_id, "advertise": self.advertise, "store": "reachable", "nodes": []}
        try:
            view["nodes"] = self.store.nodes()
        except StoreUnreachable:
            view["store"] = UNREACHABLE
        return view

    # --- identity, cluster-wide ----------------------------------------------------------------

    def claim(self, client_id: str, credential: str | None) -> tuple[str, str] | None:
        """Hold the ID in the cluster; None when granted, else (message, code) for the refusal."""
        try:
            holder = self.store.claim(client_id, credential)
        except StoreUnreachable as exc:
            # Local registration must keep working without the store; the refresher claims it later.
            self._mark(False, str(exc))
            return None
        self._mark(True)
        if holder is None:
            return None
        node = holder.get("node")
        if holder.get("credential") != credential:
            return (f"client ID '{client_id}' is online on relay node {node} with a different credential; "
                    f"choose another --client-id", p.ID_TAKEN)
        return (f"client ID '{client_id}' is in use by a live connection on relay node {node}; "
                f"if both run on purpose, give one another --client-id", p.ID_IN_USE)

    def release(self, client_id: str) -> None:
        try:
            self.store.release(client_id)
        except StoreUnreachable:
            pass  # the key expires within the TTL

    def client_ids(self) -> list[str]:
        try:
            return self.store.client_ids()
        except StoreUnreachable:
            return []

    # --- origin side: A is ours, B is elsewhere ------------------------------------------------

    def connect_remote(self, conn: ControlConnection, msg: p.ConnectRequest) -> None:
        """A's connect_request for a client not on this node: ask B's node, answer A later."""
        def refuse(code: str, text: str) -> None:
            conn.send(p.Error(message=text, code=code, requestId=msg.requestId))

        ticket = f"{self.node_id}-{next(self._ticket_ids)}-{secrets.token_hex(4)}"
        waiting = _Ticket(conn, msg.requestId, msg.toClientId, "?", time.monotonic() + REQUEST_TIMEOUT)
        with self._lock:  # before the publish: the answer may come back before it returns
            self._tickets[ticket] = waiting
        try:
            # where B is and the request to its node in one round trip (set-up latency)
            data_node, heard = self.store.publish_to_holder(msg.toClientId, {
                "type": "connect", "ticket": ticket, "origin": self.node_id, "fromClientId": conn.client_id,
                "toClientId": msg.toClientId, "remotePort": msg.remotePort, "remoteHost": msg.remoteHost,
                "protocol": msg.protocol, "localPort": msg.localPort, "publicKey": conn.public_key})
        except StoreUnreachable as exc:
            self._take_ticket(ticket)
            self._mark(False, str(exc))
            self.server.metrics.cluster_request_refused(metrics.STORE_UNREACHABLE)
            return refuse(CODE_UNREACHABLE, f"client '{msg.toClientId}' is not on this relay node and the "
                                            f"{UNREACHABLE}; try again when it is back")
        waiting.data_node = data_node or "?"
        if data_node is None:
            self._take_ticket(ticket)
            self.server.metrics.cluster_request_refused(metrics.TARGET_OFFLINE)
            return refuse("client_offline", f"client '{msg.toClientId}' is not online")
        self.server.metrics.cluster_request_sent()
        if not heard:
            self._take_ticket(ticket)
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
        if message["protocol"] == "udp":  # a TCP session ends by its sockets, on the data node
            with self._lock:
                self._outbound[session_id] = (data_node, conn.client_id)
        told = conn.send(p.CreateSession(
            sessionId=session_id, peerClientId=waiting.to_client, secret=message["secret"],
            service=p.Service(port=message["remotePort"], protocol=message["protocol"]),
            relayAddr=p.RelayAddr(host=message["host"], port=message["port"], protocol=message["protocol"]),
            requestId=waiting.request_id, peerPublicKey=message.get("publicKey")))
        if not told:
            self._end_remote(session_id, conn.client_id, "requesting client went offline", data_node)

    def _on_refused(self, message: dict) -> None:
        waiting = self._take_ticket(message["ticket"])
        if waiting is not None:
            self.server.metrics.cluster_request_refused(_REFUSAL_REASONS.get(message["code"], metrics.OTHER))
            waiting.conn.send(p.Error(message=message["message"], code=message["code"],
                                      requestId=waiting.request_id))

    def _on_closed(self, message: dict) -> None:
        """The data node closed a session one of our clients is in: tell that client."""
        session_id = message["sessionId"]
        with self._lock:
            self._outbound.pop(session_id, None)
        conn = self.server.registry.get(message["clientId"])
        if conn is not None:
            conn.send(p.SessionClosed(sessionId=session_id, reason=message["reason"]))

    def forward_session_closed(self, conn: ControlConnection, msg: p.SessionClosed) -> None:
        """Our client ended a session pumped on another node (a UDP flow): tell that node."""
        with self._lock:
            entry = self._outbound.get(msg.sessionId)
        if entry is not None and entry[1] == conn.client_id:
            self._end_remote(msg.sessionId, conn.client_id, msg.reason)

    def _end_remote(self, session_id: str, client_id: str | None, reason: str,
                    data_node: str | None = None) -> None:
        with self._lock:
            entry = self._outbound.pop(session_id, None)
        data_node = entry[0] if entry is not None else data_node
        if data_node is None:
            return
        try:
            self.store.publish(data_node, {"type": "end", "sessionId": session_id, "clientId": client_id,
                                           "reason": reason})
        except StoreUnreachable:
            pass  # the data node closes it by its own deadlines

    def _expire_tickets(self) -> None:
        now = time.monotonic()
        with self._lock:
            late = [t for t, w in self._tickets.items() if w.deadline <= now]
            expired = [self._tickets.pop(t) for t in late]
        for waiting in expired:
            self.server.metrics.cluster_request_refused(metrics.TIMEOUT)
            waiting.conn.send(p.Error(message=f"relay node {waiting.data_node}, where client "
                                              f"'{waiting.to_client}' is, did not answer within "
                                              f"{REQUEST_TIMEOUT:g} s", code="timeout",
                                      requestId=waiting.request_id))

    # --- data side: B is ours, A is elsewhere ---------------------------------------------------

    def _on_connect(self, message: dict) -> None:
        server, origin, ticket = self.server, message["origin"], message["ticket"]
        from_client, to_client, protocol = message["fromClientId"], message["toClientId"], message["protocol"]

        def answer(reply: dict) -> None:
            try:
                self.store.publish(origin, {"ticket": ticket, **reply})
            except StoreUnreachable:
                pass  # the origin's ticket times out

        target = server.registry.get(to_client)
        if target is None:
            server.metrics.session_refused(protocol, metrics.TARGET_OFFLINE)
            return answer({"type": "refused", "code": "client_offline",
                           "message": f"client '{to_client}' is not online"})
        refused = server.caps.refusal(server.sessions, from_client, to_client, protocol)
        if refused is not None:
            server.metrics.session_refused(protocol, refused.limit)
            return answer({"type": "refused", "code": "limit", "message": refused.message})
        session = server.sessions.create(from_client, to_client, message["remotePort"], protocol)
        session.sealed = message.get("publicKey") is not None and target.public_key is not None
        with self._lock:
            self._inbound[session.id] = (origin, from_client)
        # A's answer first, so A and B start at once; should B be gone, "closed" follows it on
        # the same channel, in order.
        host, port = parse_advertise(self.advertise)
        answer({"type": "created", "node": self.node_id, "sessionId": session.id, "secret": session.secret_a, "host": host,
                "port": port, "remotePort": message["remotePort"], "protocol": protocol,
                "publicKey": target.public_key})
        told = target.send(p.ConnectOffer(
            toClientId=to_client, remotePort=message["remotePort"], remoteHost=message.get("remoteHost"),
            protocol=protocol, localPort=message.get("localPort"), fromClientId=from_client,
            sessionId=session.id, secret=session.secret_b, relayAddr=server.relay_addr(target, protocol),
            peerPublicKey=message.get("publicKey")))
        if not told:
            server.close_session(session, f"client '{to_client}' went offline")
        else:
            server.metrics.session_opened(protocol)

    # --- sealed UDP: each side's signed key half reaches the other across nodes -----------------

    def forward_keys(self, conn: ControlConnection, msg: p.SessionKeys) -> bool:
        """A's half, for a session pumped on another node: to that node (True), if it is A's."""
        with self._lock:
            entry = self._outbound.get(msg.sessionId)
        if entry is None or entry[1] != conn.client_id:
            return False
        self._publish_keys(entry[0], msg, to=None)
        return True

    def keys_to_origin(self, session_id: str, msg: p.SessionKeys) -> bool:
        """B's half, for a session whose A is on another node: to A's node (True), if so."""
        with self._lock:
            entry = self._inbound.get(session_id)
        if entry is None:
            return False
        self._publish_keys(entry[0], msg, to=entry[1])
        return True

    def _publish_keys(self, node: str, msg: p.SessionKeys, to: str | None) -> None:
        try:
            self.store.publish(node, {"type": "keys", "to": to, "frame": p.encode(msg)})
        except StoreUnreachable as exc:
            self._mark(False, str(exc))  # the flow times out waiting for the keys, with that reason

    def _on_keys(self, message: dict) -> None:
        msg = p.decode(message["frame"], sender="client")
        if not isinstance(msg, p.SessionKeys):
            return
        to = message.get("to")
        if to is None:  # A's half, here on the data node: for the session's B
            session = self.server.sessions.get(msg.sessionId)
            to = session.client_b if session is not None else None
        elif self._outbound.get(msg.sessionId, (None, None))[1] != to:
            return  # not a session of ours for that client
        conn = self.server.registry.get(to) if to else None
        if conn is not None:
            conn.send(msg)

    def _on_end(self, message: dict) -> None:
        """The origin's client ended a session pumped here."""
        session = self.server.sessions.get(message["sessionId"])
        with self._lock:
            entry = self._inbound.get(message["sessionId"])
        if session is None or entry is None or entry[1] != message["clientId"]:
            return
        self.server.close_session(session, message["reason"], notify=False)
        peer = self.server.registry.get(session.client_b)
        if peer is not None:
            said = "ended" if p.is_normal_end(message["reason"]) else "closed"
            peer.send(p.SessionClosed(sessionId=session.id,
                                      reason=f"{said} by '{message['clientId']}': {message['reason']}"))

    def session_closed(self, session_id: str, reason: str, notify: bool) -> None:
        """Hook of Server.close_session: forget a session pumped here for a remote A, telling A's
        node when the relay itself ends it (``notify``), as a local A would be told."""
        with self._lock:
            entry = self._inbound.pop(session_id, None)
        if entry is not None and notify:
            self._tell_origin(entry, session_id, reason)

    def tell_origin(self, session_id: str, reason: str) -> bool:
        """B ended a session whose A is on another node: tell A there (before the close, which
        forgets the origin). False if A is not remote."""
        with self._lock:
            entry = self._inbound.pop(session_id, None)
        if entry is None:
            return False
        self._tell_origin(entry, session_id, reason)
        return True

    def _tell_origin(self, entry: tuple[str, str], session_id: str, reason: str) -> None:
        try:
            self.store.publish(entry[0], {"type": "closed", "sessionId": session_id, "clientId": entry[1],
                                          "reason": reason})
        except StoreUnreachable:
            pass  # A's side learns it from its data channel

    # --- the bus ----------------------------------------------------------------------------------

    def _bus_loop(self) -> None:
        stopping, pubsub, backoff = self.server.stopping, None, 0.1
        handlers = {"connect": self._on_connect, "created": self._on_created, "refused": self._on_refused,
                    "closed": self._on_closed, "end": self._on_end, "keys": self._on_keys}
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
                handler = handlers.get(message.get("type")) if message else None
                if handler is None:
                    continue
                if handler == self._on_connect:
                    # Its offer to B may wait on a client that does not read: never on this thread,
                    # which every other cross-node message goes through.
                    self.server.threads.spawn(f"cluster-connect-{str(message.get('ticket'))[:24]}",
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
