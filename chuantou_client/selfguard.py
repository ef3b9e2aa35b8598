"""The client's own listening sockets (its local API, its proxies) are never the target of a
session, whatever ``--allow`` says.

Without this, any other client of the relay could open a session to this client's API port
and delete or redirect its proxies: the API's Host-header check cannot help, since the
attacker writes the Host header inside the tunnel. The check compares resolved addresses, not
names, so ``localhost``, ``127.1``, ``0.0.0.0`` or ``::ffff:127.0.0.1`` all count as what
they reach; the caller then connects to exactly the address that was checked (a name that
resolves differently a moment later changes nothing).
"""

from __future__ import annotations

import ipaddress
import socket
import threading


def _ip(text: str):
    addr = ipaddress.ip_address(text.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def is_this_machine(ip: str) -> bool:
    """Whether ``ip`` is an address of this machine (loopback, unspecified, or one that a socket
    can be bound to)."""
    addr = _ip(ip)
    if addr.is_loopback or addr.is_unspecified:
        return True
    family = socket.AF_INET6 if addr.version == 6 else socket.AF_INET
    probe = socket.socket(family, socket.SOCK_DGRAM)
    try:
        probe.bind((str(addr), 0))  # EADDRNOTAVAIL unless the address is assigned here
    except OSError:
        return False
    finally:
        probe.close()
    return True


class SelfGuard:
    """The (address, port, kind) of every socket this client listens on; ``kind`` is "tcp" or
    "udp". Proxies and the local API add theirs while they listen."""

    def __init__(self):
        self._endpoints: set[tuple[str, int, str]] = set()
        self._lock = threading.Lock()

    def protect(self, sock: socket.socket, kind: str) -> tuple:
        """Guard the bound address of ``sock``; returns the key to give to ``release``."""
        host, port = sock.getsockname()[:2]
        key = (str(_ip(host)), port, kind)
        with self._lock:
            self._endpoints.add(key)
        return key

    def release(self, key: tuple) -> None:
        with self._lock:
            self._endpoints.discard(key)

    def reaches_self(self, sockaddr: tuple, kind: str) -> bool:
        """Whether connecting to ``sockaddr`` (a resolved address) would reach one of our sockets."""
        ip, port = sockaddr[0], sockaddr[1]
        with self._lock:
            listeners = [host for host, p, k in self._endpoints if p == port and k == kind]
        if not listeners:
            return False
        target = _ip(ip)
        for host in listeners:
            bound = ipaddress.ip_address(host)
            if bound == target:
                return True
            if bound.is_unspecified and is_this_machine(str(target)):
                return True
            if target.is_unspecified:  # connecting to 0.0.0.0 / :: reaches a local listener
                return True
        return False


def resolve_for_connect(host: str, port: int, kind: str) -> list[tuple]:
    """``getaddrinfo`` for a connection of ``kind``: [(family, sockaddr), ...] in preference order."""
    socktype = socket.SOCK_STREAM if kind == "tcp" else socket.SOCK_DGRAM
    return [(family, sockaddr) for family, _, _, _, sockaddr in socket.getaddrinfo(host, port, type=socktype)]
