"""Control-channel messages: plain data, encode/decode and validation, no I/O.

Every message travels as one JSON text frame ``{"type": ..., "payload": {...}}`` with the
design's type names and camelCase field names. Each type is a frozen dataclass registered
in ``MESSAGE_TYPES``; ``decode`` turns untrusted text into one of them or raises a single
``ProtocolError`` that the receiver answers with an ``error`` message.
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from dataclasses import dataclass

from .logsafe import escape_controls

PROTOCOL_VERSION = 2  # 2: UDP registrations prove the secret over a relay challenge (common.frames)
MAX_MESSAGE_BYTES = 64 * 1024
CLIENT_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
HOST_PATTERN = re.compile(r"^[A-Za-z0-9.:_-]{1,253}$")
# a client's public key: base64 of its SubjectPublicKeyInfo DER (sealed sessions; a hint only,
# since a client trusts the key its peer proves against its own pin, never what the relay says)
PUBLIC_KEY_PATTERN = re.compile(r"^[A-Za-z0-9+/]{4,2048}={0,2}$")
PROTOCOLS = ("tcp", "udp")
# register_response codes: the ID is live with the same credential and takeover was false; the
# ID is online with, or reserved for, another credential
ID_IN_USE = "id_in_use"
ID_TAKEN = "id_taken"


class ProtocolError(ValueError):
    """A frame that is not a valid message; the text says what is wrong."""


MESSAGE_TYPES: dict[str, type] = {}


def message(type_name: str):
    """Register a dataclass as the message with wire name ``type_name``."""

    def register(cls):
        cls = dataclass(frozen=True)(cls)
        cls.TYPE = type_name
        MESSAGE_TYPES[type_name] = cls
        return cls

    return register


def valid_port(value: int) -> bool:
    return 1 <= value <= 65535


def _require(condition: bool, problem: str) -> None:
    if not condition:
        raise ProtocolError(problem)


def _check_public_key(value: str | None, name: str) -> None:
    if value is not None:
        _require(bool(PUBLIC_KEY_PATTERN.match(value)), f"{name} must be base64 of at most 1.5 KiB")


# --- nested values -------------------------------------------------------------------------

@dataclass(frozen=True)
class ClientInfo:
    id: str
    publicKey: str | None = None


@dataclass(frozen=True)
class RelayAddr:
    host: str
    port: int
    protocol: str

    def check(self) -> None:
        _require(valid_port(self.port), f"relayAddr.port {self.port} is outside 1-65535")
        _require(self.protocol in PROTOCOLS, f"relayAddr.protocol must be one of {PROTOCOLS}")


@dataclass(frozen=True)
class Service:
    port: int
    protocol: str

    def check(self) -> None:
        _require(valid_port(self.port), f"service.port {self.port} is outside 1-65535")
        _require(self.protocol in PROTOCOLS, f"service.protocol must be one of {PROTOCOLS}")


# --- messages --------------------------------------------------------------------------------

@message("challenge")
class Challenge:
    """First message of the relay on a new control channel: prove the token over ``nonce``."""

    nonce: str
    authRequired: bool = False
    protocolVersion: int = PROTOCOL_VERSION


@message("register")
class Register:
    clientId: str
    protocolVersion: int
    auth: str | None = None  # common.auth.register_proof(token, nonce, clientId)
    # False: do not replace a live connection holding this ID (a client that was itself replaced
    # asks this, so two holders of one token do not take turns kicking each other); unset: replace
    takeover: bool | None = None
    publicKey: str | None = None  # this client's key for sealed sessions (see PUBLIC_KEY_PATTERN)

    def check(self) -> None:
        _require(
            bool(CLIENT_ID_PATTERN.match(self.clientId)),
            "clientId must be 1-64 characters of letters, digits, '.', '_' or '-', "
            "starting with a letter or digit",
        )
        _check_public_key(self.publicKey, "publicKey")


@message("register_response")
class RegisterResponse:
    success: bool
    assignedId: str | None = None
    existingKicked: bool = False
    error: str | None = None
    protocolVersion: int = PROTOCOL_VERSION
    code: str | None = None  # why a registration failed: ID_IN_USE, ID_TAKEN, or None for any other reason


@message("get_client_list")
class GetClientList:
    requestId: str | None = None


@message("client_list")
class ClientList:
    clients: list[ClientInfo]
    requestId: str | None = None


@message("connect_request")
class ConnectRequest:
    """A asks the relay for a session; the relay forwards it to B with the session fields set."""

    toClientId: str
    remotePort: int
    remoteHost: str | None = None  # a host on B's network; B decides whether to allow it
    requestId: str | None = None
    protocol: str = "tcp"
    localPort: int | None = None
    fromClientId: str | None = None
    sessionId: str | None = None
    secret: str | None = None
    relayAddr: RelayAddr | None = None
    peerPublicKey: str | None = None  # the requester's key as it registered it (a hint for B)

    def check(self) -> None:
        _check_public_key(self.peerPublicKey, "peerPublicKey")
        _require(valid_port(self.remotePort), f"remotePort {self.remotePort} is outside 1-65535")
        _require(self.protocol in PROTOCOLS, f"protocol must be one of {PROTOCOLS}")
        if self.localPort is not None:
            _require(valid_port(self.localPort), f"localPort {self.localPort} is outside 1-65535")
        if self.remoteHost is not None:
            _require(bool(HOST_PATTERN.match(self.remoteHost)), "remoteHost must be a host name or IP address")


@message("create_session")
class CreateSession:
    sessionId: str
    peerClientId: str
    secret: str
    service: Service
    relayAddr: RelayAddr
    requestId: str | None = None
    peerPublicKey: str | None = None  # the target's key as it registered it (a hint for A)

    def check(self) -> None:
        _check_public_key(self.peerPublicKey, "peerPublicKey")


@message("accept_session")
class AcceptSession:
    sessionId: str


@message("reject_session")
class RejectSession:
    sessionId: str
    reason: str | None = None


@message("heartbeat")
class Heartbeat:
    timestamp: float


@message("unregister")
class Unregister:
    pass


@message("session_closed")
class SessionClosed:
    sessionId: str
    reason: str = ""


NORMAL_END = "ended"  # a session_closed reason starting with this is a normal end (a UDP flow went idle)


def is_normal_end(reason: str) -> bool:
    """A normal end is logged at INFO and is not a proxy's last error."""
    return reason == "" or reason.startswith(NORMAL_END)


@message("error")
class Error:
    message: str
    code: str = "error"
    requestId: str | None = None


# --- encode / decode -------------------------------------------------------------------------

def encode(msg) -> str:
    """Serialise a message to its JSON text frame, leaving out optional fields that are None."""
    return json.dumps({"type": msg.TYPE, "payload": _to_plain(msg)}, separators=(",", ":"))


def _to_plain(value):
    if dataclasses.is_dataclass(value):
        return {
            f.name: _to_plain(getattr(value, f.name))
            for f in dataclasses.fields(value)
            if getattr(value, f.name) is not None
        }
    if isinstance(value, list):
        return [_to_plain(v) for v in value]
    return value


def decode(text: str | bytes):
    """Parse one frame into a message object, or raise ProtocolError naming the problem."""
    if isinstance(text, (bytes, bytearray)):
        _require(len(text) <= MAX_MESSAGE_BYTES, f"message of {len(text)} bytes exceeds {MAX_MESSAGE_BYTES}")
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError("message is not UTF-8 text") from None
    _require(isinstance(text, str), "message must be a text frame")
    _require(len(text) <= MAX_MESSAGE_BYTES, f"message of {len(text)} characters exceeds {MAX_MESSAGE_BYTES}")
    try:
        frame = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(f"message is not valid JSON: {exc}") from None
    _require(isinstance(frame, dict), "message must be a JSON object with 'type' and 'payload'")
    type_name = frame.get("type")
    _require(isinstance(type_name, str), "message has no string 'type'")
    cls = MESSAGE_TYPES.get(type_name)
    _require(cls is not None, f"unknown message type {type_name[:40]!r}")
    payload = frame.get("payload", {})
    if payload is None:
        payload = {}
    return _build(cls, payload, type_name)


_HINTS: dict[type, dict] = {}


def _hints(cls) -> dict:
    """Resolved field types of a message class; resolving is slow (it compiles), so once per class."""
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = typing.get_type_hints(cls)
    return hints


def _build(cls, payload, where: str):
    _require(isinstance(payload, dict), f"{where}: payload must be an object")
    hints = _hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in payload:
            kwargs[f.name] = _convert(payload[f.name], hints[f.name], f"{where}.{f.name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ProtocolError(f"{where}: missing field '{f.name}'")
    obj = cls(**kwargs)
    check = getattr(obj, "check", None)
    if check is not None:
        try:
            check()
        except ProtocolError as exc:
            raise ProtocolError(f"{where}: {exc}") from None
    return obj


def _convert(value, hint, where: str):
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None and len(options) < len(typing.get_args(hint)):
            return None
        return _convert(value, options[0], where)
    if origin is list:
        _require(isinstance(value, list), f"{where} must be a list")
        (item,) = typing.get_args(hint)
        return [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    if hint is bool:
        _require(isinstance(value, bool), f"{where} must be true or false")
    elif hint is int:
        _require(isinstance(value, int) and not isinstance(value, bool), f"{where} must be an integer")
    elif hint is float:
        _require(isinstance(value, (int, float)) and not isinstance(value, bool), f"{where} must be a number")
        try:
            value = float(value)
        except OverflowError:  # an integer literal of hundreds of digits
            raise ProtocolError(f"{where} is too large a number") from None
    elif hint is str:
        _require(isinstance(value, str), f"{where} must be a string")
        value = escape_controls(value)  # peers' text ends up in logs and pages: no forged lines
    return value
