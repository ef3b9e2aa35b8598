"""TCP data channels on the relay: authenticate the header, then join the two halves.

The first half of a session to arrive is parked in the session table (its socket owned by
the session); the thread of the second half runs the pipe between them. The join is checked,
answered JOINED and attached in one step (``SessionTable.join_tcp``), so a second channel for a
side is told ALREADY_JOINED, never JOINED.
"""

from __future__ import annotations

import logging
import socket
import time
from typing import TYPE_CHECKING

from common.frames import FrameError, JoinStatus, unpack_data_header
from common.net import arm_reset, close_quietly, keep_alive
from common.pipe import Pipe
from common.splicepipe import SplicePipe, can_splice

from . import direct_claims

if TYPE_CHECKING:
    from .server import Server
    from .sessions import Session

log = logging.getLogger("chuantou.server")


def serve_data_channel(server: Server, sock: socket.socket, header: bytes, owner: str | None = None) -> None:
    """``owner``: a pooled channel's client (pool.py), which may join only its own side of a session."""
    try:
        join = unpack_data_header(header)
    except FrameError as exc:
        log.debug("data channel refused: %s", exc)
        close_quietly(sock)
        return
    if owner is not None and not _side_of(server, join, owner):
        log.info("pooled data channel of %s refused: session %s... is not its own", owner, join.session_id[:8])
        _refuse(sock, JoinStatus.UNKNOWN_SESSION)
        return
    admitted = False

    def admit() -> None:
        # The status byte must be the first thing this side reads, so it goes out before the
        # other half can start pumping into this socket; from then on the session owns it.
        nonlocal admitted
        admitted = True
        sock.sendall(bytes([JoinStatus.JOINED]))
        sock.settimeout(None)
        arm_reset(sock)  # should the relay die, the client sees a reset, not an end of stream
        keep_alive(sock, server.config.data_channel_timeout)

    try:
        status, session, both = server.sessions.join_tcp(join, sock, admit)
        if session is None and not admitted:  # (admitted: the session closed before the attach)
            log.info("data channel for session %s... refused: %s", join.session_id[:8], status.describe())
            sock.sendall(bytes([status]))
    except OSError as exc:  # the peer is gone already
        log.debug("data channel for session %s... dropped: %s", join.session_id[:8], exc)
        session = None
    if session is None:
        close_quietly(sock)
        return
    if both:
        run_relay(server, session)


def _side_of(server: Server, join, client_id: str) -> bool:
    """Is ``client_id`` the side of the session ``join`` names?"""
    session = server.sessions.get(join.session_id)
    return session is not None and (session.client_a if join.side == "A" else session.client_b) == client_id


def _refuse(sock: socket.socket, status: JoinStatus) -> None:
    try:
        sock.sendall(bytes([status]))
    except OSError:
        pass
    close_quietly(sock)


def run_relay(server: Server, session: Session) -> None:
    assert session.sock_a is not None and session.sock_b is not None  # run once both halves joined
    pipe = make_pipe(session.sock_a, session.sock_b,
                     on_done=lambda ended: _pipe_ended(server, session, ended),
                     limits=server.bandwidth.pipe_limits(session))  # the relay's own limits, whatever a client says
    session.pipe = pipe
    if session.closed:  # closed while we were setting up
        pipe.abort()
    log.debug("session %s relaying %s -> %s:%d", session.id[:8], session.client_a, session.client_b, session.port)
    pipe.run(server.threads, f"relay-{session.id[:8]}")


def _pipe_ended(server: Server, session: Session, pipe: Pipe) -> None:
    """A relayed session ends with its pipe; a direct one (direct_claims.held_direct) is held
    until its clients say it ended, so that their reports of its bytes find it."""
    if not session.closed and direct_claims.held_direct(session, pipe):
        session.held_since = time.monotonic()
        session.direct_held = True
        log.debug("session %s goes direct: held until its clients end it", session.id[:8])
        return
    server.close_session(session, "ended", notify=False)


def make_pipe(a: socket.socket, b: socket.socket, on_done, limits=((), ())) -> Pipe:
    """Two plain TCP data channels are spliced through kernel pipes (the relay's bytes never enter
    Python); a TLS data channel has to be decrypted here, so it takes the plain pump, and so does a
    session under a bandwidth limit, which meters each chunk in Python."""
    if can_splice(a, b) and not any(limits):
        return SplicePipe(a, b, on_done=on_done)
    return Pipe(a, b, on_done=on_done, limits=limits)
