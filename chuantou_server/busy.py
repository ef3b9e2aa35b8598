"""Refusing connections at once when the relay is out of file descriptors.

At the descriptor limit ``accept()`` fails with EMFILE and the connection waits in the listen
backlog until the peer gives up (10-15 s). ``SpareDescriptor`` holds one descriptor back: on
EMFILE it is released, one connection is accepted and told "busy" (a data channel gets
``JoinStatus.BUSY``, HTTP a 503), closed, and the spare taken again.
"""

from __future__ import annotations

import errno
import logging
import os
import socket

from common.frames import DATA_MAGIC, JoinStatus
from common.limits import LimitLog
from common.net import close_quietly

from . import httpd

log = logging.getLogger("chuantou.server")

OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE)
FIRST_BYTES_WAIT = 0.1  # clients send their first bytes at once; do not hold the accept loop longer


class SpareDescriptor:
    def __init__(self):
        self.limit_log = LimitLog(log)
        self._fd: int | None = None
        self.take()

    def take(self) -> None:
        if self._fd is None:
            try:
                self._fd = os.open(os.devnull, os.O_RDONLY)
            except OSError:
                self._fd = None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def refuse_one(self, listener: socket.socket, exc: OSError) -> bool:
        """After ``accept()`` failed with ``exc``: if it was for lack of descriptors, accept one
        connection on the spare and refuse it. True if one was refused."""
        if exc.errno not in OUT_OF_DESCRIPTORS:
            return False
        self.limit_log.bit("descriptors", "accept",
                           "out of file descriptors (%s): new connections are refused as busy; raise the open-file "
                           "limit (ulimit -n) or lower maxSessions", exc.strerror or exc)
        self.release()
        try:
            sock, _ = listener.accept()
        except OSError:
            self.take()
            return False
        try:
            _tell_busy(sock)
        finally:
            close_quietly(sock)
            self.take()
        return True

    def close(self) -> None:
        self.release()


def _tell_busy(sock: socket.socket) -> None:
    try:
        sock.settimeout(FIRST_BYTES_WAIT)
        try:
            first = sock.recv(2, socket.MSG_PEEK)
        except socket.timeout:
            first = b""
        if first[:1] and first[:1] != DATA_MAGIC[:1] and first[0] in b"GPHDOCT":
            httpd.send_text(sock, 503, "the relay is out of file descriptors; try again later\n")
        else:  # a data channel reads this status byte before anything else
            sock.sendall(bytes([JoinStatus.BUSY]))
    except OSError:
        pass
