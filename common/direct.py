"""The direct path for UDP, as plain data: NAT probes, punch packets, candidates, path memory.

No sockets here. Framing (all on the UDP sockets the clients already use toward the relay)::

    probe    client -> relay port (or --probe-port):  0xFD 0x06 | nonce (16) | zero padding to 40 bytes
    answer   relay -> client:                         0xFD 0x07 | nonce (16) | port (2) | ip (4 or 16)
    filter   client -> relay port:                    0xFD 0x09 | nonce (16) | zero padding to 40 bytes
             ("answer from your --probe-port": the answer comes from the other port, to the sender only)
    punch    client -> peer candidate:                0xFD 0x08 | kind ('P' ping, 'O' pong) | side | session id (16)
                                                      | nonce (12) | tag (16)            (48 bytes)

The probe is padded so that the answer is never bigger than the request (no amplification), and
every answer goes to the address the request came from: a spoofed source gets no more than the
spoofer sent.
The punch tag is HMAC-SHA256(punch key, "chuantou-punch-v2" | kind | side | session id | nonce)[:16];
the punch key comes from the relay over each side's authenticated control channel, so a stranger
who sees a client's punched port cannot make it take another address for its peer. Every ping
carries a fresh random nonce and a pong echoes the nonce of the ping it answers: only a pong to
one of our own recent pings (``OutstandingPings``) proves the path, so a genuine ping or pong
recorded on the way and replayed later (from the peer's address) keeps no dead path alive. A
replayed ping still gets its pong, of the same size (no amplification), and proves nothing.
The first format (36 bytes, no nonce) is not genuine to this one, nor this one to it: between
clients of the two versions every attempt fails, and the flow takes the relay after the deadline.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import random
import secrets
import time
from collections import deque
from dataclasses import dataclass

PROBE_MAGIC = b"\xfd\x06"
PROBE_ANSWER_MAGIC = b"\xfd\x07"
PUNCH_MAGIC = b"\xfd\x08"
FILTER_PROBE_MAGIC = b"\xfd\x09"
NONCE_BYTES = 16
PROBE_SIZE = 40  # >= the largest answer (2 + 16 + 2 + 16 = 36)
PUNCH_TAG_BYTES = 16
PUNCH_NONCE_BYTES = 12
PUNCH_SIZE = 2 + 1 + 1 + 16 + PUNCH_NONCE_BYTES + PUNCH_TAG_BYTES
PUNCH_LABEL = b"chuantou-punch-v2"
MAX_OUTSTANDING = 8  # pings of ours a pong may still answer (older ones are forgotten)
PING, PONG = b"P", b"O"
PATHS = ("auto", "relay", "direct")
DEFAULT_DEADLINE = 1.0  # seconds a new flow waits for a direct path before it takes the relay
# A live direct path is watched: each side pings the other this often and answers pings, and a
# side that heard nothing genuine from its peer for DEAD_AFTER keepalives ends the flow (UDP has
# no reset: without this, a path cut mid-run would swallow the user's datagrams until idle).
DIRECT_KEEPALIVE = 2.0
DEAD_AFTER = 3
MAX_CANDIDATES = 8

# NAT mapping behaviour, as `status` words it
EIM = "endpoint-independent mapping"
EDM = "endpoint-dependent mapping (symmetric NAT: direct paths will fail)"
NO_NAT = "no NAT (the relay sees this host's own address)"
ONE_PORT = "mapping not tested (the relay has no --probe-port)"
NO_ANSWER = "unknown (the relay did not answer UDP probes)"

# NAT filtering (RFC 5780's test III, simplified): does an answer from the relay's other port get
# in, to a socket that sent only to the relay's main port? With one relay address the relay
# cannot tell endpoint-independent filtering from address-dependent behind a NAT.
EIF = "endpoint-independent filtering (no NAT: an answer from another port of the relay got in)"
ADF = "address-dependent (or endpoint-independent) filtering (an answer from another port of the relay got in)"
APDF = "address-and-port-dependent filtering (an answer from another port of the relay did not get in)"
FILTER_ONE_PORT = "filtering not tested (the relay has no --probe-port)"
FILTER_NO_ANSWER = "filtering unknown (the relay did not answer UDP probes)"


class DirectFrameError(ValueError):
    pass


# --- NAT probes ------------------------------------------------------------------------------

def pack_probe(nonce: bytes) -> bytes:
    if len(nonce) != NONCE_BYTES:
        raise DirectFrameError(f"a probe nonce is {NONCE_BYTES} bytes")
    return PROBE_MAGIC + nonce + bytes(PROBE_SIZE - 2 - NONCE_BYTES)


def is_probe(data: bytes) -> bool:
    return len(data) == PROBE_SIZE and data[:2] == PROBE_MAGIC


def pack_filter_probe(nonce: bytes) -> bytes:
    """A probe the relay answers from its other port (the filtering test)."""
    return FILTER_PROBE_MAGIC + pack_probe(nonce)[2:]


def is_filter_probe(data: bytes) -> bool:
    return len(data) == PROBE_SIZE and data[:2] == FILTER_PROBE_MAGIC


def pack_probe_answer(probe: bytes, addr: tuple) -> bytes:
    """The relay's answer to ``probe`` from ``addr``: the (ip, port) it saw."""
    ip = ipaddress.ip_address(addr[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # a dual-stack relay sees IPv4 clients as ::ffff:a.b.c.d
    return PROBE_ANSWER_MAGIC + probe[2:2 + NONCE_BYTES] + int(addr[1]).to_bytes(2, "big") + ip.packed


def unpack_probe_answer(data: bytes, nonce: bytes) -> tuple[str, int] | None:
    """The (ip, port) in an answer to our probe with ``nonce``, else None."""
    if data[:2] != PROBE_ANSWER_MAGIC or len(data) not in (2 + NONCE_BYTES + 2 + 4, 2 + NONCE_BYTES + 2 + 16):
        return None
    if not hmac.compare_digest(data[2:2 + NONCE_BYTES], nonce):
        return None
    port = int.from_bytes(data[18:20], "big")
    return str(ipaddress.ip_address(data[20:])), port


def classify_mapping(local: tuple | None, first: tuple | None, second: tuple | None) -> str:
    """RFC 5780's mapping test, simplified: what two relay ports saw of one socket.

    ``local``: the socket's own (ip, port); ``first`` and ``second``: what the relay's port and
    its probe port reported (None: no answer, or no probe port)."""
    if first is None:
        return NO_ANSWER
    if local is not None and tuple(first) == tuple(local):
        return NO_NAT
    if second is None:
        return ONE_PORT
    return EIM if tuple(first) == tuple(second) else EDM


def classify_filtering(mapping: str, other_port_answered: bool | None) -> str:
    """RFC 5780's filtering test, simplified. ``mapping``: classify_mapping's verdict (the relay
    answered at all, and is there a NAT); ``other_port_answered``: did the answer sent from the
    relay's other port arrive (None: not asked, the relay has no probe port)."""
    if mapping == NO_ANSWER:
        return FILTER_NO_ANSWER
    if other_port_answered is None:
        return FILTER_ONE_PORT
    if not other_port_answered:
        return APDF
    return EIF if mapping == NO_NAT else ADF


# --- punch packets ---------------------------------------------------------------------------

def new_punch_nonce() -> bytes:
    return secrets.token_bytes(PUNCH_NONCE_BYTES)


def punch_tag(key: bytes, kind: bytes, side: str, session_id: str, nonce: bytes) -> bytes:
    message = PUNCH_LABEL + kind + side.encode() + bytes.fromhex(session_id) + nonce
    return hmac.new(key, message, hashlib.sha256).digest()[:PUNCH_TAG_BYTES]


def pack_punch(key: bytes, kind: bytes, side: str, session_id: str, nonce: bytes) -> bytes:
    """A ping (``nonce``: fresh, new_punch_nonce) or the pong to one (``nonce``: the ping's)."""
    if len(nonce) != PUNCH_NONCE_BYTES:
        raise DirectFrameError(f"a punch nonce is {PUNCH_NONCE_BYTES} bytes")
    return (PUNCH_MAGIC + kind + side.encode() + bytes.fromhex(session_id) + nonce
            + punch_tag(key, kind, side, session_id, nonce))


def unpack_punch(data: bytes, key: bytes, session_id: str, from_side: str) -> tuple[bytes, bytes] | None:
    """(PING or PONG, nonce) when ``data`` is a genuine punch packet of ``from_side`` for this
    session. Genuine says who made it, not when: whether a pong answers a ping of ours is
    OutstandingPings' business."""
    if len(data) != PUNCH_SIZE or data[:2] != PUNCH_MAGIC:
        return None
    kind, side = data[2:3], data[3:4]
    if kind not in (PING, PONG) or side != from_side.encode() or data[4:20] != bytes.fromhex(session_id):
        return None
    nonce = data[20:20 + PUNCH_NONCE_BYTES]
    if not hmac.compare_digest(data[20 + PUNCH_NONCE_BYTES:], punch_tag(key, kind, from_side, session_id, nonce)):
        return None
    return kind, nonce


class OutstandingPings:
    """The nonces of our latest pings (at most ``size``; the oldest are forgotten), each with the
    time it was first sent. A pong proves the path only by answering one of them, and each
    answers once: the one it answers and every older one are retired, so a recorded pong,
    replayed, answers nothing."""

    def __init__(self, size: int = MAX_OUTSTANDING):
        self._pings: deque[tuple[bytes, float]] = deque(maxlen=size)

    def fresh(self, now: float) -> bytes:
        nonce = new_punch_nonce()
        self._pings.append((nonce, now))
        return nonce

    def answer(self, nonce: bytes) -> float | None:
        """When the ping that ``nonce`` answers was sent (and it is retired), or None: not one
        of ours, or answered already, or forgotten."""
        found = -1
        for index, (mine, _) in enumerate(self._pings):  # compared with each: no early exit
            if hmac.compare_digest(mine, nonce):
                found = index
        if found < 0:
            return None
        sent_at = self._pings[found][1]
        for _ in range(found + 1):
            self._pings.popleft()
        return sent_at

    def __len__(self) -> int:
        return len(self._pings)


# --- candidates ------------------------------------------------------------------------------

def format_candidate(ip: str, port: int) -> str:
    parsed = ipaddress.ip_address(ip)
    if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None:
        parsed = parsed.ipv4_mapped
    return f"[{parsed}]:{port}" if parsed.version == 6 else f"{parsed}:{port}"


def parse_candidate(text: str) -> tuple[str, int]:
    """``"a.b.c.d:port"`` or ``"[v6]:port"`` -> (ip, port); DirectFrameError otherwise."""
    host, sep, port = text.rpartition(":")
    if not sep:
        raise DirectFrameError(f"candidate {text[:60]!r} has no port")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ip = ipaddress.ip_address(host)
        number = int(port)
    except ValueError:
        raise DirectFrameError(f"candidate {text[:60]!r} is not ip:port") from None
    if not 1 <= number <= 65535:
        raise DirectFrameError(f"candidate {text[:60]!r} has a port outside 1-65535")
    return str(ip), number


def for_socket(family_is_v6: bool, ip: str, port: int) -> tuple:
    """A candidate as a socket of that family sends to it (and recvfrom reports it)."""
    if family_is_v6 and ipaddress.ip_address(ip).version == 4:
        return f"::ffff:{ip}", port
    return ip, port


# --- path memory -----------------------------------------------------------------------------

FIRST_RETRY = 5.0  # seconds after a first failure before a pair is tried again
MAX_RETRY = 300.0  # never longer than this: a pair is never "relay forever"


@dataclass
class PairMemory:
    successes: int = 0
    failures: int = 0  # in a row
    last: str = ""  # "direct" or "relay"
    retry_at: float = 0.0  # monotonic; before it a failed pair goes straight to the relay


class PathMemory:
    """Per peer: did the last attempt go direct? A pair that failed is retried after a backoff
    that doubles per failure (with jitter, capped); one success clears it."""

    def __init__(self, first_retry: float = FIRST_RETRY, max_retry: float = MAX_RETRY, clock=time.monotonic):
        self.first_retry = first_retry
        self.max_retry = max_retry
        self.clock = clock
        self.pairs: dict[str, PairMemory] = {}

    def should_try(self, peer: str) -> bool:
        pair = self.pairs.get(peer)
        return pair is None or pair.failures == 0 or self.clock() >= pair.retry_at

    def succeeded(self, peer: str) -> None:
        pair = self.pairs.setdefault(peer, PairMemory())
        pair.successes += 1
        pair.failures = 0
        pair.last = "direct"
        pair.retry_at = 0.0

    def failed(self, peer: str) -> None:
        pair = self.pairs.setdefault(peer, PairMemory())
        pair.failures += 1
        pair.last = "relay"
        delay = min(self.max_retry, self.first_retry * 2 ** (pair.failures - 1))
        pair.retry_at = self.clock() + delay * random.uniform(0.8, 1.0)

    def describe(self) -> dict:
        now = self.clock()
        return {peer: {"last": pair.last, "successes": pair.successes, "failures": pair.failures,
                       "retryIn": max(0.0, pair.retry_at - now) if pair.failures else 0.0}
                for peer, pair in self.pairs.items()}
