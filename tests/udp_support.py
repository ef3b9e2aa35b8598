"""Helpers for the UDP hardening and IPv6 tests: speaking the UDP registration by hand."""

from __future__ import annotations

import socket

from common.frames import UDP_WHO_ARE_YOU, JoinRequest, JoinStatus, pack_udp_register, unpack_udp_ack, unpack_udp_challenge


def relay_answer(sock: socket.socket, timeout: float = 5.0) -> bytes:
    """The next challenge or ack (notices for earlier strangers' datagrams are skipped)."""
    sock.settimeout(timeout)
    while True:
        data = sock.recvfrom(65535)[0]
        if data != UDP_WHO_ARE_YOU:
            return data


def fetch_challenge(sock: socket.socket, relay: tuple, join: JoinRequest) -> bytes:
    """Send a hello and return the challenge the relay hands this socket's address."""
    sock.sendto(pack_udp_register(join), relay)
    answer = relay_answer(sock)
    challenge = unpack_udp_challenge(answer)
    assert challenge is not None, f"expected a challenge, got {answer!r}"
    return challenge[1]


def register_by_hand(sock: socket.socket, relay: tuple, join: JoinRequest) -> JoinStatus:
    """The whole exchange (hello, challenge, proof) from ``sock``; the relay's status."""
    sock.sendto(pack_udp_register(join), relay)
    answer = relay_answer(sock)
    challenge = unpack_udp_challenge(answer)
    if challenge is not None:
        sock.sendto(pack_udp_register(join, challenge[1]), relay)
        answer = relay_answer(sock)
    ack = unpack_udp_ack(answer)
    assert ack is not None, f"expected an ack, got {answer!r}"
    return ack[1]
