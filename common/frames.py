"""Binary framing for the data path: the TCP data-channel header and the UDP registration.

Plain bytes in, plain values out; no sockets here.

TCP data channel (client -> relay, first bytes on a fresh connection to the relay port)::

    0xFD 0x01 | side (1 byte: 'A' or 'B') | session id (16 bytes) | side secret (16 bytes)

and the relay answers with one status byte (``JoinStatus``) before any payload flows.

A pooled data channel (opened ahead of any session, see chuantou_server/pool.py) starts instead::

    0xFD 0x06 | 'P' | pool id (16 bytes) | pool secret (16 bytes)

with the id and secret the relay gave this client's registration; the relay answers with one
status byte and then waits, up to its idle timeout, for the ordinary join header above, which
binds the channel to a session when the client has one.

UDP registration (client -> relay port, from the socket that will carry the session)::

    0xFD 0x02 | side | session id (16) | challenge (16) | proof (16)

where proof = HMAC-SHA256(side secret, "chuantou-udp" | side | session id | challenge)[:16], so the
secret never crosses the wire. The challenge is one the relay handed to this very source address
(zeros on the first try); the relay answers a registration whose challenge is not current for
its source with ``0xFD 0x04 | session id (16) | challenge (16)``, stateless (an HMAC of the
address under a relay key). A registration copied off the wire and resent from another address
therefore fails: its challenge belongs to the first address. Every other answer is the ack
``0xFD 0x03 | session id (16) | status (1)``. Each answer is smaller than the request, so the
relay never sends a stranger more than it sent.

A datagram from an address the relay does not know (after a relay restart, or a NAT rebinding)
may get the notice ``UDP_WHO_ARE_YOU``; a client answers it by registering again, which either
moves its side to the new address or tells it the session is gone. Once an address is
registered, every other datagram from it is payload and is forwarded untouched.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
from dataclasses import dataclass

DATA_MAGIC = b"\xfd\x01"
UDP_REGISTER_MAGIC = b"\xfd\x02"
UDP_ACK_MAGIC = b"\xfd\x03"
UDP_CHALLENGE_MAGIC = b"\xfd\x04"
UDP_WHO_ARE_YOU = b"\xfd\x05"  # "I do not know your address": register again (2 bytes: no amplification)
POOL_MAGIC = b"\xfd\x06"  # a pooled data channel, bound to a session later
POOL_SIDE = b"P"
# Inside a warm session's sealed stream (chuantou_client/warm.py, warmtarget.py), never seen by the
# relay: B -> A once sealed ("holding, not connected to my service"), then A -> B when a user came
# ("connect now"); the user's bytes follow the go frame.
WARM_READY = b"CTW1"
WARM_GO = b"CTG1"
ID_BYTES = 16
SECRET_BYTES = 16
HEADER_SIZE = 2 + 1 + ID_BYTES + SECRET_BYTES
UDP_ACK_SIZE = 2 + ID_BYTES + 1
CHALLENGE_BYTES = 16
PROOF_BYTES = 16
UDP_REGISTER_SIZE = 2 + 1 + ID_BYTES + CHALLENGE_BYTES + PROOF_BYTES
UDP_CHALLENGE_SIZE = 2 + ID_BYTES + CHALLENGE_BYTES
NO_CHALLENGE = bytes(CHALLENGE_BYTES)  # a first registration: "hand me a challenge"
SIDES = (b"A", b"B")


class FrameError(ValueError):
    """Bytes that are not a valid data-channel header or UDP registration."""


class JoinStatus(enum.IntEnum):
    JOINED = 0
    UNKNOWN_SESSION = 1
    BAD_SECRET = 2
    ALREADY_JOINED = 3
    WRONG_PROTOCOL = 4
    BUSY = 5

    def describe(self) -> str:
        return {
            JoinStatus.JOINED: "joined",
            JoinStatus.UNKNOWN_SESSION: "the relay does not know this session (expired or closed)",
            JoinStatus.BAD_SECRET: "the relay refused the session secret",
            JoinStatus.ALREADY_JOINED: "this side of the session is already joined",
            JoinStatus.WRONG_PROTOCOL: "the session is not of this protocol",
            JoinStatus.BUSY: "the relay is at its session limit",
        }[self]


@dataclass(frozen=True)
class JoinRequest:
    side: str  # "A" or "B"
    session_id: str  # hex, as in the control messages
    secret: str  # hex


def _pack(magic: bytes, join: JoinRequest) -> bytes:
    side = join.side.encode()
    if side not in SIDES:
        raise FrameError(f"side must be A or B, not {join.side!r}")
    try:
        sid = bytes.fromhex(join.session_id)
        secret = bytes.fromhex(join.secret)
    except ValueError:
        raise FrameError("session id and secret must be hex strings") from None
    if len(sid) != ID_BYTES or len(secret) != SECRET_BYTES:
        raise FrameError(f"session id and secret must be {ID_BYTES} bytes each")
    return magic + side + sid + secret


def _unpack(magic: bytes, data: bytes) -> JoinRequest:
    if len(data) != HEADER_SIZE or data[:2] != magic:
        raise FrameError("not a join header")
    side = data[2:3]
    if side not in SIDES:
        raise FrameError("join header names no valid side")
    return JoinRequest(side.decode(), data[3:3 + ID_BYTES].hex(), data[3 + ID_BYTES:].hex())


def pack_data_header(join: JoinRequest) -> bytes:
    return _pack(DATA_MAGIC, join)


def unpack_data_header(data: bytes) -> JoinRequest:
    return _unpack(DATA_MAGIC, data)


@dataclass(frozen=True)
class PoolHello:
    pool_id: str  # hex, as in the register_response
    secret: str  # hex


def pack_pool_header(hello: PoolHello) -> bytes:
    try:
        pool_id, secret = bytes.fromhex(hello.pool_id), bytes.fromhex(hello.secret)
    except ValueError:
        raise FrameError("pool id and secret must be hex strings") from None
    if len(pool_id) != ID_BYTES or len(secret) != SECRET_BYTES:
        raise FrameError(f"pool id and secret must be {ID_BYTES} bytes each")
    return POOL_MAGIC + POOL_SIDE + pool_id + secret


def unpack_pool_header(data: bytes) -> PoolHello:
    if len(data) != HEADER_SIZE or data[:2] != POOL_MAGIC or data[2:3] != POOL_SIDE:
        raise FrameError("not a pool header")
    return PoolHello(data[3:3 + ID_BYTES].hex(), data[3 + ID_BYTES:].hex())


@dataclass(frozen=True)
class UdpRegister:
    side: str
    session_id: str  # hex
    challenge: bytes
    proof: bytes


def udp_register_proof(secret: str, side: str, session_id: str, challenge: bytes) -> bytes:
    """What proves the side secret for one challenge (and so for one source address)."""
    message = b"chuantou-udp" + side.encode() + bytes.fromhex(session_id) + challenge
    return hmac.new(bytes.fromhex(secret), message, hashlib.sha256).digest()[:PROOF_BYTES]


def udp_proof_matches(secret: str, register: UdpRegister) -> bool:
    expected = udp_register_proof(secret, register.side, register.session_id, register.challenge)
    return hmac.compare_digest(expected, register.proof)


def address_challenge(key: bytes, addr: tuple, session_id: str, side: str, epoch: int) -> bytes:
    """The relay's stateless challenge for one source address, session side and time window."""
    message = f"{addr[0]}|{addr[1]}|{session_id}|{side}|{epoch}".encode()
    return hmac.new(key, message, hashlib.sha256).digest()[:CHALLENGE_BYTES]


def pack_udp_register(join: JoinRequest, challenge: bytes = NO_CHALLENGE) -> bytes:
    """A registration answering ``challenge``, proved with ``join.secret`` (which is not sent)."""
    header = _pack(UDP_REGISTER_MAGIC, join)[:3 + ID_BYTES]  # validates side, id and secret
    if len(challenge) != CHALLENGE_BYTES:
        raise FrameError(f"a UDP challenge is {CHALLENGE_BYTES} bytes")
    return header + challenge + udp_register_proof(join.secret, join.side, join.session_id, challenge)


def is_udp_register(data: bytes) -> bool:
    return len(data) == UDP_REGISTER_SIZE and data[:2] == UDP_REGISTER_MAGIC


def unpack_udp_register(data: bytes) -> UdpRegister:
    if not is_udp_register(data):
        raise FrameError("not a UDP registration")
    side = data[2:3]
    if side not in SIDES:
        raise FrameError("UDP registration names no valid side")
    challenge_at = 3 + ID_BYTES
    return UdpRegister(side.decode(), data[3:challenge_at].hex(),
                       data[challenge_at:challenge_at + CHALLENGE_BYTES], data[challenge_at + CHALLENGE_BYTES:])


def pack_udp_challenge(session_id: str, challenge: bytes) -> bytes:
    return UDP_CHALLENGE_MAGIC + bytes.fromhex(session_id) + challenge


def unpack_udp_challenge(data: bytes) -> tuple[str, bytes] | None:
    """Return (session id, challenge) if ``data`` is a relay's challenge, else None."""
    if len(data) != UDP_CHALLENGE_SIZE or data[:2] != UDP_CHALLENGE_MAGIC:
        return None
    return data[2:2 + ID_BYTES].hex(), data[2 + ID_BYTES:]


def pack_udp_ack(session_id: str, status: JoinStatus) -> bytes:
    return UDP_ACK_MAGIC + bytes.fromhex(session_id) + bytes([status])


def unpack_udp_ack(data: bytes) -> tuple[str, JoinStatus] | None:
    """Return (session id, status) if ``data`` is a registration ack, else None."""
    if len(data) != UDP_ACK_SIZE or data[:2] != UDP_ACK_MAGIC:
        return None
    try:
        return data[2:2 + ID_BYTES].hex(), JoinStatus(data[-1])
    except ValueError:
        return None
