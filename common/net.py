"""Small blocking-socket helpers shared by the relay and the client."""

from __future__ import annotations

import socket
import struct
import time

SOCKET_BUFFER = 4 * 1024 * 1024  # UDP sockets: room for bursts of datagrams


def tune_tcp(sock: socket.socket) -> socket.socket:
    """Interactive traffic must not wait for Nagle: every relayed socket gets TCP_NODELAY."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass
    return sock


_LINGER_RESET = struct.pack("ii", 1, 0)  # on, 0 s: close() sends RST and drops what is unsent
_LINGER_NORMAL = struct.pack("ii", 0, 0)


def arm_reset(sock: socket.socket) -> None:
    """Make every close of ``sock`` a reset (RST), including the kernel's close when this process
    dies: a peer must never take a crash for a clean end of stream. ``disarm_reset`` before a
    clean close."""
    _set_linger(sock, _LINGER_RESET)


def disarm_reset(sock: socket.socket) -> None:
    """A clean end: the next close lingers as usual, so data still unsent is delivered."""
    _set_linger(sock, _LINGER_NORMAL)


def _set_linger(sock: socket.socket, value: bytes) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, value)
    except OSError:
        pass


def reset_connection(sock: socket.socket | None) -> None:
    """End a connection abnormally: the peer sees ECONNRESET, never a FIN."""
    if sock is None:
        return
    arm_reset(sock)
    shutdown_quietly(sock, socket.SHUT_RD)  # wakes a reader without sending FIN
    try:
        sock.close()
    except OSError:
        pass


def keep_alive(sock: socket.socket, timeout: float) -> None:
    """Notice a dead link within about ``timeout`` seconds: keepalive probes while idle, and
    TCP_USER_TIMEOUT while sent data goes unacknowledged (retransmissions alone take ~15 min)."""
    if timeout <= 0:
        return
    idle = max(1, int(timeout / 3))
    options = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)]
    for name, value in (("TCP_KEEPIDLE", idle), ("TCP_KEEPINTVL", max(1, int(timeout / 6))),
                        ("TCP_KEEPCNT", 4), ("TCP_USER_TIMEOUT", int(timeout * 1000))):
        if hasattr(socket, name):
            options.append((socket.IPPROTO_TCP, getattr(socket, name), value))
    for level, option, value in options:
        try:
            sock.setsockopt(level, option, value)
        except OSError:
            pass


def enlarge_udp_buffers(sock: socket.socket) -> None:
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
        except OSError:
            pass


# What a blocking recvfrom raises when its kernel timeout (kernel_timeout) passes, beside
# Python's own socket.timeout: EAGAIN surfaces as BlockingIOError.
TIMED_OUT = (socket.timeout, BlockingIOError)


def kernel_timeout(sock: socket.socket, seconds: float) -> None:
    """Give ``sock`` a timeout the kernel keeps (SO_RCVTIMEO, SO_SNDTIMEO) and put it in blocking
    mode. Why: with Python's own timeout (settimeout) every recvfrom and every sendto is a poll()
    and then the call, twice the syscalls per datagram on a UDP hot path. An expired wait raises
    one of TIMED_OUT, so a loop still notices its stop within ``seconds``."""
    sock.settimeout(None)
    whole = int(seconds)
    micro = int((seconds - whole) * 1_000_000)
    timeval = struct.pack("@ll", whole, micro if whole or micro else 1)  # 0 s 0 us would mean "never"
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)


def recv_exact(sock: socket.socket, size: int, deadline: float) -> bytes:
    """Read exactly ``size`` bytes before ``deadline`` (time.monotonic()).

    Raises ConnectionError on EOF and TimeoutError when the deadline passes, however slowly
    the peer trickles bytes in.
    """
    chunks = []
    need = size
    while need:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"peer sent {size - need} of {size} bytes before the deadline")
        sock.settimeout(remaining)
        chunk = sock.recv(need)
        if not chunk:
            raise ConnectionError(f"peer closed after {size - need} of {size} bytes")
        chunks.append(chunk)
        need -= len(chunk)
    return b"".join(chunks)


def shutdown_quietly(sock: socket.socket | None, how: int = socket.SHUT_RDWR) -> None:
    if sock is None:
        return
    try:
        sock.shutdown(how)
    except OSError:
        pass


def close_only(sock) -> None:
    """Close, ignoring errors, without the shutdown of ``close_quietly``: for a socket no thread
    is blocked on any more."""
    try:
        sock.close()
    except OSError:
        pass


def close_quietly(sock: socket.socket | None) -> None:
    """Shut down (which wakes a thread blocked in recv on it) and close."""
    if sock is None:
        return
    shutdown_quietly(sock)
    try:
        sock.close()
    except OSError:
        pass


def host_for_url(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def mapped_v6(addr: tuple) -> tuple:
    """An IPv4 (host, port) as a dual-stack IPv6 socket names it."""
    return (addr[0] if ":" in addr[0] else f"::ffff:{addr[0]}", addr[1])


def udp_socket_for(family_a: int, addr_a: tuple, family_b: int, addr_b: tuple) -> tuple[socket.socket, tuple]:
    """One UDP socket that reaches both addresses, and the addresses as its recvfrom names them:
    of their family when they share one, else dual-stack IPv6 (IPv4 as ::ffff:a.b.c.d)."""
    if family_a == family_b:
        return socket.socket(family_a, socket.SOCK_DGRAM), (addr_a, addr_b)
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    return sock, (mapped_v6(addr_a), mapped_v6(addr_b))
