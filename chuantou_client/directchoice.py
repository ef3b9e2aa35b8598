"""Who decides a TCP session's path, and how each side follows (the attempt itself: directtcp.py).

A decides. A goes direct once its sealed handshake over the direct connection is done and the
key passed its checks, and then closes its relay data channel; otherwise it seals over the
relay channel as always. B's attempt runs on a thread of its own while B reads the relay
channel: A's preamble there means the relay; the channel's end means A went direct, and B
takes its direct stream. Either way the session is sealed and its peer's key checked exactly
as a relayed one (sealing.py).
"""

from __future__ import annotations

import logging
import select
import socket
import time

from common import protocol as p
from common.identity import decode_public_key
from common.net import close_quietly, disarm_reset, reset_connection, shutdown_quietly

from .directtcp import GRACE, HANDSHAKE_TIME, NoDirectPath, TcpAttempt, sock_peer
from .sealing import PREAMBLE_MAGIC, SealError, read_preamble

log = logging.getLogger("chuantou.client")


def wants_direct(client, hint: str | None) -> bool:
    """May this TCP session try a direct path at all? Only a sealed one (a direct session is
    authenticated end to end like a relayed one), and only with a relay that hands over candidates."""
    return client.direct.path != "relay" and client.direct.relay_knows and not _absent(hint)


def seal_a(client, proxy, relay, reply, record):
    """A: the session's sealed stream, direct when an attempt wins within the deadline, else
    through ``relay`` (its joined data channel) as always."""
    direct, peer = client.direct, proxy.target_client_id
    if not wants_direct(client, reply.peerPublicKey):
        return client.seal_as_a(relay, proxy, reply)
    if not direct.wants_to_try(peer):
        TcpAttempt(client, reply.sessionId, "A", relay, direct.deadline).offer("relay")  # so B stops waiting
        return client.seal_as_a(relay, proxy, reply)
    attempt = TcpAttempt(client, reply.sessionId, "A", relay, direct.deadline)
    direct.begin_tcp(attempt)
    try:
        stream = attempt.run_a(proxy, reply)
    finally:
        direct.end_tcp(attempt)
    if stream is not None:
        direct.memory.succeeded(peer)
        close_relay_channel(relay)
        record.path = "direct"
        client.tcp_reports.went_direct(record)
        log.info("proxy %s: TCP session %s... goes direct to %s:%s", proxy.description, reply.sessionId[:8],
                 *sock_peer(stream))
        return stream
    if attempt.tried or not attempt.heard:  # failed, or the peer never offered (an older one): back off
        direct.memory.failed(peer)
        log.info("proxy %s: no direct path to %s within %g s%s; the relay carries TCP session %s...",
                 proxy.description, peer, direct.deadline, "" if attempt.heard else " (it offered none)",
                 reply.sessionId[:8])
    if direct.path == "direct":
        reset_connection(relay)
        raise NoDirectPath(f"no direct path to {peer} within {direct.deadline:g} s (--path direct)")
    return client.seal_as_a(relay, proxy, reply)


def seal_b(client, relay, msg: p.ConnectOffer, record, on_failure):
    """B: offer a direct path and try it on a thread while A's choice arrives on ``relay``: A's
    preamble (seal over the relay), or the channel's end (A went direct: our direct stream).
    When A's preamble is there already, A has chosen the relay: B offers nothing and seals."""
    if _preamble_waiting(relay):
        return client.sealing.seal_b(relay, msg.fromClientId, msg.sessionId, msg.peerPublicKey,
                                     on_failure=on_failure)
    if not wants_direct(client, msg.peerPublicKey):
        if client.direct.relay_knows and client.direct.path == "relay" and not _absent(msg.peerPublicKey):
            TcpAttempt(client, msg.sessionId, "B", relay, client.direct.deadline).offer("relay")  # A: don't wait
        return client.sealing.seal_b(relay, msg.fromClientId, msg.sessionId, msg.peerPublicKey,
                                     on_failure=on_failure)
    attempt = TcpAttempt(client, msg.sessionId, "B", relay, client.direct.deadline)
    client.direct.begin_tcp(attempt)
    try:
        attempt.start_b(msg)
        try:
            certificate = read_preamble(relay, time.monotonic() + client.sealing.timeout)
        except SealError as exc:  # not a sealed session's opening: refused as over the relay
            attempt.abandon_b()
            on_failure(exc)
            reset_connection(relay)
            raise
        except (OSError, ValueError) as exc:  # the channel ended: A went direct (or gave up)
            stream = attempt.finish_b(client.direct.deadline + GRACE + 2 * HANDSHAKE_TIME)
            if stream is None:
                reset_connection(relay)
                raise SealError(f"the relay channel ended before A's sealed handshake ({exc}), and no direct "
                                f"connection from A was sealed") from None
            close_relay_channel(relay)
            record.path = "direct"
            client.tcp_reports.went_direct(record)
            log.info("TCP session %s... from %s goes direct (%s:%s)", msg.sessionId[:8], msg.fromClientId,
                     *sock_peer(stream))
            return stream
        attempt.abandon_b()
    finally:
        client.direct.end_tcp(attempt)
    return client.sealing.seal_b(relay, msg.fromClientId, msg.sessionId, msg.peerPublicKey,
                                 on_failure=on_failure, certificate=certificate)


def _preamble_waiting(relay) -> bool:
    """Has A's sealed preamble arrived on ``relay`` already? A writes there only once it has
    chosen the relay (after its direct attempt, or without one), so an offer from B would be
    waited for by nobody: a control message and the relay's work on it saved, off the setup's
    path. Only a plain socket can be looked at without reading (a TLS channel's bytes are records)."""
    if not isinstance(relay, socket.socket):
        return False
    try:
        if not select.select([relay], [], [], 0)[0]:
            return False
        return relay.recv(len(PREAMBLE_MAGIC), socket.MSG_PEEK) == PREAMBLE_MAGIC
    except (OSError, ValueError):
        return False


def _absent(hint: str | None) -> bool:
    return decode_public_key(hint) is None


def close_relay_channel(relay) -> None:
    """The session went direct: end its relay data channel cleanly (no reset: nothing failed)."""
    try:
        disarm_reset(relay)
    except OSError:
        pass
    shutdown_quietly(relay)
    close_quietly(relay)
