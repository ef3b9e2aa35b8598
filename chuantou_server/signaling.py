"""One client's WebSocket control channel on the relay: registration, heartbeats, and the
messages that create, accept, reject and close sessions.

Each connection is served by its own thread reading messages; every outgoing message goes
through ``ControlConnection.send`` (one writer lock underneath, see control_socket). Closing
never waits on the peer: it shuts the socket down, which also wakes a thread blocked sending.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import TYPE_CHECKING, Any, Callable

import simple_websocket
from wsproto.utilities import LocalProtocolError

from common import direct, handshake
from common import protocol as p
from common.net import shutdown_quietly

from . import direct_claims, metrics

if TYPE_CHECKING:
    from .admission import Admission
    from .pool import ClientPool
    from .server import Server
    from .sessions import Session

log = logging.getLogger("chuantou.server")

# simple-websocket can close a connection without waking a blocked receive(): when a message
# exceeds max_message_size it sets its event before it marks itself disconnected, and a
# receive() that wakes in between goes back to waiting forever. Waiting in slices bounds that.
RECEIVE_POLL = 1.0


class ControlConnection:
    def __init__(self, server: Server, ws: simple_websocket.Server, sock: socket.socket, remote: tuple,
                 relay_host: str, admission: Admission | None = None):
        self.server = server
        self.ws = ws
        self.admission = admission  # our place under the unregistered cap, released on register
        self.sock = sock
        self.remote = remote
        self.relay_host = relay_host
        self.client_id: str | None = None
        self.credential: str | None = None  # which token this connection proved (None: open relay)
        self.public_key: str | None = None  # as it registered it; passed on to peers as a hint only
        self.features: frozenset[str] = frozenset()  # what it said it supports (p.FEATURE_*)
        self.pool: ClientPool | None = None  # its pooled data channels (pool.py), once registered
        self.challenge = server.authenticator.challenge()
        self.nonce = self.challenge.nonce
        self.connected_at = time.time()
        self.opened = time.monotonic()
        self.last_seen = time.monotonic()
        self._closed = threading.Event()

    def __repr__(self) -> str:
        return f"<ControlConnection {self.client_id or '(unregistered)'} from {self.remote[0]}:{self.remote[1]}>"

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    # --- I/O --------------------------------------------------------------------------------

    def serve(self) -> None:
        """Read and handle messages until the connection ends."""
        try:
            self.send(self.challenge)
            while not self._closed.is_set():
                try:
                    frame = self.ws.receive(timeout=RECEIVE_POLL)
                except simple_websocket.ConnectionClosed:
                    break
                if frame is None:
                    if not self.ws.connected:  # closed without waking us (see RECEIVE_POLL)
                        break
                    continue
                self._message_taken()
                self.last_seen = time.monotonic()
                self.handle_frame(frame)
        finally:
            self.close()
            self.server.connection_ended(self)

    def send(self, msg) -> bool:
        """Send one message; a failure closes this connection and returns False."""
        if self._closed.is_set():
            return False
        try:
            self.ws.send(p.encode(msg))
            return True
        except (simple_websocket.ConnectionClosed, LocalProtocolError, OSError) as exc:
            # LocalProtocolError: simple-websocket already sent a close frame (e.g. for a message
            # over max_message_size) but still counts itself connected
            log.info("control channel of %s lost while sending: %s", self, exc)
            self.close()
            return False

    def _message_taken(self) -> None:
        taken = getattr(self.ws.sock, "message_taken", None)
        if taken is not None:
            taken()

    def close(self) -> None:
        """Close without ever waiting on the peer (safe from the housekeeper and stop())."""
        if self._closed.is_set():
            return
        self._closed.set()
        begin_close = getattr(self.ws.sock, "begin_close", None)
        if begin_close is not None:
            begin_close()  # the close frame below goes out only if it fits without waiting
        try:
            self.ws.close()
        except Exception:  # already closed by the peer, or the socket is gone
            pass
        shutdown_quietly(self.sock)

    # --- messages ---------------------------------------------------------------------------

    def handle_frame(self, frame) -> None:
        try:
            msg = p.decode(frame, sender="client")
        except p.ProtocolError as exc:
            self.send(p.Error(message=f"bad message: {exc}", code="bad_message"))
            return
        if self.client_id is None and not isinstance(msg, p.Register):
            self.send(p.Error(message=f"send 'register' before '{msg.TYPE}'", code="not_registered"))
            return
        handler = _HANDLERS.get(type(msg))
        if handler is None:
            self.send(p.Error(message=f"'{msg.TYPE}' is not a message a client sends", code="bad_message"))
            return
        handler(self, msg)

    def on_register(self, msg: p.Register) -> None:
        if self.client_id is not None:
            self.send(p.Error(message=f"already registered as '{self.client_id}'", code="bad_request"))
            return
        version_problem = handshake.version_problem(msg.protocolVersion)
        if version_problem is not None:
            return self._refuse_registration(msg, version_problem)
        credential, problem = self.server.authenticator.check(msg.clientId, self.nonce, msg.auth)
        if problem is not None:
            return self._refuse_registration(msg, problem)
        self.credential = credential
        cluster = self.server.cluster
        redirect = cluster.redirects.answer(msg) if cluster is not None else None
        if redirect is not None:  # before the claim: nothing is held here for a redirected client
            return self._redirect_registration(msg, redirect)
        takeover, kicked_on = msg.takeover is not False, None
        if cluster is not None:  # one ID online once in the whole cluster (a takeover may drop it elsewhere)
            refused_elsewhere, kicked_on = cluster.claim(msg.clientId, credential, takeover)
            if refused_elsewhere is not None:
                return self._refuse_registration(msg, *refused_elsewhere)
        self.public_key = msg.publicKey  # before the claim: a peer may ask for a session at once
        self.features = frozenset(msg.features or ())
        claim = self.server.registry.claim(msg.clientId, self, takeover=takeover)
        if claim.refused is not None:
            if cluster is not None and self.server.registry.get(msg.clientId) is None:
                cluster.release(msg.clientId)  # held for nobody here
            return self._refuse_registration(msg, *self.server.registry.describe(msg.clientId, claim.refused))
        old = claim.replaced
        self.client_id = msg.clientId
        if self.admission is not None:
            self.admission.release()
        if old is not None:
            old.send(p.Error(
                message=f"client ID '{msg.clientId}' was registered by a new connection from "
                        f"{self.remote[0]}; this connection is closed",
                code="replaced",
            ))
            old.close()
        # udpPort tells the client this relay hands over direct-path candidates; a cluster node
        # does not yet (a session may live on another node), so its clients do not try
        direct = self.server.cluster is None
        self.pool, offer = self.server.pools.open_for(msg.clientId, self.server.relay_addr(self, "tcp"))
        # (closed with it in connection_ended, which runs on this same thread once serve() ends)
        self.send(p.RegisterResponse(success=True, assignedId=msg.clientId,
                                     existingKicked=old is not None or kicked_on is not None,
                                     udpPort=self.server.relay_addr(self, "udp").port if direct else None,
                                     probePort=self.server.probe_port if direct else None, pool=offer,
                                     features=[p.FEATURE_WARM]))
        log.info("client %s registered from %s:%s%s", msg.clientId, self.remote[0], self.remote[1],
                 " (replaced its previous connection)" if old else
                 f" (took it over from relay node {kicked_on})" if kicked_on else "")

    def _refuse_registration(self, msg: p.Register, problem: str, code: str | None = None) -> None:
        log.warning("registration as %s from %s refused: %s", msg.clientId, self.remote[0], problem)
        self.send(p.RegisterResponse(success=False, error=problem, code=code))
        self.close()

    def _redirect_registration(self, msg: p.Register, redirect: p.RegisterRedirect) -> None:
        self.send(redirect)
        self.close()

    def on_get_client_list(self, msg: p.GetClientList) -> None:
        registry = self.server.registry
        ids = set(registry.ids())
        if self.server.cluster is not None:  # the clients of every node
            ids.update(self.server.cluster.client_ids())
        clients = [p.ClientInfo(id=cid, publicKey=getattr(registry.get(cid), "public_key", None))
                   for cid in sorted(ids)]
        self.send(p.ClientList(clients=clients, requestId=msg.requestId))

    def on_connect_request(self, msg: p.ConnectRequest) -> None:
        def refuse(code: str, text: str, reason: str) -> None:
            self.server.metrics.session_refused(msg.protocol, reason)
            self.send(p.Error(message=text, code=code, requestId=msg.requestId))

        assert self.client_id is not None  # handle_frame lets nothing but a register through before it
        if msg.toClientId == self.client_id:
            return refuse("bad_request", "the target client is this client itself; reach the port directly",
                          metrics.TARGET_IS_SELF)
        target = self.server.registry.get(msg.toClientId)
        if msg.warm and (p.FEATURE_WARM not in target.features if target is not None else
                         self.server.cluster is not None):
            # an older target would ignore the flag and connect to its service at once; a target on
            # another node of a cluster is reached through messages that do not carry it yet
            return refuse(p.WARM_UNSUPPORTED, f"client '{msg.toClientId}' cannot hold warm sessions here (an older "
                          f"chuantou, or not on this node of the relay's cluster)", metrics.WARM_UNSUPPORTED)
        if target is None and self.server.cluster is not None:
            return self.server.cluster.connect_remote(self, msg)  # on another node, or offline
        if target is None:
            return refuse("client_offline", f"client '{msg.toClientId}' is not online", metrics.TARGET_OFFLINE)
        refused = self.server.caps.refusal(self.server.sessions, self.client_id, msg.toClientId, msg.protocol)
        if refused is not None:
            return refuse("limit", refused.message, refused.limit)
        session = self.server.sessions.create(self.client_id, msg.toClientId, msg.remotePort, msg.protocol)
        session.sealed = self.public_key is not None and target.public_key is not None
        session.warm = bool(msg.warm)
        told_target = target.send(p.ConnectOffer(
            toClientId=msg.toClientId,
            remotePort=msg.remotePort,
            remoteHost=msg.remoteHost,
            protocol=msg.protocol,
            localPort=msg.localPort,
            fromClientId=self.client_id,
            sessionId=session.id,
            secret=session.secret_b,
            relayAddr=self.server.relay_addr(target, msg.protocol),
            peerPublicKey=self.public_key,
            warm=True if msg.warm else None,
        ))
        if not told_target:
            self.server.close_session(session, "target went offline", notify=False)
            return refuse("client_offline", f"client '{msg.toClientId}' went offline", metrics.TARGET_OFFLINE)
        self.server.metrics.session_opened(msg.protocol)
        self.send(p.CreateSession(
            sessionId=session.id,
            peerClientId=msg.toClientId,
            secret=session.secret_a,
            service=p.Service(port=msg.remotePort, protocol=msg.protocol),
            relayAddr=self.server.relay_addr(self, msg.protocol),
            requestId=msg.requestId,
            peerPublicKey=target.public_key,
        ))

    def _own_session_as_target(self, session_id: str) -> Session | None:
        session = self.server.sessions.get(session_id)
        if session is None or session.client_b != self.client_id:
            self.send(p.Error(message=f"no session {session_id[:12]}... is waiting for this client",
                              code="unknown_session"))
            return None
        return session

    def _offered_elsewhere(self, session_id: str) -> bool:
        """A session this client was offered that is pumped on another node of the cluster."""
        cluster = self.server.cluster
        return (cluster is not None and self.server.sessions.get(session_id) is None
                and cluster.offered_here(self, session_id))

    def on_accept_session(self, msg: p.AcceptSession) -> None:
        # Nothing to record: B's data channel is what joins it. An unknown session is still an error.
        if not self._offered_elsewhere(msg.sessionId):
            self._own_session_as_target(msg.sessionId)

    def on_reject_session(self, msg: p.RejectSession) -> None:
        if self._offered_elsewhere(msg.sessionId):
            assert self.server.cluster is not None
            self.server.cluster.forward_reject(self, msg)  # to the data node, which tells A
            return
        session = self._own_session_as_target(msg.sessionId)
        if session is not None:
            reason = f"client '{self.client_id}' refused: {(msg.reason or 'no reason given')[:300]}"
            log.info("session %s: %s", session.id[:8], reason)
            self.server.close_session(session, reason)

    def on_session_closed(self, msg: p.SessionClosed) -> None:
        """A party ended a session the relay cannot see end (a UDP flow that went idle or was closed)."""
        assert self.client_id is not None  # handle_frame lets nothing but a register through before it
        session = self.server.sessions.get(msg.sessionId)
        if session is None and self.server.cluster is not None:
            return self.server.cluster.forward_session_closed(self, msg)  # pumped on another node
        if session is None or not session.involves(self.client_id):
            return  # already gone, or not this client's: nothing to do, nothing to reveal
        if direct_claims.is_direct(session):  # each side ends its direct connection itself: the peer is not told
            session.direct_held = True  # (its relay pipe may not have been seen to end yet): its claims count
            self.server.close_session(session, msg.reason, notify=False)
            return
        other = session.client_b if self.client_id == session.client_a else session.client_a
        said = "ended" if p.is_normal_end(msg.reason) else "closed"  # keep a normal end normal for the peer
        told = f"{said} by '{self.client_id}': {msg.reason}"
        if self.server.cluster is not None:
            self.server.cluster.tell_remote_parties(session.id, told)  # a peer on another node (before the close)
        self.server.close_session(session, msg.reason, notify=False)
        peer = self.server.registry.get(other)
        if peer is not None:
            peer.send(p.SessionClosed(sessionId=session.id, reason=told))

    def on_path_candidates(self, msg: p.PathCandidates) -> None:
        """A side of a session offers a direct path: add the address its UDP (or its TCP data
        channel) came from, and once both sides have offered, hand each the other's (nothing
        when either wants the relay)."""
        assert self.client_id is not None  # handle_frame lets nothing but a register through before it
        session = self.server.sessions.get(msg.sessionId)
        if session is None or not session.involves(self.client_id):
            return  # already gone, or not this client's: nothing to do, nothing to reveal
        side = 0 if self.client_id == session.client_a else 1
        if session.candidates[side] is not None:
            return  # one offer per side and session
        seen = _seen_address(session, side)
        candidates = list(msg.candidates)
        if seen is not None:
            candidates.insert(0, direct.format_candidate(*seen[:2]))  # the NAT's side of it first
        unique = list(dict.fromkeys(candidates))  # no NAT: the address seen is the local one
        session.candidates[side] = (unique[:direct.MAX_CANDIDATES], msg.path)
        if None in session.candidates:
            return
        (cand_a, path_a), (cand_b, path_b) = session.candidates
        relay_only = "relay" in (path_a, path_b)
        for client_id, theirs in ((session.client_a, cand_b), (session.client_b, cand_a)):
            conn = self.server.registry.get(client_id)
            if conn is not None:
                conn.send(p.PeerCandidates(sessionId=session.id, candidates=[] if relay_only else theirs,
                                           punchKey=None if relay_only else session.punch_key))

    def on_path_report(self, msg: p.PathReport) -> None:
        """A side's claim of the path its session took and the bytes it moved directly: kept,
        bounded, for the admin page and metrics (direct_claims.py); never trusted for anything else."""
        assert self.client_id is not None  # handle_frame lets nothing but a register through before it
        session = self.server.sessions.get(msg.sessionId)
        if session is None or session.closed or not session.involves(self.client_id):
            return  # already gone, or not this client's: nothing to do, nothing to reveal
        direct_claims.record(session, 0 if self.client_id == session.client_a else 1, msg)

    def on_path_sync(self, msg: p.PathSync) -> None:
        """A TCP session's direct attempt keeps time through us (DCUtR's round trip and SYNC):
        passed on, unchanged, to the session's other side only."""
        assert self.client_id is not None  # handle_frame lets nothing but a register through before it
        session = self.server.sessions.get(msg.sessionId)
        if session is None or session.protocol != "tcp" or not session.involves(self.client_id):
            return  # already gone, or not this client's: nothing to do, nothing to reveal
        peer = self.server.registry.get(session.client_b if self.client_id == session.client_a else session.client_a)
        if peer is not None:
            peer.send(msg)

    def on_session_keys(self, msg: p.SessionKeys) -> None:
        """Half of a sealed UDP session's key exchange: passed on, unchanged, to the session's other
        side only (the relay cannot use it: it is signed, and the keys it leads to stay with A and B)."""
        assert self.client_id is not None  # handle_frame lets nothing but a register through before it
        session = self.server.sessions.get(msg.sessionId)
        cluster = self.server.cluster
        if session is None and cluster is not None and cluster.forward_keys(self, msg):
            return  # pumped on another node of the cluster
        if session is None or session.protocol != "udp" or not session.involves(self.client_id):
            self.send(p.Error(message=f"no UDP session {msg.sessionId[:12]}... of this client",
                              code="unknown_session"))
            return
        other = session.client_b if self.client_id == session.client_a else session.client_a
        peer = self.server.registry.get(other)
        if peer is not None:
            peer.send(msg)
        elif cluster is not None:
            cluster.keys_to_peer(session.id, msg, other)  # the other side is on another node

    def on_heartbeat(self, msg: p.Heartbeat) -> None:
        # Echo it, so the client can tell a silent relay from a quiet one.
        self.send(p.Heartbeat(timestamp=msg.timestamp))

    def on_unregister(self, msg: p.Unregister) -> None:
        self.server.drop_client(self, "unregistered")


def _seen_address(session: Session, side: int) -> tuple | None:
    """Where this side's traffic reached us from: its registered UDP address, or the peer
    address of its TCP data channel (what its NAT maps the port it will dial from to)."""
    if session.protocol == "udp":
        return session.udp_a if side == 0 else session.udp_b
    return session.tcp_seen[side]


_HANDLERS: dict[type[p.Message], Callable[[ControlConnection, Any], None]] = {
    p.Register: ControlConnection.on_register,
    p.GetClientList: ControlConnection.on_get_client_list,
    p.ConnectRequest: ControlConnection.on_connect_request,
    p.AcceptSession: ControlConnection.on_accept_session,
    p.RejectSession: ControlConnection.on_reject_session,
    p.Heartbeat: ControlConnection.on_heartbeat,
    p.Unregister: ControlConnection.on_unregister,
    p.SessionClosed: ControlConnection.on_session_closed,
    p.PathCandidates: ControlConnection.on_path_candidates,
    p.PathReport: ControlConnection.on_path_report,
    p.SessionKeys: ControlConnection.on_session_keys,
    p.PathSync: ControlConnection.on_path_sync,
}
