"""The byte pump: joins two connected TCP sockets, one thread per direction.

Used by the relay (data channel A <-> data channel B), by the gateway client (user <-> relay)
and by the target client (relay <-> local service). Per chunk it does nothing but the copy
and a byte count. A FIN on one side becomes ``shutdown(SHUT_WR)`` on the other, so the
reverse direction keeps flowing (half-close); an error on either side closes both.
"""

from __future__ import annotations

import socket
import threading

from .net import close_quietly, shutdown_quietly

SMALL_READ = 16 * 1024
BULK_BUFFER = 1024 * 1024


class Pipe:
    """Two sockets joined until both directions have ended.

    ``sent[0]`` counts bytes moved a -> b, ``sent[1]`` b -> a.
    """

    def __init__(self, a: socket.socket, b: socket.socket, on_done=None, bulk_buffer: int = BULK_BUFFER):
        self.a = a
        self.b = b
        self.sent = [0, 0]
        self._on_done = on_done
        self._bulk_buffer = bulk_buffer
        self._aborted = threading.Event()

    def run(self, group, name: str) -> None:
        """Pump b -> a on a new thread of ``group`` and a -> b on the calling thread; return when both end."""
        try:
            other = group.spawn(name, self._pump, self.b, self.a, 1)
        except RuntimeError:  # cannot start a thread (process limit): give up this connection only
            self._finish()
            raise
        self._pump(self.a, self.b, 0)
        other.join()
        self._finish()

    def abort(self) -> None:
        """Close both directions now; wakes both pump threads."""
        self._aborted.set()
        shutdown_quietly(self.a)
        shutdown_quietly(self.b)

    @property
    def aborted(self) -> bool:
        return self._aborted.is_set()

    def _finish(self) -> None:
        close_quietly(self.a)
        close_quietly(self.b)
        if self._on_done is not None:
            self._on_done(self)

    def _pump(self, src: socket.socket, dst: socket.socket, index: int) -> None:
        counts = self.sent
        try:
            # Small reads until the stream proves to be bulk, so an idle or chatty connection
            # holds no large buffer between reads.
            while True:
                data = src.recv(SMALL_READ)
                if not data:
                    shutdown_quietly(dst, socket.SHUT_WR)
                    return
                dst.sendall(data)
                counts[index] += len(data)
                if len(data) == SMALL_READ:
                    break
            buf = bytearray(self._bulk_buffer)
            view = memoryview(buf)
            recv_into = src.recv_into
            sendall = dst.sendall
            while True:
                n = recv_into(buf)
                if not n:
                    shutdown_quietly(dst, socket.SHUT_WR)
                    return
                sendall(view[:n])
                counts[index] += n
        except OSError:
            self.abort()
