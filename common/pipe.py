"""The byte pump: joins two connected TCP sockets, one thread per direction.

Used by the relay (data channel A <-> data channel B), by the gateway client (user <-> relay)
and by the target client (relay <-> local service). Per chunk it does nothing but the copy
and a byte count; a direction with bandwidth limits (``limits=(up, down)``, each a RateLimit
or a sequence of them) also takes from its buckets before each write, and waiting there is
what slows the sender: the pump reads no faster than allowed, so the sender's TCP window fills.

How a session ends is passed on faithfully, because a cut transfer must never look finished:
- a FIN (the far end really finished sending) becomes ``shutdown(SHUT_WR)`` on the other side,
  so the reverse direction keeps flowing (half-close), and once both directions have ended so
  the sockets close cleanly;
- anything else (a reset, an error, ``abort()`` because the relay or a client gave up on the
  session, or this process dying) reaches both peers as a reset: the sockets are armed with
  ``SO_LINGER`` 0 from the start, so even the kernel's close at a crash sends RST, not FIN.
"""

from __future__ import annotations

import logging
import socket
import threading
import time

from .limits import RateLimit, most_of, take_all
from .net import arm_reset, close_only, disarm_reset, shutdown_quietly

log = logging.getLogger("chuantou")

SMALL_READ = 16 * 1024
# A short read means the sender went quiet: the next read waits with IDLE_READ, so thousands of
# idle sessions do not each hold 16 KiB per direction while blocked (a thread blocked in recv(n)
# holds its n bytes: about 96 KiB per session over relay, A and B); a full one reads SMALL_READ.
IDLE_READ = 2 * 1024
BULK_BUFFER = 1024 * 1024
STUCK_WRITE = 1.0  # a write blocked this long (its reader stopped reading) is woken by SHUT_WR on abort


class Pipe:
    """Two sockets joined until both directions have ended.

    ``sent[0]`` counts bytes moved a -> b, ``sent[1]`` b -> a. ``limits[0]`` applies to
    a -> b, ``limits[1]`` to b -> a.
    """

    def __init__(self, a: socket.socket, b: socket.socket, on_done=None, bulk_buffer: int = BULK_BUFFER,
                 limits: tuple = (None, None)):
        self.a = a
        self.b = b
        self.sent = [0, 0]
        self._on_done = on_done
        self._bulk_buffer = bulk_buffer
        self._aborted = threading.Event()
        self.error: OSError | None = None  # the first error that ended a direction (None: none did)
        self._finished = [False, False]  # direction ended by a real FIN
        self._writing_since = [0.0, 0.0]  # when a direction entered sendall (0: not writing)
        self._done = [False, False]  # direction's thread finished; guarded by _state
        self._state = threading.Condition()  # notified when a direction finishes or the pipe is aborted
        self._limits = (_as_tuple(limits[0]), _as_tuple(limits[1]))
        arm_reset(a)
        arm_reset(b)

    def run(self, group, name: str, before=None) -> None:
        """Pump b -> a on a new thread of ``group`` and a -> b on the calling thread; return when both end.
        ``before()``, if given, runs on the new thread before it pumps (work kept off the first bytes' way)."""
        try:
            other = group.spawn(name, self._pump, self.b, self.a, 1, before)
        except RuntimeError:  # cannot start a thread (process limit): give up this connection only
            self._aborted.set()
            self._finish()
            raise
        self._pump(self.a, self.b, 0)
        other.join()
        self._finish()

    def _destination(self, index: int) -> socket.socket:
        return self.b if index == 0 else self.a

    def abort(self) -> None:
        """End both directions abnormally now: each peer sees a reset. Wakes both pump threads.
        Again (a pump failing after another thread aborted) it wakes only stuck writers: the
        readers were woken already."""
        first = not self._aborted.is_set()
        self._aborted.set()
        if first:
            for sock in (self.a, self.b):
                shutdown_quietly(sock, socket.SHUT_RD)  # wakes a reader and sends nothing
        for index in (0, 1):
            self._wake_stuck_writer(index)
        with self._state:
            self._state.notify_all()  # a thread awaiting its partner looks again (is it stuck writing?)

    def _wake_stuck_writer(self, index: int) -> None:
        """A writer blocked on a full buffer wakes only on SHUT_WR. Its FIN queues behind the
        unsent data its reader is not taking, and the reset at close (armed linger) overtakes and
        discards both. A writer that is merely busy is left alone: a FIN sent now would arrive.

        On a TLS stream the SHUT_WR goes to the TCP socket under it: the stream's own would queue
        close_notify (a clean end, wrong for an abort) behind the stuck writer's lock, 0.1 s per
        session: aborting 200 stuck sealed sessions took 19.6 s (9,000: 15 minutes)."""
        since = self._writing_since[index]
        if since and time.monotonic() - since > STUCK_WRITE:
            dst = self._destination(index)
            shutdown_quietly(getattr(dst, "carrier", dst), socket.SHUT_WR)

    def _await_partner(self, index: int) -> None:
        """Wait for the other direction; if the pipe is aborted while it is stuck writing, wake it.

        Asleep until something changes: a timed wait only while an aborted partner is inside
        sendall. Thousands of threads polling once a second each convoyed on the GIL and made a
        mass teardown take five times as long."""
        partner = 1 - index
        with self._state:
            while not self._done[partner]:
                if self._aborted.is_set() and self._writing_since[partner]:
                    self._state.wait(STUCK_WRITE)
                    if not self._done[partner]:
                        self._wake_stuck_writer(partner)
                else:
                    self._state.wait()

    @property
    def aborted(self) -> bool:
        return self._aborted.is_set()

    @property
    def ended_cleanly(self) -> bool:
        return not self._aborted.is_set() and all(self._finished)

    def _finish(self) -> None:
        """Both directions have ended, so no thread reads or writes the sockets any more: what is
        left is a close, a clean one or (armed linger) a reset. No shutdown first: it would wake
        nobody, and each syscall is a GIL hand-off, which counts when thousands of sessions end
        at once (every pump thread of theirs queueing for the GIL)."""
        clean = self.ended_cleanly
        for sock in (self.a, self.b):
            if clean:
                disarm_reset(sock)
            else:
                arm_reset(sock)
            close_only(sock)
        if self._on_done is not None:
            self._on_done(self)

    def _end_of_stream(self, dst: socket.socket, index: int) -> None:
        if self._aborted.is_set():  # our own SHUT_RD woke the reader: not the peer's FIN
            return
        self._finished[index] = True
        shutdown_quietly(dst, socket.SHUT_WR)

    def _pump(self, src: socket.socket, dst: socket.socket, index: int, before=None) -> None:
        try:
            if before is not None:
                before()
            self._copy(src, dst, index)
        except OSError as exc:
            self._writing_since[index] = 0.0
            if self.error is None:
                self.error = exc
            log.debug("pipe %s: %s; resetting both ends", ("a->b", "b->a")[index], exc)
            self.abort()
        finally:
            with self._state:
                self._done[index] = True
                self._state.notify_all()
        self._await_partner(index)

    def _copy(self, src: socket.socket, dst: socket.socket, index: int) -> None:
        if self._limits[index]:
            self._copy_limited(src, dst, index, self._limits[index])
            return
        counts = self.sent
        writing = self._writing_since
        clock = time.monotonic
        # Small reads until the stream proves to be bulk, so an idle or chatty connection
        # holds no large buffer between reads.
        size = IDLE_READ
        while True:
            data = src.recv(size)
            if not data:
                self._end_of_stream(dst, index)
                return
            writing[index] = clock()
            dst.sendall(data)
            writing[index] = 0.0
            counts[index] += len(data)
            if len(data) == SMALL_READ:
                break
            size = IDLE_READ if len(data) < size else SMALL_READ
        buf = bytearray(self._bulk_buffer)
        view = memoryview(buf)
        recv_into = src.recv_into
        sendall = dst.sendall
        while True:
            n = recv_into(buf)
            if not n:
                self._end_of_stream(dst, index)
                return
            writing[index] = clock()
            sendall(view[:n])
            writing[index] = 0.0
            counts[index] += n

    def _copy_limited(self, src: socket.socket, dst: socket.socket, index: int, limits: tuple) -> None:
        """``_copy`` with bandwidth limits: reads of at most one burst, each paid for before it is
        written on. A read waiting here is no read at all, which is the backpressure."""
        buf = bytearray(min(self._bulk_buffer, max(1024, most_of(limits))))  # never a wait longer than needed
        view = memoryview(buf)
        counts = self.sent
        writing = self._writing_since
        while True:
            n = src.recv_into(buf)
            if not n:
                self._end_of_stream(dst, index)
                return
            take_all(limits, n, self._aborted)
            if self._aborted.is_set():
                return
            writing[index] = time.monotonic()
            dst.sendall(view[:n])
            writing[index] = 0.0
            counts[index] += n


def _as_tuple(limit) -> tuple[RateLimit, ...]:
    """A direction's limits as a tuple: None (no limit), one RateLimit, or several (None entries skipped)."""
    if limit is None:
        return ()
    if isinstance(limit, RateLimit):
        return (limit,)
    return tuple(item for item in limit if item is not None)
