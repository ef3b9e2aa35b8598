"""TCP data channels on the relay: authenticate the header, then join the two halves.

The first half of a session to arrive is parked in the session table (its socket owned by
the session); the thread of the second half runs the pipe between them.
"""

from __future__ import annotations

import logging
import socket

from common.frames import FrameError, JoinStatus, unpack_data_header
from common.net import arm_reset, close_quietly, keep_alive
from common.pipe import Pipe

log = logging.getLogger("chuantou.server")


def serve_data_channel(server, sock: socket.socket, header: bytes) -> None:
    try:
        join = unpack_data_header(header)
    except FrameError as exc:
        log.debug("data channel refused: %s", exc)
        close_quietly(sock)
        return
    status, _ = server.sessions.check_join(join, "tcp")
    # The status byte must be the first thing this side reads, so send it before the other
    # half can start pumping into this socket.
    try:
        sock.sendall(bytes([status]))
    except OSError as exc:  # the peer is gone already
        log.debug("data channel for session %s... dropped: %s", join.session_id[:8], exc)
        close_quietly(sock)
        return
    if status != JoinStatus.JOINED:
        log.info("data channel for session %s... refused: %s", join.session_id[:8], status.describe())
        close_quietly(sock)
        return
    sock.settimeout(None)  # from here on the session owns the socket and closes it
    arm_reset(sock)  # should the relay die, the client sees a reset, not an end of stream
    keep_alive(sock, server.config.data_channel_timeout)
    status, session, both = server.sessions.join_tcp(join, sock)
    if status != JoinStatus.JOINED:
        close_quietly(sock)
        return
    if both:
        run_relay(server, session)


def run_relay(server, session) -> None:
    pipe = Pipe(session.sock_a, session.sock_b,
                on_done=lambda _pipe: server.close_session(session, "ended", notify=False))
    session.pipe = pipe
    if session.closed:  # closed while we were setting up
        pipe.abort()
    log.debug("session %s relaying %s -> %s:%d", session.id[:8], session.client_a, session.client_b, session.port)
    pipe.run(server.threads, f"relay-{session.id[:8]}")
