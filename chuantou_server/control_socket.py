"""The socket simple-websocket sees for one control channel: one writer at a time, inbound
backpressure, and a close that never waits on a peer.

simple-websocket's reader thread queues every inbound message without limit, and writes with
a bare ``sock.send`` from two threads (ours, and its reader answering pings and closes)
ignoring partial writes. This wrapper:

- routes every write through one lock and ``sendall`` (the kernel's SO_SNDTIMEO bounds it);
- stops reading from the socket while the library's inbound queue holds more than a bound,
  so a peer that floods us while leaving our replies unread fills its own TCP window, not
  our memory;
- after ``begin_close()``, sends only what fits without waiting and never waits for the
  lock, so the housekeeper or ``stop()`` closing a connection is never held up by a thread
  blocked in ``sendall`` to a peer that does not read (the ``shutdown()`` that follows wakes
  that thread).
"""

from __future__ import annotations

import select
import socket
import threading

from common.net import shutdown_quietly

# The inbound queue of one connection, beyond which we stop reading from its socket. Control
# messages are small (heartbeats, requests); a well-behaved client has a handful in flight.
MAX_QUEUED_MESSAGES = 64
MAX_QUEUED_BYTES = 256 * 1024
QUEUE_POLL = 0.5  # how often a paused reader looks again whether it should give up


class ControlSocket:
    def __init__(self, sock: socket.socket,
                 max_queued_messages: int = MAX_QUEUED_MESSAGES, max_queued_bytes: int = MAX_QUEUED_BYTES):
        self._sock = sock
        self._lock = threading.Lock()
        self._room = threading.Condition()
        self._queue: list | None = None  # the library's inbound queue, once watched
        self._closing = False
        self.max_queued_messages = max_queued_messages
        self.max_queued_bytes = max_queued_bytes
        self.paused = 0  # times the reader waited for room (tests and figures)

    def watch(self, ws) -> None:
        """Bound ``ws``'s inbound queue from now on (the ws exists only after the handshake)."""
        self._queue = ws.input_buffer

    def message_taken(self) -> None:
        """The consumer took a message off the queue: a paused reader may go on."""
        with self._room:
            self._room.notify_all()

    def begin_close(self) -> None:
        """From now on writes never wait; a paused reader gives up."""
        self._closing = True
        with self._room:
            self._room.notify_all()

    # --- what simple-websocket calls --------------------------------------------------------

    def recv(self, size: int) -> bytes:
        self._wait_for_room()
        if self._closing:
            return b""  # the library treats this as the end of the connection
        return self._sock.recv(size)

    def send(self, data: bytes) -> int:
        if self._closing:
            return self._send_without_waiting(data)
        with self._lock:
            self._sock.sendall(data)
        return len(data)

    def close(self) -> None:
        # shut down first: closing a descriptor does not wake a thread blocked in send or recv
        # on it (the serving thread, stuck sending to a peer that does not read, slept on for up
        # to its send timeout and stop() waited for it); what is queued still goes out before FIN
        shutdown_quietly(self._sock)
        self._sock.close()

    def fileno(self) -> int:
        return self._sock.fileno()

    # --- internals --------------------------------------------------------------------------

    def _queue_full(self) -> bool:
        queue = self._queue
        if not queue:
            return False
        if len(queue) >= self.max_queued_messages:
            return True
        return sum(len(m) for m in list(queue)) >= self.max_queued_bytes

    def _wait_for_room(self) -> None:
        if not self._queue_full():
            return
        self.paused += 1
        with self._room:
            while not self._closing and self._queue_full():
                self._room.wait(QUEUE_POLL)

    def _send_without_waiting(self, data: bytes) -> int:
        """Best effort while closing (the close frame): skip it if another thread is writing
        or the socket has no room, rather than wait for a peer that may never read."""
        if not self._lock.acquire(blocking=False):
            return len(data)
        try:
            _, writable, _ = select.select([], [self._sock], [], 0)
            if writable:
                self._sock.sendall(data)
        except (OSError, ValueError):
            pass
        finally:
            self._lock.release()
        return len(data)
