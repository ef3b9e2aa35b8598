"""The target side (B): answer the relay's ``connect_request`` by connecting to the local
service and joining the session, or rejecting it.

A requester learns only that it was refused ("not allowed by the target", "the target cannot
reach ..."): which ports B allows, and why a host of B's network did not answer, stay in B's
own log."""

from __future__ import annotations

import logging
import socket
import threading

from common import protocol as p
from common.identity import decode_public_key
from common.errors import ChuantouError
from common.limits import LimitLog
from common.net import reset_connection, tune_tcp
from common.pipe import Pipe

from . import directchoice, warmtarget
from .earlyjoin import EarlyJoin
from .selfguard import resolve_for_connect
from .udptarget import UdpTarget

log = logging.getLogger("chuantou.client")

LOCAL_CONNECT_TIMEOUT = 5.0
REJECT_GRACE = 5.0  # how long a rejected, joined session waits for the relay to close it
SELF_REFUSAL = "it is one of this client's own ports (its local API or a proxy), which no session may reach"


class PendingConnects:
    """At most ``limit`` sessions being set up at once on B (connect to the service, then join):
    a requester that floods ``connect_request`` cannot make B open thousands of connections
    and threads. Sessions already joined do not count."""

    def __init__(self, limit: int):
        self.limit = limit
        self._lock = threading.Lock()
        self._count = 0
        self.limit_log = LimitLog(log)

    @property
    def in_progress(self) -> int:
        with self._lock:
            return self._count

    def enter(self, requester: str) -> "SetupSlot | None":
        """A slot for one session's setup, or None (and logged) when all are taken."""
        with self._lock:
            if self._count < self.limit:
                self._count += 1
                return SetupSlot(self)
        self.limit_log.bit("maxPendingConnects", requester,
                           "refusing sessions from %s: %d are already being set up on this client "
                           "(max_pending_connects)", requester, self.limit)
        return None

    def _leave(self) -> None:
        with self._lock:
            self._count -= 1


class SetupSlot:
    """Held from the offer until the session is joined (or fails); released once."""

    def __init__(self, owner: PendingConnects):
        self._owner: PendingConnects | None = owner

    def release(self) -> None:
        owner, self._owner = self._owner, None
        if owner is not None:
            owner._leave()

    def __enter__(self) -> "SetupSlot":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def target_label(msg: p.ConnectOffer) -> str:
    """The target as the requester named it (B's default host is not the requester's business)."""
    return f"{msg.remoteHost}:{msg.remotePort}" if msg.remoteHost else f"port {msg.remotePort}"


class Prepared:
    """An offer that passed the checks that need no I/O: its setup slot and, for TCP, the
    pooled channel whose join header already went out (or none)."""

    def __init__(self, slot: SetupSlot, early: EarlyJoin | None):
        self.slot = slot
        self.early = early

    def abandon(self) -> None:
        if self.early is not None:
            self.early.close()
        self.slot.release()


def prepare_offer(client, msg: p.ConnectOffer) -> Prepared | None:
    """On the control reader thread, so nothing here blocks: the refusals that need no I/O,
    then, for TCP, the join header on a pooled channel, so the relay joins this side while the
    session's thread starts. None: refused (and the relay told)."""
    slot = client.pending_connects.enter(msg.fromClientId)
    if slot is None:
        _reject(client, msg, "the target client is busy setting up other sessions; try again shortly")
        return None
    refusal = _policy_refusal(client, msg)
    if refusal is not None:
        slot.release()
        _reject(client, msg, refusal)
        return None
    early = None
    if msg.protocol == "tcp":
        early = EarlyJoin.take(client, "B")
        early.send_header(msg)
    return Prepared(slot, early)


def _policy_refusal(client, msg: p.ConnectOffer) -> str | None:
    """What A is told if this client's own rules refuse the session (the reason stays in our log)."""
    service = (msg.remoteHost or client.target_host, msg.remotePort)
    refusal = client.export.refusal(*service)
    if refusal is not None:
        log.warning("session from %s to %s:%d refused: %s", msg.fromClientId, service[0], service[1], refusal)
        return f"{target_label(msg)} is not allowed by the target client"
    refusal = client.sealing.early_refusal(msg.fromClientId, msg.peerPublicKey)
    if refusal is not None:
        log.warning("session from %s refused: %s", msg.fromClientId, refusal)
        return "the target client does not accept sessions from this client"
    if msg.protocol == "tcp":
        refusal = client.sealing.unsealed_refusal(msg.fromClientId, msg.peerPublicKey, client.allow_unsealed)
        if refusal is not None:
            log.warning("session from %s refused: %s", msg.fromClientId, refusal)
            return "the target client requires sealed sessions"
    return None


def serve_connect_request(client, msg: p.ConnectOffer, prepared: Prepared | None = None) -> None:
    """Serve an offer on its own thread (``prepared``: prepare_offer already ran for it)."""
    if prepared is None:
        prepared = prepare_offer(client, msg)
        if prepared is None:
            return
    try:
        with prepared.slot:
            _serve(client, msg, prepared)
    finally:
        if prepared.early is not None:
            prepared.early.close()  # not taken: the session failed before its join


def _serve(client, msg: p.ConnectOffer, prepared: Prepared) -> None:
    service = (msg.remoteHost or client.target_host, msg.remotePort)
    slot = prepared.slot
    if msg.protocol == "udp":
        slot.release()  # nothing slow to set up: no connection to the service
        flow = UdpTarget(client, msg, service)
        with client.sessions.track(msg.sessionId, "B", handle=flow, **_session_facts(msg)) as record:
            flow.record = record
            flow.run()
        return
    candidates = _checked_addresses(client, msg, service)
    if candidates is None:
        if prepared.early is not None and prepared.early.header_sent:
            _await_relay_close(prepared.early.sock)  # joined already: let the rejection reach A first
            prepared.early.sock = None
        return
    with client.sessions.track(msg.sessionId, "B", **_session_facts(msg)) as record:
        try:
            relay = client.join_session(record, msg, prepared.early)
            record.sealed = decode_public_key(msg.peerPublicKey) is not None
            if record.sealed:  # else an older requester, allowed: in the clear (and never direct)
                relay = directchoice.seal_b(client, relay, msg, record,
                                         on_failure=lambda error: _reject(client, msg, error.peer_reason))
        except ChuantouError as exc:
            log.warning("session from %s to port %d failed: %s", msg.fromClientId, msg.remotePort, exc)
            return
        # A warm session waits here, sealed, for A's go frame (warmtarget.py)
        if msg.warm and not warmtarget.await_go(client, msg, relay, service, slot):
            return
        # Only now, with A's key proved: a relay that lies cannot make B open connections to its services.
        local = _connect_service(client, msg, service, candidates)
        if local is None:
            _await_relay_close(relay)
            return
        tune_tcp(local)
        local.settimeout(None)
        slot.release()  # joined: from here on the session counts against the relay's caps, not this one
        pipe = Pipe(relay, local)
        client.sessions.attach(record, pipe)
        # accept_session goes out from the pump's second thread: the relay needs nothing from it to
        # relay, so A's first bytes do not wait behind a control message. A direct session's relay
        # half is gone already, and a warm one is the user's by now: nothing to accept (the relay records nothing).
        accept = None if record.path == "direct" or msg.warm else (
            lambda: _send_quietly(client, p.AcceptSession(sessionId=msg.sessionId)))
        try:
            pipe.run(client.threads, f"b-{msg.sessionId[:8]}", before=accept)
        finally:
            client.tcp_reports.ended(record, pipe)  # a direct session's last report and end


def _session_facts(msg: p.ConnectOffer) -> dict:
    """What the session book records of a session another client asked for (side B)."""
    return {"peer": msg.fromClientId, "port": msg.remotePort, "protocol": msg.protocol}


def _checked_addresses(client, msg: p.ConnectOffer, service: tuple[str, int]) -> list[tuple] | None:
    """The service's addresses, checked against this client's own sockets, or None (and the
    session rejected). Resolved once: the connection goes to exactly these addresses."""
    try:
        candidates = resolve_for_connect(*service, "tcp")
    except OSError as exc:
        _unreachable(client, msg, service, f"cannot resolve it: {exc.strerror or exc}")
        return None
    if any(client.self_guard.reaches_self(addr, "tcp") for _, addr in candidates):
        log.warning("session from %s to %s:%d refused: %s", msg.fromClientId, service[0], service[1], SELF_REFUSAL)
        _reject(client, msg, f"{target_label(msg)} is not allowed by the target client")
        return None
    return candidates


def _connect_service(client, msg: p.ConnectOffer, service: tuple[str, int],
                     candidates: list[tuple]) -> socket.socket | None:
    """A connection to the first of ``candidates`` that answers, or None (and the session rejected)."""
    error: OSError | None = None
    for family, addr in candidates:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(LOCAL_CONNECT_TIMEOUT)
        try:
            sock.connect(addr)
            return sock
        except OSError as exc:
            error = exc
            sock.close()
    assert error is not None  # getaddrinfo gives at least one address or raises
    _unreachable(client, msg, service, f"cannot connect: {error.strerror or error}")
    return None


def _await_relay_close(relay) -> None:
    """After rejecting a joined session: let the relay close it (A then hears the rejection's
    reason, not a bare reset that raced it), within a bound, then reset our side."""
    try:
        relay.settimeout(REJECT_GRACE)
        while relay.recv(65536):
            pass
    except (OSError, ChuantouError):
        pass
    reset_connection(relay)


def _unreachable(client, msg: p.ConnectOffer, service: tuple, detail: str) -> None:
    log.info("session from %s to %s:%d refused: %s", msg.fromClientId, service[0], service[1], detail)
    _reject(client, msg, f"the target client cannot reach {target_label(msg)} (details in its log)")


def _reject(client, msg: p.ConnectOffer, reason: str) -> None:
    _send_quietly(client, p.RejectSession(sessionId=msg.sessionId, reason=reason))


def _send_quietly(client, msg) -> None:
    try:
        client.control.send(msg)
    except ChuantouError as exc:
        log.info("could not tell the relay %s: %s", msg.TYPE, exc)
