"""The UDP relay: one socket on the relay's port number, one thread, keyed by (ip, port).

An address becomes part of a session by sending a registration datagram with the session
id and its side's secret; from then on every datagram from it goes to the other side's
registered address. Datagrams that arrive before the other side registers wait in a small
per-session queue.
"""

from __future__ import annotations

import logging
import socket
import threading
import time

from common.frames import FrameError, is_udp_register, pack_udp_ack, unpack_udp_register

log = logging.getLogger("chuantou.server")

MAX_DATAGRAM = 65535
EARLY_QUEUE = 64  # datagrams held per session until the other side registers


class UdpRelay:
    def __init__(self, sock: socket.socket, sessions, stopping: threading.Event):
        self.sock = sock
        self.sessions = sessions
        self.stopping = stopping
        self._lock = threading.Lock()
        self._addrs: dict[tuple, tuple] = {}  # addr -> (session, side index 0=A 1=B)
        self._early: dict[str, list] = {}  # session id -> [(side index, datagram)]
        self.dropped = 0

    def run(self) -> None:
        self.sock.settimeout(0.25)  # lets the loop notice stop()
        recvfrom = self.sock.recvfrom
        sendto = self.sock.sendto
        addrs = self._addrs
        while not self.stopping.is_set():
            try:
                data, addr = recvfrom(MAX_DATAGRAM)
            except socket.timeout:
                continue
            except OSError:
                if self.stopping.is_set():
                    return
                continue
            entry = addrs.get(addr[:2])
            if entry is None or is_udp_register(data):
                self._register(data, addr)
                continue
            session, side = entry
            session.last_active = time.monotonic()
            session.udp_bytes[side] += len(data)
            peer = session.udp_b if side == 0 else session.udp_a
            if peer is None:
                self._hold_early(session, side, data)
                continue
            try:
                sendto(data, peer)
            except OSError:
                self.dropped += 1

    def _register(self, data: bytes, addr: tuple) -> None:
        if not is_udp_register(data):
            self.dropped += 1
            return
        try:
            join = unpack_udp_register(data)
        except FrameError:
            self.dropped += 1
            return
        status, session = self.sessions.check_join(join, "udp")
        if session is not None:
            side = 0 if join.side == "A" else 1
            key = addr[:2]
            with self._lock:
                old = session.udp_a if side == 0 else session.udp_b
                if old is not None and old != key:
                    self._addrs.pop(old, None)  # the side moved (NAT rebinding): follow it
                if side == 0:
                    session.udp_a = key
                else:
                    session.udp_b = key
                self._addrs[key] = (session, side)
                session.last_active = time.monotonic()
                early = self._early.pop(session.id, []) if session.joined else []
        self._send(pack_udp_ack(join.session_id, status), addr)
        if session is not None:
            for from_side, datagram in early:
                self._send(datagram, session.udp_b if from_side == 0 else session.udp_a)

    def _hold_early(self, session, side: int, data: bytes) -> None:
        with self._lock:
            queue = self._early.setdefault(session.id, [])
            if len(queue) < EARLY_QUEUE:
                queue.append((side, data))
            else:
                self.dropped += 1

    def _send(self, data: bytes, addr) -> None:
        try:
            self.sock.sendto(data, addr)
        except OSError:
            self.dropped += 1

    def forget(self, session) -> None:
        with self._lock:
            for addr in (session.udp_a, session.udp_b):
                if addr is not None and self._addrs.get(addr, (None,))[0] is session:
                    del self._addrs[addr]
            self._early.pop(session.id, None)

    @property
    def flows(self) -> int:
        return len(self._addrs)
