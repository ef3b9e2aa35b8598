"""Pooled data channels on the relay: TCP connections a registered client opens ahead of its
sessions, so that a session's set-up costs a 35-byte join header on an open connection instead
of a new connection (and a new relay thread) on each side. Like frp's ``poolCount``.

Each registration gets a pool id and secret (``PoolOffer`` in its register_response). A channel
presenting them (``common.frames.POOL_MAGIC``) is counted against its client's pool (at most
``per_client``) and the relay's (at most ``total``; each also holds a descriptor, so none is
admitted when the descriptor reserve is reached), answered JOINED, and then waits in its own
thread, up to ``idle_timeout``, for the ordinary join header of one of its owner's sessions,
from where ``relay.serve_data_channel`` takes it as any data channel.

What a stranger or another token holder can do with it: nothing without the registration's
secret (a pool header with a wrong one is refused and closed); an unbound channel is a
connection only its owner holds, so nobody else can bind it; binding still needs the session's
secret, and only for a side of a session its owner is part of. A channel whose owner's control
connection ends is closed, and a registration's pool cannot outgrow ``per_client``.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from common import protocol as p
from common.frames import (DATA_MAGIC, HEADER_SIZE, ID_BYTES, SECRET_BYTES, FrameError, JoinStatus,
                           unpack_pool_header)
from common.limits import LimitLog
from common.net import close_quietly, keep_alive, recv_exact, shutdown_quietly

if TYPE_CHECKING:
    from .server import Server

log = logging.getLogger("chuantou.server")

DEFAULT_POOL_PER_CLIENT = 8  # what a client may keep open (it asks for fewer, 2 by default)
DEFAULT_MAX_POOLED = 1024  # over all clients
DEFAULT_POOL_IDLE_TIMEOUT = 60.0


@dataclass(eq=False)
class ClientPool:
    """One registration's pool: who owns it and its channels waiting for a session."""
    id: str
    secret: str = field(repr=False)
    client_id: str
    sockets: set = field(default_factory=set, repr=False)


class ChannelPools:
    def __init__(self, per_client: int = DEFAULT_POOL_PER_CLIENT, total: int = DEFAULT_MAX_POOLED,
                 idle_timeout: float = DEFAULT_POOL_IDLE_TIMEOUT, out_of_descriptors=lambda: False):
        self.per_client = per_client
        self.total = total
        self.idle_timeout = idle_timeout
        self.out_of_descriptors = out_of_descriptors
        self.limit_log = LimitLog(log)
        self._lock = threading.Lock()
        self._pools: dict[str, ClientPool] = {}  # pool id -> pool
        self._count = 0
        self.bound = 0  # figures for tests: channels that went on to a join header

    @property
    def waiting(self) -> int:
        """Pooled channels open and not bound yet, over all clients."""
        with self._lock:
            return self._count

    def waiting_for(self, client_id: str) -> int:
        with self._lock:
            return sum(len(pool.sockets) for pool in self._pools.values() if pool.client_id == client_id)

    def open_for(self, client_id: str, relay_addr: p.RelayAddr) -> tuple[ClientPool | None, p.PoolOffer | None]:
        """A pool for a new registration and the offer its register_response carries (None: pooling is off)."""
        if self.per_client <= 0 or self.total <= 0:
            return None, None
        pool = ClientPool(secrets.token_hex(ID_BYTES), secrets.token_hex(SECRET_BYTES), client_id)
        with self._lock:
            self._pools[pool.id] = pool
        return pool, p.PoolOffer(id=pool.id, secret=pool.secret, size=self.per_client,
                                 idleTimeout=self.idle_timeout, relayAddr=relay_addr)

    def close(self, pool: ClientPool | None) -> None:
        """The registration ended: its waiting channels are shut down (their threads close them)."""
        if pool is None:
            return
        with self._lock:
            if self._pools.pop(pool.id, None) is None:
                return
            sockets = list(pool.sockets)
            self._count -= len(sockets)
            pool.sockets.clear()
        for sock in sockets:
            shutdown_quietly(sock)

    def close_all(self) -> None:
        with self._lock:
            pools = list(self._pools.values())
        for pool in pools:
            self.close(pool)

    def admit(self, pool_id: str, secret: str, sock: socket.socket) -> tuple[JoinStatus, ClientPool | None]:
        with self._lock:
            pool = self._pools.get(pool_id)
            if pool is None:
                return JoinStatus.UNKNOWN_SESSION, None  # no such registration (ended, or never)
            if not hmac.compare_digest(pool.secret, secret):
                return JoinStatus.BAD_SECRET, None
            full = len(pool.sockets) >= self.per_client or self._count >= self.total
            if not full:
                pool.sockets.add(sock)
                self._count += 1
        if full or self.out_of_descriptors():
            if not full:
                self.leave(pool, sock)
            self.limit_log.bit("pool", pool.client_id, "pooled data channel of %s refused: its pool (%d) or the "
                               "relay's (%d) is full, or descriptors are short (maxPooledChannelsPerClient, "
                               "maxPooledChannels)", pool.client_id, self.per_client, self.total)
            return JoinStatus.BUSY, None
        return JoinStatus.JOINED, pool

    def leave(self, pool: ClientPool, sock: socket.socket) -> None:
        with self._lock:
            if sock in pool.sockets:
                pool.sockets.discard(sock)
                self._count -= 1


def serve_pool_channel(server: Server, sock: socket.socket, header: bytes) -> None:
    """A pooled channel: admit it, wait for its join header, then serve it as a data channel."""
    from .relay import serve_data_channel  # relay.py imports nothing of this module

    try:
        hello = unpack_pool_header(header)
    except FrameError as exc:
        log.debug("pooled data channel refused: %s", exc)
        close_quietly(sock)
        return
    status, pool = server.pools.admit(hello.pool_id, hello.secret, sock)
    if pool is None:
        log.info("pooled data channel refused: %s", status.describe())
    try:
        sock.sendall(bytes([status]))
    except OSError:
        if pool is not None:
            server.pools.leave(pool, sock)
            pool = None
    if pool is None:
        close_quietly(sock)
        return
    keep_alive(sock, server.config.data_channel_timeout)  # a vanished client is noticed before the idle timeout
    try:
        join_header = recv_exact(sock, HEADER_SIZE, time.monotonic() + server.pools.idle_timeout)
    except (OSError, ValueError) as exc:  # idle, closed by its owner, or shut down with its pool
        log.debug("pooled data channel of %s closed: %s", pool.client_id, exc)
        server.pools.leave(pool, sock)
        close_quietly(sock)
        return
    server.pools.leave(pool, sock)
    if join_header[:2] != DATA_MAGIC:
        log.debug("pooled data channel of %s closed: no join header", pool.client_id)
        close_quietly(sock)
        return
    server.pools.bound += 1
    serve_data_channel(server, sock, join_header, owner=pool.client_id)
