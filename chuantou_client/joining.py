"""What proxies (A) and the target side (B) call on their client to set a session up: join its
data channel (pooled, early or new) and seal it (sealing.py, udpseal.py). Mixed into Client."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from common.identity import decode_public_key
from common.net import arm_reset, keep_alive

from .datachannel import ChannelLost, JoinError, join_on, open_data_channel
from .earlyjoin import EarlyJoin
from .sealing import SealError

if TYPE_CHECKING:
    from .control import ControlChannel
    from .datachannel import TlsSettings
    from .pool import ChannelPool
    from .sealing import Sealing
    from .sessions import SessionBook, SessionRecord
    from .udpseal import KeyMailbox

log = logging.getLogger("chuantou.client")


class SessionJoining:
    """Needs the Client's pool, sealing, sessions, control, tls, request_timeout,
    data_channel_timeout, allow_unsealed and udp_keys."""

    pool: ChannelPool
    sealing: Sealing
    sessions: SessionBook
    control: ControlChannel
    tls: TlsSettings | None
    request_timeout: float
    data_channel_timeout: float
    allow_unsealed: bool
    udp_keys: KeyMailbox

    def join_session(self, record: SessionRecord, msg, early: EarlyJoin | None = None):
        """Open the data channel of ``record``'s session, as told by a create_session (side A)
        or a connect_request (side B): over ``early``'s channel if its join header went out
        already, else over a pooled channel, else a new one."""
        try:
            sock = self._join_early(record, msg, early) if early is not None else None
            if sock is None:
                sock = self._join_pooled(record, msg)
            if sock is None:
                sock = open_data_channel(msg.relayAddr, msg.sessionId, msg.secret, record.side,
                                         timeout=self.request_timeout, tls=self.tls)
        except JoinError as exc:
            reason = self.sessions.close_reason(msg.sessionId)
            raise JoinError(reason or str(exc)) from None
        arm_reset(sock)  # should this process die, the relay sees a reset, not an end of stream
        keep_alive(sock, self.data_channel_timeout)
        return sock

    def _join_early(self, record: SessionRecord, msg, early: EarlyJoin):
        sock, early.sock = early.sock, None
        if sock is None:
            return None
        try:
            return join_on(sock, msg.relayAddr, msg.sessionId, msg.secret, record.side,
                           time.monotonic() + self.request_timeout, header_sent=early.header_sent)
        except ChannelLost as exc:
            log.debug("pooled data channel lost (opening a new one): %s", exc)
            return None

    def _join_pooled(self, record: SessionRecord, msg):
        """Join over a pooled channel, if one is ready; None if not, or if it broke before the
        relay answered (closed for idleness just then, say: the caller opens a new one)."""
        sock = self.pool.take(msg.relayAddr)
        if sock is None:
            return None
        try:
            return join_on(sock, msg.relayAddr, msg.sessionId, msg.secret, record.side,
                           time.monotonic() + self.request_timeout)
        except ChannelLost as exc:
            log.debug("pooled data channel lost (opening a new one): %s", exc)
            return None

    def seal_as_a(self, sock, proxy, reply):
        """Seal a joined session of ``proxy`` (sealing.py). When B hung up on the handshake, B's
        reason (it refused our key, say) follows through the relay: wait a moment for it."""
        refusal = self.sealing.unsealed_refusal(proxy.target_client_id, reply.peerPublicKey,
                                                proxy.allow_unsealed or self.allow_unsealed)
        if refusal is not None:
            raise SealError(refusal, refused_here=True)
        if ident_absent(reply.peerPublicKey):
            return sock  # an older target, allowed: in the clear
        try:
            return self.sealing.seal_a(sock, proxy.target_client_id, proxy.target_fingerprint, reply.sessionId,
                                       reply.peerPublicKey)
        except SealError as exc:
            if exc.refused_here:
                raise
            reason = self.sessions.wait_close_reason(reply.sessionId, timeout=2.0)
            raise SealError(f"{exc}: {reason}" if reason else str(exc)) from None

    def seal_udp(self, role: str, session_id: str, peer: str, hint: str | None, *, pinned: str | None = None,
                 allow_unsealed: bool = False, meanwhile=None):
        """The keys of a UDP session (udpseal.py), or None for an unsealed one that is allowed
        (the peer cannot seal and --allow-unsealed says so). ``meanwhile()`` always runs once."""
        refusal = self.sealing.unsealed_refusal(peer, hint, allow_unsealed or self.allow_unsealed)
        if refusal is not None:
            raise SealError(refusal, "the target client requires sealed sessions", refused_here=True)
        if ident_absent(hint):
            if meanwhile is not None:
                meanwhile()
            return None
        try:
            return self.sealing.seal_udp(self.control.send, self.udp_keys, session_id, role, peer, pinned, hint,
                                         meanwhile=meanwhile)
        except SealError as exc:
            if exc.refused_here:
                raise
            reason = self.sessions.wait_close_reason(session_id, timeout=0.5)
            raise SealError(f"{exc}: {reason}" if reason else str(exc)) from None


def ident_absent(hint: str | None) -> bool:
    """The relay says the peer registered no key: it cannot seal."""
    return decode_public_key(hint) is None
