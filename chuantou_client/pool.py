"""Pooled data channels (the client's side of chuantou_server/pool.py): a few connections to the
relay opened ahead of any session, so that joining one costs a join header on an open
connection, not a new TCP (and TLS) connection and a new relay thread. Like frp's ``poolCount``.

``ChannelPool(count)`` keeps up to ``count`` channels open (fewer if the relay offers fewer,
none with an older relay or ``count`` 0); one named thread refills it in the background and
replaces channels before the relay's idle timeout would close them. ``take(addr)`` hands one
over (None: none ready, open a channel as before). The relay's offer holds for one
registration: ``reset(offer)`` on each registration, ``reset(None)`` when it ends.
"""

from __future__ import annotations

import collections
import logging
import socket
import threading
import time

from common import protocol as p
from common.threads import Task
from common.frames import JoinStatus, PoolHello, pack_pool_header
from common.net import close_quietly, recv_exact

from .datachannel import JoinError, TlsSettings, connect_channel

log = logging.getLogger("chuantou.client")

DEFAULT_POOL_COUNT = 2
RECYCLE_AT = 0.75  # of the relay's idle timeout: a channel this old is replaced, not used
RETRY_DELAY = 1.0  # after a channel could not be opened (the next tries back off to RETRY_MAX)
RETRY_MAX = 30.0
REFILL_DELAY = 0.05  # while a channel is left, refill this long after a take: not during the session's set-up


class ChannelPool:
    def __init__(self, count: int, threads, tls: TlsSettings | None = None, timeout: float = 10.0):
        self.count = count
        self.threads = threads
        self.tls = tls
        self.timeout = timeout
        self._offer: p.PoolOffer | None = None
        self._ready: collections.deque[tuple[float, socket.socket]] = collections.deque()  # (opened, sock)
        self._cond = threading.Condition()
        self._stopping = False
        self._taken_at = 0.0  # monotonic time of the last take
        self._thread: Task | None = None
        self.taken = 0  # figures for tests and the page: sessions that used a pooled channel

    # --- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        if self.count > 0:
            self._thread = self.threads.spawn("pool", self._fill_loop)

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._offer = None
            self._cond.notify_all()
        self._close_ready()
        if self._thread is not None:
            self._thread.join(timeout=self.timeout + 1.0)

    def reset(self, offer: p.PoolOffer | None) -> None:
        """A new registration's offer (None: not registered): channels of the last one are closed."""
        with self._cond:
            self._offer = offer if offer is not None and offer.size > 0 else None
            self._cond.notify_all()
        self._close_ready()

    @property
    def ready(self) -> int:
        with self._cond:
            return len(self._ready)

    # --- use --------------------------------------------------------------------------------

    def take_any(self) -> tuple[socket.socket | None, p.RelayAddr | None]:
        """A pooled channel and where it leads, or (None, None)."""
        with self._cond:
            offer = self._offer
            addr = offer.relayAddr if offer is not None else None
        sock = self.take(addr) if addr is not None else None
        return sock, addr if sock is not None else None

    def take(self, addr: p.RelayAddr) -> socket.socket | None:
        """A pooled channel to ``addr`` (still open, not near its idle timeout), or None."""
        with self._cond:
            offer = self._offer
            if offer is None or (offer.relayAddr.host, offer.relayAddr.port) != (addr.host, addr.port):
                return None
            while self._ready:
                opened, sock = self._ready.popleft()
                self._cond.notify_all()  # the filler opens a replacement
                if time.monotonic() - opened < RECYCLE_AT * offer.idleTimeout and _still_open(sock):
                    self.taken += 1
                    self._taken_at = time.monotonic()
                    return sock
                close_quietly(sock)
        return None

    # --- the filler -------------------------------------------------------------------------

    def _fill_loop(self) -> None:
        delay = RETRY_DELAY
        while True:
            with self._cond:
                offer = self._wait_for_need()
                if offer is None:
                    return
            try:
                sock = self._open(offer)
            except JoinError as exc:
                log.info("pooled data channel not opened (retrying in %g s): %s", delay, exc)
                with self._cond:
                    self._cond.wait_for(lambda: self._stopping, timeout=delay)
                delay = min(RETRY_MAX, delay * 2)
                continue
            delay = RETRY_DELAY
            with self._cond:
                if self._offer is offer and not self._stopping:
                    self._ready.append((time.monotonic(), sock))
                    continue
            close_quietly(sock)  # the registration changed while it opened

    def _wait_for_need(self) -> p.PoolOffer | None:
        """Wait (lock held) until a channel is missing or due for replacement; None: stopping."""
        while not self._stopping:
            offer = self._offer
            if offer is not None:
                self._drop_stale(offer)
                if len(self._ready) < min(self.count, offer.size):
                    # the connection (and the relay's thread for it) would compete with the set-up
                    # of the session that just took one; an empty pool refills at once
                    wait = self._taken_at + REFILL_DELAY - time.monotonic() if self._ready else 0.0
                    if wait <= 0:
                        return offer
                    self._cond.wait(wait)
                    continue
                oldest = self._ready[0][0] if self._ready else time.monotonic()
                self._cond.wait(max(0.05, oldest + RECYCLE_AT * offer.idleTimeout - time.monotonic()))
            else:
                self._cond.wait()
        return None

    def _drop_stale(self, offer: p.PoolOffer) -> None:
        now = time.monotonic()
        while self._ready and now - self._ready[0][0] >= RECYCLE_AT * offer.idleTimeout:
            close_quietly(self._ready.popleft()[1])

    def _open(self, offer: p.PoolOffer) -> socket.socket:
        deadline = time.monotonic() + self.timeout
        sock = connect_channel(offer.relayAddr, deadline, self.tls)
        try:
            sock.sendall(pack_pool_header(PoolHello(offer.id, offer.secret)))
            status = JoinStatus(recv_exact(sock, 1, deadline)[0])
        except (OSError, ValueError) as exc:
            close_quietly(sock)
            raise JoinError(f"the relay dropped it: {exc}") from None
        if status != JoinStatus.JOINED:
            close_quietly(sock)
            raise JoinError(f"the relay refused it: {status.describe()}")
        return sock

    def _close_ready(self) -> None:
        with self._cond:
            ready = [sock for _, sock in self._ready]
            self._ready.clear()
        for sock in ready:
            close_quietly(sock)


def _still_open(sock: socket.socket) -> bool:
    """The relay has not closed it: nothing to read and no end (an idle channel gets nothing; over
    TLS the relay's session ticket may wait there, which is not an end)."""
    raw = getattr(sock, "_sock", sock)  # a TlsStream's TCP socket
    timeout = raw.gettimeout()
    try:
        raw.settimeout(0.0)  # with a timeout, Python polls for readability first, whatever the flags
        data = raw.recv(1, socket.MSG_PEEK)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        raw.settimeout(timeout)
    return bool(data) and raw is not sock
