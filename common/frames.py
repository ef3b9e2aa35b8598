"""Binary framing for the data path: the TCP data-channel header and the UDP registration.

Plain bytes in, plain values out; no sockets here.

TCP data channel (client -> relay, first bytes on a fresh connection to the relay port)::

    0xFD 0x01 | side (1 byte: 'A' or 'B') | session id (16 bytes) | side secret (16 bytes)

and the relay answers with one status byte (``JoinStatus``) before any payload flows.

UDP registration (client -> relay port, from the socket that will carry the session)::

    0xFD 0x02 | side | session id (16) | side secret (16)

answered by ``0xFD 0x03 | session id (16) | status (1)``. Once an address is registered,
every other datagram from it is payload and is forwarded untouched.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

DATA_MAGIC = b"\xfd\x01"
UDP_REGISTER_MAGIC = b"\xfd\x02"
UDP_ACK_MAGIC = b"\xfd\x03"
ID_BYTES = 16
SECRET_BYTES = 16
HEADER_SIZE = 2 + 1 + ID_BYTES + SECRET_BYTES
UDP_ACK_SIZE = 2 + ID_BYTES + 1
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


def pack_udp_register(join: JoinRequest) -> bytes:
    return _pack(UDP_REGISTER_MAGIC, join)


def is_udp_register(data: bytes) -> bool:
    return len(data) == HEADER_SIZE and data[:2] == UDP_REGISTER_MAGIC


def unpack_udp_register(data: bytes) -> JoinRequest:
    return _unpack(UDP_REGISTER_MAGIC, data)


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
