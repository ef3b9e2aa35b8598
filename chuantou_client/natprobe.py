"""NAT discovery for the direct path: ``probe_nat`` asks the relay's UDP port (and its
``--probe-port``) what address they see for one socket and classifies the NAT's mapping, then
asks the UDP port to answer a fresh socket from the probe port and classifies its filtering
(common.direct)."""

from __future__ import annotations

import os
import socket
import threading
import time

from common import direct as d
from common.net import close_quietly

from .direct import local_candidate

PROBE_TRIES = 3
PROBE_WAIT = 0.3  # seconds per try


def probe_nat(host: str, udp_port: int, probe_port: int | None, stopping: threading.Event) -> dict:
    """Ask the relay's UDP port and probe port what they see of one socket, and whether an answer
    from the probe port reaches a socket that sent only to the UDP port; classify both."""
    try:
        family, _, _, _, sockaddr = socket.getaddrinfo(host, udp_port, type=socket.SOCK_DGRAM)[0]
    except OSError as exc:
        return {"mapping": f"unknown (cannot resolve {host}: {exc.strerror or exc})",
                "filtering": d.FILTER_NO_ANSWER}
    relay = sockaddr[:2]
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        first = _ask(sock, relay, stopping)
        second = _ask(sock, (relay[0], probe_port), stopping) if probe_port and first else None
        # no probe sent (stopping): the socket was never bound, and has no address worth naming
        local_ip = local_candidate(sock, relay) if first is not None else None
        local = d.parse_candidate(local_ip) if local_ip else None
    finally:
        close_quietly(sock)
    mapping = d.classify_mapping(local, first, second)
    answered = _other_port_answers(family, relay, probe_port, stopping) if probe_port and first else None
    result = {"mapping": mapping, "filtering": d.classify_filtering(mapping, answered)}
    if first is not None:
        result["seenAs"] = d.format_candidate(*first)
    return result


def _other_port_answers(family: int, relay: tuple, probe_port: int, stopping: threading.Event) -> bool | None:
    """The filtering test, on a fresh socket (one that sent to the probe port would have opened
    its NAT to it): ask the relay's UDP port to answer from the probe port. None: stopped."""
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        answer = _ask(sock, relay, stopping, d.pack_filter_probe, answer_from=(relay[0], probe_port))
    finally:
        close_quietly(sock)
    if answer is None and stopping.is_set():
        return None
    return answer is not None


def _ask(sock: socket.socket, relay: tuple, stopping: threading.Event, pack=d.pack_probe,
         answer_from: tuple | None = None) -> tuple | None:
    """Send a probe to ``relay`` (a few tries); the address in the answer that came from
    ``answer_from`` (default: ``relay``), or None."""
    nonce = os.urandom(d.NONCE_BYTES)
    source = answer_from or relay
    for _ in range(PROBE_TRIES):
        if stopping.is_set():
            return None
        try:
            sock.sendto(pack(nonce), relay)
        except OSError:
            return None
        deadline = time.monotonic() + PROBE_WAIT
        while (remaining := deadline - time.monotonic()) > 0:
            sock.settimeout(remaining)
            try:
                data, src = sock.recvfrom(2048)
            except socket.timeout:
                break
            except OSError:  # ICMP: nothing listens there
                return None
            answer = d.unpack_probe_answer(data, nonce) if src[:2] == source else None
            if answer is not None:
                return answer
    return None
