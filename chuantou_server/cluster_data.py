"""The data side of a cross-node session (part of ``Cluster``, cluster.py): B's node placing it
on a data node, the data node hosting it, and its end and its sealed-UDP keys crossing nodes.

B's node (the target node, T) gets ``connect`` and asks the data-node policy (cluster_view.py):

- ``b``, or a tie: T itself hosts the session (``_host``) and sends B the offer.
- another node D: T publishes ``host`` to D (with B's public key). D hosts the session, answers
  the origin (``created``, or itself when A is D's own) and publishes ``offer`` to T, which sends
  B the offer with relayAddr = D. If D does not listen, T hosts it after all.

On the data node ``_inbound`` maps each session to its parties on other nodes (client -> node):
every end the data node sees is told to those nodes (``closed``), every end a party's node
sees comes as ``end``. Messages (besides those in cluster.py): ``host`` {the ``connect`` fields,
target, targetPublicKey}, ``offer`` {sessionId, node, secret, host, port, fromClientId, toClientId,
remotePort, remoteHost, protocol, localPort, publicKey}, ``end`` may carry ``rejected`` (B's own
words, passed on as they are).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

from common import protocol as p

from . import metrics
from .cluster_store import ClusterStore, PendingKey, StoreUnreachable
from .cluster_view import NodeTable

if TYPE_CHECKING:
    from .server import Server
    from .signaling import ControlConnection

log = logging.getLogger("chuantou.server")

OFFER_GRACE = 10.0  # B's side forgets an offer pumped elsewhere this long after the join deadline


class DataSide:
    # set by Cluster.__init__
    server: Server
    node_id: str
    advertise: str
    store: ClusterStore
    table: NodeTable
    policy: str
    _lock: threading.Lock
    _inbound: dict[str, dict[str, str]]
    _outbound: dict[str, tuple[str, str | None]]
    _offers: dict[str, tuple[str, str, float]]

    def _mark(self, reachable: bool, why: str = "") -> None:
        raise NotImplementedError

    def _address(self) -> tuple[str, int]:
        raise NotImplementedError

    def pending_key(self, session, message: dict) -> PendingKey:
        raise NotImplementedError

    # --- B's node: where is it pumped --------------------------------------------------------------

    def _on_connect(self, message: dict) -> None:
        server, to_client, protocol = self.server, message["toClientId"], message["protocol"]
        target = server.registry.get(to_client)
        if target is None:
            server.metrics.session_refused(protocol, metrics.TARGET_OFFLINE)
            return self._answer(message, {"type": "refused", "code": "client_offline",
                                          "message": f"client '{to_client}' is not online"})
        data_node = self.table.choose(self.policy, len(server.sessions))
        if data_node != self.node_id:
            try:
                heard = self.store.publish(data_node, {**message, "type": "host", "target": self.node_id,
                                                       "targetPublicKey": target.public_key})
            except StoreUnreachable as exc:
                self._mark(False, str(exc))
                heard = 0
            if heard:
                return
            log.info("data node %s chosen for a session to %s does not listen; pumping it here", data_node, to_client)
        self._host(message, target, None)

    def _on_host(self, message: dict) -> None:
        """B's node chose this node to pump a session between clients of other nodes (or A's)."""
        self._host(message, None, message["target"])

    def _on_offer(self, message: dict) -> None:
        """The data node made a session for our client B: send B the offer."""
        session_id, data_node, to_client = message["sessionId"], message["node"], message["toClientId"]
        target = self.server.registry.get(to_client)
        if target is not None:
            deadline = time.monotonic() + self.server.config.session_join_timeout + OFFER_GRACE
            with self._lock:
                self._offers[session_id] = (data_node, to_client, deadline)
                if message["protocol"] == "udp":  # ended by a party: B's end goes to the data node
                    self._outbound[session_id] = (data_node, to_client)
            if target.send(self._offer(message, p.RelayAddr(host=message["host"], port=message["port"],
                                                            protocol=message["protocol"]))):
                return
        self._end_remote(session_id, to_client, f"client '{to_client}' went offline", data_node)

    # --- the data node -------------------------------------------------------------------------------

    def _answer(self, message: dict, reply: dict, pending: PendingKey | None = None) -> None:
        """To the origin's ticket: through the bus (with the session's pending key, if any), or at
        once when the origin is this node."""
        reply = {"ticket": message["ticket"], **reply}
        if message["origin"] == self.node_id:
            return self._origin_handle(reply)
        try:
            self.store.publish(message["origin"], reply, pending)
        except StoreUnreachable:
            pass  # the origin's ticket times out

    def _origin_handle(self, reply: dict) -> None:
        raise NotImplementedError

    def _host(self, message: dict, target: ControlConnection | None, target_node: str | None) -> None:
        """Make the session here and tell both sides: B directly (``target``) or through its node."""
        server, origin = self.server, message["origin"]
        from_client, to_client, protocol = message["fromClientId"], message["toClientId"], message["protocol"]
        refused = server.caps.refusal(server.sessions, from_client, to_client, protocol)
        if refused is not None:
            server.metrics.session_refused(protocol, refused.limit)
            return self._answer(message, {"type": "refused", "code": "limit", "message": refused.message})
        b_key = target.public_key if target is not None else message.get("targetPublicKey")
        session = server.sessions.create(from_client, to_client, message["remotePort"], protocol)
        session.sealed = message.get("publicKey") is not None and b_key is not None
        remote = {from_client: origin} if origin != self.node_id else {}
        if target_node is not None:
            remote[to_client] = target_node
        with self._lock:
            self._inbound[session.id] = remote
        # its pending key goes with the first message about it that crosses the store (no round trip of its own)
        pending = self.pending_key(session, message)
        # A's answer first, so A and B start at once; should B be gone, "closed" follows it on
        # the same channel, in order.
        host, port = self._address()
        self._answer(message, {"type": "created", "node": self.node_id, "sessionId": session.id,
                               "secret": session.secret_a, "host": host, "port": port,
                               "remotePort": message["remotePort"], "protocol": protocol, "publicKey": b_key},
                     pending if origin != self.node_id else None)
        if target is not None:
            told = target.send(self._offer({**message, "sessionId": session.id, "secret": session.secret_b},
                                           server.relay_addr(target, protocol)))
        else:
            told = self._publish(target_node, {
                **{k: message.get(k) for k in ("fromClientId", "toClientId", "remotePort", "remoteHost",
                                               "protocol", "localPort", "publicKey")},
                "type": "offer", "sessionId": session.id, "node": self.node_id, "secret": session.secret_b,
                "host": host, "port": port}, pending if origin == self.node_id else None)
        if not told:
            server.close_session(session, f"client '{to_client}' went offline")
        else:
            server.metrics.session_opened(protocol)

    @staticmethod
    def _offer(message: dict, relay_addr: p.RelayAddr) -> p.ConnectOffer:
        return p.ConnectOffer(
            toClientId=message["toClientId"], remotePort=message["remotePort"], remoteHost=message.get("remoteHost"),
            protocol=message["protocol"], localPort=message.get("localPort"), fromClientId=message["fromClientId"],
            sessionId=message["sessionId"], secret=message["secret"], relayAddr=relay_addr,
            peerPublicKey=message.get("publicKey"))

    def _publish(self, node: str | None, message: dict, pending: PendingKey | None = None) -> bool:
        if node is None:
            return False
        try:
            return self.store.publish(node, message, pending) > 0
        except StoreUnreachable as exc:
            self._mark(False, str(exc))
            return False

    # --- ends ------------------------------------------------------------------------------------------

    def _on_end(self, message: dict) -> None:
        """A party on another node ended (or B rejected) a session pumped here."""
        session_id, client_id = message["sessionId"], message["clientId"]
        session = self.server.sessions.get(session_id)
        with self._lock:
            entry = self._inbound.get(session_id)
            if session is None or entry is None or client_id not in entry:
                return
            del self._inbound[session_id]
        self.server.close_session(session, message["reason"], notify=False)
        if message.get("rejected"):
            told = message["reason"]
        else:
            said = "ended" if p.is_normal_end(message["reason"]) else "closed"
            told = f"{said} by '{client_id}': {message['reason']}"
        other = session.client_b if client_id == session.client_a else session.client_a
        self._tell_party(session_id, other, entry.get(other), told)

    def _tell_party(self, session_id: str, client_id: str, node: str | None, reason: str) -> None:
        """Tell one party a session ended: on its node when it is elsewhere, else directly."""
        if node is not None:
            self._publish(node, {"type": "closed", "sessionId": session_id, "clientId": client_id, "reason": reason})
            return
        conn = self.server.registry.get(client_id)
        if conn is not None:
            conn.send(p.SessionClosed(sessionId=session_id, reason=reason))

    def session_closed(self, session_id: str, reason: str, notify: bool) -> None:
        """Hook of Server.close_session: forget a session pumped here for parties elsewhere, telling
        their nodes when the relay itself ends it (``notify``), as a local party would be told."""
        with self._lock:
            entry = self._inbound.pop(session_id, None)
        if entry and notify:
            for client_id, node in entry.items():
                self._tell_party(session_id, client_id, node, reason)

    def tell_remote_parties(self, session_id: str, reason: str) -> bool:
        """A local party ended a session pumped here: tell the parties on other nodes (before the
        close, which forgets them). False if none is elsewhere."""
        with self._lock:
            entry = self._inbound.pop(session_id, None)
        for client_id, node in (entry or {}).items():
            self._tell_party(session_id, client_id, node, reason)
        return bool(entry)

    def _end_remote(self, session_id: str, client_id: str | None, reason: str,
                    data_node: str | None = None, rejected: bool = False) -> None:
        with self._lock:
            entry = self._outbound.pop(session_id, None)
            self._offers.pop(session_id, None)
        data_node = entry[0] if entry is not None else data_node
        if data_node is not None:
            self._publish(data_node, {"type": "end", "sessionId": session_id, "clientId": client_id,
                                      "reason": reason, **({"rejected": True} if rejected else {})})

    def forward_reject(self, conn: ControlConnection, msg: p.RejectSession) -> bool:
        """Our B refused a session pumped on another node: tell that node (True), if it is B's."""
        with self._lock:
            offer = self._offers.get(msg.sessionId)
        if offer is None or offer[1] != conn.client_id:
            return False
        reason = f"client '{conn.client_id}' refused: {(msg.reason or 'no reason given')[:300]}"
        self._end_remote(msg.sessionId, conn.client_id, reason, offer[0], rejected=True)
        return True

    def offered_here(self, conn: ControlConnection, session_id: str) -> bool:
        """Is ``session_id`` an offer we passed to ``conn``'s client for a session pumped elsewhere?"""
        with self._lock:
            offer = self._offers.get(session_id)
        return offer is not None and offer[1] == conn.client_id

    def _expire_offers(self, now: float) -> None:
        with self._lock:
            for session_id in [sid for sid, (_, _, due) in self._offers.items() if due <= now]:
                del self._offers[session_id]

    # --- sealed UDP: each side's signed key half reaches the other across nodes -----------------

    def forward_keys(self, conn: ControlConnection, msg: p.SessionKeys) -> bool:
        """A party's half, for a session pumped on another node: to that node (True), if it is its."""
        with self._lock:
            entry = self._outbound.get(msg.sessionId)
        if entry is None or entry[1] != conn.client_id:
            return False
        self._publish(entry[0], {"type": "keys", "to": None, "from": conn.client_id, "frame": p.encode(msg)})
        return True

    def keys_to_peer(self, session_id: str, msg: p.SessionKeys, peer: str) -> bool:
        """A local party's half, for a session pumped here whose ``peer`` is on another node."""
        with self._lock:
            node = self._inbound.get(session_id, {}).get(peer)
        if node is None:
            return False
        self._publish(node, {"type": "keys", "to": peer, "frame": p.encode(msg)})
        return True

    def _on_keys(self, message: dict) -> None:
        msg = p.decode(message["frame"], sender="client")
        if not isinstance(msg, p.SessionKeys):
            return
        to = message.get("to")
        if to is None:  # a party's half, here on the data node: for the other party
            session = self.server.sessions.get(msg.sessionId)
            sender = message.get("from") or (session.client_a if session is not None else None)
            if session is None or sender not in (session.client_a, session.client_b):
                return
            with self._lock:
                if sender not in self._inbound.get(session.id, {}):
                    return  # not a party on another node
            to = session.client_b if sender == session.client_a else session.client_a
            if self.keys_to_peer(session.id, msg, to):
                return
        elif self._outbound.get(msg.sessionId, (None, None))[1] != to:
            return  # not a session of ours for that client
        conn = self.server.registry.get(to) if to else None
        if conn is not None:
            conn.send(msg)
