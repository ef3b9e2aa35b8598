"""Joining a session without a thread hand-off: a pooled data channel (pool.py) is taken before
the session exists, and its join header goes out from the control channel's reader thread the
moment the relay names the session (A: the create_session answer; B: the connect_request offer),
while the session's own thread is still waking or being started. That thread then only reads
the relay's status byte (``Client.join_session(..., early=...)``).
"""

from __future__ import annotations

import logging
import socket

from common import protocol as p
from common.net import close_quietly

from .datachannel import send_join

log = logging.getLogger("chuantou.client")


class EarlyJoin:
    def __init__(self, sock: socket.socket | None, addr: p.RelayAddr | None, side: str):
        self.sock = sock  # owned by this object until join_session takes it (or close())
        self.addr = addr  # where the channel leads
        self.side = side
        self.header_sent = False

    @classmethod
    def take(cls, client, side: str) -> "EarlyJoin":
        sock, addr = client.pool.take_any()
        return cls(sock, addr, side)

    def send_header(self, msg) -> None:
        """Write the join header for ``msg``'s session (a CreateSession or a ConnectOffer), on the
        reader thread: 35 bytes into the idle channel's empty send buffer, so it does not block."""
        sock, addr = self.sock, self.addr
        if sock is None or addr is None or not isinstance(msg, (p.CreateSession, p.ConnectOffer)):
            return
        protocol = msg.service.protocol if isinstance(msg, p.CreateSession) else msg.protocol
        if protocol != "tcp" or (msg.relayAddr.host, msg.relayAddr.port) != (addr.host, addr.port):
            self.close()  # a session elsewhere (another node of a cluster): a channel of its own
            return
        try:
            send_join(sock, msg.sessionId, msg.secret, self.side)
            self.header_sent = True
        except OSError as exc:  # closed by the relay for idleness just then: join_session opens a new one
            log.debug("pooled data channel lost before its join: %s", exc)
            self.close()

    def close(self) -> None:
        sock, self.sock = self.sock, None
        close_quietly(sock)
