"""Registering a UDP socket with the relay: hello, challenge, proof, ack.

The relay hands each source address its own challenge; the client proves its side secret
over it (``common.frames``). ``UdpRegistrar`` holds that exchange for one socket so that a
flow can also run it again while it pumps, telling the relay's control datagrams from payload:
when the relay says it does not know the address (after a relay restart or a NAT rebinding),
and as a keepalive every few seconds (a side that only receives would never hear that notice).
"""

from __future__ import annotations

import socket
import time

from common.frames import (
    NO_CHALLENGE, UDP_WHO_ARE_YOU, JoinRequest, JoinStatus, pack_udp_register, unpack_udp_ack,
    unpack_udp_challenge,
)

PAYLOAD = "payload"  # handle(): the datagram is not one of the relay's, deliver it
HANDLED = "handled"  # handle(): a challenge or notice, answered here
CONTROL_BYTE = UDP_WHO_ARE_YOU[:1]  # 0xfd: every relay control datagram starts with it, a sealed one never
HELLO_INTERVAL = 0.5  # a flow asks again at most this often when told it is unknown


class UdpRegistrar:
    def __init__(self, sock: socket.socket, relay: tuple, session_id: str, secret: str, side: str):
        self.sock = sock
        self.relay = relay
        self.join = JoinRequest(side, session_id, secret)
        self.challenge = NO_CHALLENGE
        self.last_hello = float("-inf")
        pack_udp_register(self.join)  # fail now on a malformed id or secret

    def send(self) -> None:
        """Send the registration for the challenge known so far (none: a hello)."""
        self.last_hello = time.monotonic()
        self.sock.sendto(pack_udp_register(self.join, self.challenge), self.relay)

    def keep_alive(self, interval: float) -> None:
        """Register again every ``interval`` seconds: keeps a NAT mapping open, lets the relay
        follow a mapping that changed, and tells a flow when the relay forgot its session."""
        if time.monotonic() - self.last_hello >= interval:
            self.send()

    def handle(self, data: bytes, src: tuple):
        """Answer one datagram from ``src``: PAYLOAD, HANDLED, or the JoinStatus of an ack."""
        if data[:1] != CONTROL_BYTE or src[:2] != self.relay:  # payload: the common case, decided first
            return PAYLOAD
        challenge = unpack_udp_challenge(data)
        if challenge is not None and challenge[0] == self.join.session_id:
            self.challenge = challenge[1]
            self.send()
            return HANDLED
        ack = unpack_udp_ack(data)
        if ack is not None and ack[0] == self.join.session_id:
            return ack[1]
        if data == UDP_WHO_ARE_YOU:
            if time.monotonic() - self.last_hello >= HELLO_INTERVAL:
                self.challenge = NO_CHALLENGE  # the relay restarted or we moved: ask for a fresh one
                self.send()
            return HANDLED
        return PAYLOAD


def register_blocking(registrar: UdpRegistrar, timeout: float, retry_every: float) -> JoinStatus | None:
    """Run the exchange until an ack arrives; None when ``timeout`` passes first. Payload that
    arrives meanwhile is dropped; the socket keeps whatever timeout it had."""
    sock = registrar.sock
    deadline = time.monotonic() + timeout
    previous = sock.gettimeout()
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            registrar.send()
            sock.settimeout(min(retry_every, remaining))
            try:
                while True:
                    data, src = sock.recvfrom(65535)
                    answer = registrar.handle(data, src)
                    if isinstance(answer, JoinStatus):
                        return answer
            except socket.timeout:
                continue
            except ConnectionRefusedError:  # ICMP from a relay not (yet) listening: retry
                continue
    finally:
        sock.settimeout(previous)
