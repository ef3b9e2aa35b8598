"""The stream of a sealed TCP session (sealing.py sets it up): a TlsStream whose failures say
what they mean, that reads its carrier to the end after the peer's, and on A picks up the
session ticket B sends after the handshake (resumption.py)."""

from __future__ import annotations

import logging
import socket
import ssl
from typing import Callable

from common.tls import TlsStream, TlsTruncated

log = logging.getLogger("chuantou.client")

READ_DISCARD = 64 * 1024
CARRIER_TAIL = 64 * 1024  # bytes read past a sealed stream's end before giving up on the channel's end


class SealedStream(TlsStream):
    """A TlsStream whose failures say what they mean: tampering or truncation is logged once
    as a warning and raised as a ConnectionResetError, which a Pipe passes on as a reset."""

    label = "sealed session"
    _own_shutdown = False
    _reported = False
    _carrier_read = False  # the data channel has been read to its own end, after our close_notify

    # Work for after the first data went on (A's ticket, sealing.py), at the start of the next read.
    _after_first: Callable[[], None] | None = None
    _first_read_done = False

    def recv_into(self, buffer, nbytes: int = 0) -> int:
        if self._first_read_done and self._after_first is not None:
            self._run_after_first()
        n = self._recv_into(buffer, nbytes)
        if not self._first_read_done:
            self._first_read_done = True
            if n == 0 and self._after_first is not None:  # the end: no next read
                self._run_after_first()
        if n == 0 and (nbytes or len(buffer)) and not self._carrier_read:
            self._read_carrier_to_end()
        return n

    def after_first_read(self, work: Callable[[], None]) -> None:
        """Run ``work`` once the first read returned, at the start of the next one (so after
        the caller passed that data on) or at once if it was the end."""
        self._after_first = work

    def _run_after_first(self) -> None:
        work, self._after_first = self._after_first, None
        if work is not None:
            work()

    def _read_carrier_to_end(self) -> None:
        """After the peer's close_notify, read the data channel to its own end before reporting ours.

        The peer ends the channel right after its close_notify, so that end follows at once, but
        over a TLS data channel it is data too: the channel's own close_notify. Left unread, it
        makes close() send a reset (Linux resets a socket closed with unread data), and that reset
        throws away whatever this side still has queued to send: the other direction of a
        half-closed session, cut. Bytes after our authenticated end are no part of the stream."""
        self._carrier_read = True
        extra = 0
        try:
            while extra <= CARRIER_TAIL:
                data = self._sock.recv(READ_DISCARD)
                if not data:
                    break
                extra += len(data)
        except OSError:  # a channel cut after the sealed stream's clean end loses nothing of it
            pass
        if extra:
            log.warning("%s: %d bytes after the end of the sealed stream (not from the peer), dropped",
                        self.label, extra)

    def _recv_into(self, buffer, nbytes: int) -> int:
        try:
            return super().recv_into(buffer, nbytes)
        except TlsTruncated:
            raise self._broken("the stream was cut without the peer's close_notify (a relay or network "
                               "ended it early)") from None
        except ssl.SSLError as exc:
            raise self._broken(f"a record failed authentication ({exc.reason or exc}): the data was altered, "
                               f"dropped, replayed or reordered on the way") from None

    def _broken(self, why: str) -> ConnectionResetError:
        reason = f"{self.label}: {why}; connection reset, nothing of it delivered"
        if not self._own_shutdown and not self._reported:
            self._reported = True
            log.warning("%s", reason)
        return ConnectionResetError(reason)

    def shutdown(self, how: int) -> None:
        if how in (socket.SHUT_RD, socket.SHUT_RDWR):
            self._own_shutdown = True  # our own abort wakes the reader: not the relay's doing
        super().shutdown(how)
