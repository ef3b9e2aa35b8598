"""Control-channel messages: plain data, encode/decode and validation, no I/O.

Every message travels as one JSON text frame ``{"type": ..., "payload": {...}}`` with the
design's type names and camelCase field names. Each type is a frozen dataclass subclass of
``Message``, registered by its wire name and sender; ``decode`` turns untrusted text into one
of them or raises a single ``ProtocolError`` that the receiver answers with an ``error``
message.
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from dataclasses import dataclass
from typing import ClassVar

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
# register_redirect.url: a relay URL with a host (a name, IPv4, or [IPv6]), an optional port and path
MAX_REDIRECT_URL = 255
REDIRECT_URL_PATTERN = re.compile(r"^wss?://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(:[0-9]{1,5})?(/[A-Za-z0-9._~/-]*)?$")


class ProtocolError(ValueError):
    """A frame that is not a valid message; the text says what is wrong."""


class Message:
    """Base of every control message: a frozen dataclass whose wire name is ``TYPE``.

    Subclasses name themselves with ``class Register(Message, wire="register")``; ``sent_by``
    says which side sends it ("client", "relay" or "both"), so that one wire name may mean
    two shapes: ``connect_request`` from A is a ``ConnectRequest``, from the relay to B a
    ``ConnectOffer`` with the session fields filled in."""

    TYPE: ClassVar[str]
    SENT_BY: ClassVar[str]

    def __init_subclass__(cls, wire: str = "", sent_by: str = "both", **kwargs):
        super().__init_subclass__(**kwargs)
        if not wire:
            raise TypeError(f"message class {cls.__name__} needs a wire name")
        cls.TYPE, cls.SENT_BY = wire, sent_by
        for sender in (("client", "relay") if sent_by == "both" else (sent_by,)):
            registry = _BY_SENDER[sender]
            if wire in registry:
                raise TypeError(f"two messages named {wire!r} sent by the {sender}")
            registry[wire] = cls


_BY_SENDER: dict[str, dict[str, type[Message]]] = {"client": {}, "relay": {}}
CLIENT_MESSAGES = _BY_SENDER["client"]  # what the relay may receive
RELAY_MESSAGES = _BY_SENDER["relay"]  # what a client may receive


def message_types() -> dict[str, list[type[Message]]]:
    """Every wire name with the classes it may decode to."""
    names: dict[str, list[type[Message]]] = {}
    for registry in _BY_SENDER.values():
        for wire, cls in registry.items():
            if cls not in names.setdefault(wire, []):
                names[wire].append(cls)
    return names


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


@dataclass(frozen=True)
class PoolOffer:
    """Pooled data channels (common.frames, POOL_MAGIC): a client may keep up to ``size`` open
    to ``relayAddr``, each presenting ``id`` and ``secret``; the relay closes one left unbound
    for ``idleTimeout`` seconds. Valid for this registration only."""
    id: str
    secret: str
    size: int
    idleTimeout: float
    relayAddr: RelayAddr

    def check(self) -> None:
        _require(0 <= self.size <= 64, f"pool.size {self.size} is outside 0-64")
        _require(self.idleTimeout > 0, "pool.idleTimeout must be > 0")
        _require(re.fullmatch(r"[0-9a-f]{32}", self.id) is not None and
                 re.fullmatch(r"[0-9a-f]{32}", self.secret) is not None, "pool id and secret must be 32 hex digits")


# --- messages --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Challenge(Message, wire="challenge", sent_by="relay"):
    """First message of the relay on a new control channel: prove the token over ``nonce``."""

    nonce: str
    authRequired: bool = False
    protocolVersion: int = PROTOCOL_VERSION


@dataclass(frozen=True)
class Register(Message, wire="register", sent_by="client"):
    clientId: str
    protocolVersion: int
    auth: str | None = None  # common.auth.register_proof(token, nonce, clientId)
    # False: do not replace a live connection holding this ID (a client that was itself replaced
    # asks this, so two holders of one token do not take turns kicking each other); unset: replace
    takeover: bool | None = None
    publicKey: str | None = None  # this client's key for sealed sessions (see PUBLIC_KEY_PATTERN)
    # True: this client follows a register_redirect (a cluster node may send one); unset: it does
    # not, now (an older client, or one that just refused or looped through redirects)
    followsRedirect: bool | None = None

    def check(self) -> None:
        _require(
            bool(CLIENT_ID_PATTERN.match(self.clientId)),
            "clientId must be 1-64 characters of letters, digits, '.', '_' or '-', "
            "starting with a letter or digit",
        )
        _check_public_key(self.publicKey, "publicKey")


@dataclass(frozen=True)
class RegisterResponse(Message, wire="register_response", sent_by="relay"):
    success: bool
    assignedId: str | None = None
    existingKicked: bool = False
    error: str | None = None
    protocolVersion: int = PROTOCOL_VERSION
    code: str | None = None  # why a registration failed: ID_IN_USE, ID_TAKEN, or None for any other reason
    udpPort: int | None = None  # where NAT probes go (common.direct): the relay's UDP port
    probePort: int | None = None  # a second UDP port that answers probes (--probe-port), if any
    pool: PoolOffer | None = None  # pooled data channels (an older relay offers none)


@dataclass(frozen=True)
class RegisterRedirect(Message, wire="register_redirect", sent_by="relay"):
    """A cluster node's answer to ``register`` (instead of ``register_response``) from a client
    that follows redirects: register at ``url``, a less loaded node of the same cluster. Nothing
    was registered here; the relay closes the connection after it. The client decides whether
    to follow (chuantou_client/relays.py): it never drops its ID or proxies for it."""

    url: str
    node: str | None = None
    reason: str | None = None

    def check(self) -> None:
        _require(len(self.url) <= MAX_REDIRECT_URL and REDIRECT_URL_PATTERN.match(self.url) is not None,
                 "url must look like ws://HOST:PORT or wss://HOST:PORT (at most 255 characters)")
        _require(self.node is None or CLIENT_ID_PATTERN.match(self.node) is not None,
                 "node must be a node name of 1-64 letters, digits, '.', '_' or '-'")
        _require(self.reason is None or len(self.reason) <= 200, "reason must be at most 200 characters")


@dataclass(frozen=True)
class GetClientList(Message, wire="get_client_list", sent_by="client"):
    requestId: str | None = None


@dataclass(frozen=True)
class ClientList(Message, wire="client_list", sent_by="relay"):
    clients: list[ClientInfo]
    requestId: str | None = None


@dataclass(frozen=True)
class ConnectRequest(Message, wire="connect_request", sent_by="client"):
    """A asks the relay for a session to ``remotePort`` on client ``toClientId``."""

    toClientId: str
    remotePort: int
    remoteHost: str | None = None  # a host on B's network; B decides whether to allow it
    requestId: str | None = None
    protocol: str = "tcp"
    localPort: int | None = None

    def check(self) -> None:
        _check_target(self.remotePort, self.protocol, self.remoteHost)
        if self.localPort is not None:
            _require(valid_port(self.localPort), f"localPort {self.localPort} is outside 1-65535")


@dataclass(frozen=True)
class ConnectOffer(Message, wire="connect_request", sent_by="relay"):
    """The relay offers B a session that ``fromClientId`` asked for: B connects to its service
    and joins at ``relayAddr`` with ``secret`` (B's own, not A's)."""

    fromClientId: str
    sessionId: str
    secret: str
    relayAddr: RelayAddr
    remotePort: int
    remoteHost: str | None = None
    protocol: str = "tcp"
    toClientId: str | None = None  # B's own ID, as A named it
    localPort: int | None = None  # the port of A's proxy, for B's page
    requestId: str | None = None
    peerPublicKey: str | None = None  # the requester's key as it registered it (a hint for B)

    def check(self) -> None:
        _check_target(self.remotePort, self.protocol, self.remoteHost)
        _check_public_key(self.peerPublicKey, "peerPublicKey")


def _check_target(port: int, protocol: str, host: str | None) -> None:
    _require(valid_port(port), f"remotePort {port} is outside 1-65535")
    _require(protocol in PROTOCOLS, f"protocol must be one of {PROTOCOLS}")
    if host is not None:
        _require(bool(HOST_PATTERN.match(host)), "remoteHost must be a host name or IP address")


@dataclass(frozen=True)
class CreateSession(Message, wire="create_session", sent_by="relay"):
    sessionId: str
    peerClientId: str
    secret: str
    service: Service
    relayAddr: RelayAddr
    requestId: str | None = None
    peerPublicKey: str | None = None  # the target's key as it registered it (a hint for A)

    def check(self) -> None:
        _check_public_key(self.peerPublicKey, "peerPublicKey")


@dataclass(frozen=True)
class AcceptSession(Message, wire="accept_session", sent_by="client"):
    sessionId: str


@dataclass(frozen=True)
class RejectSession(Message, wire="reject_session", sent_by="client"):
    sessionId: str
    reason: str | None = None


SESSION_KEYS_B64 = re.compile(r"^[A-Za-z0-9+/]{4,200}={0,2}$")


@dataclass(frozen=True)
class SessionKeys(Message, wire="session_keys"):
    """One side's half of a sealed UDP session's key exchange (chuantou_client.udpseal): an
    ephemeral X25519 key signed with the long-term key ``publicKey``. The relay checks only
    that the sender is in the session and passes it, unchanged, to the other side."""

    sessionId: str
    ephemeral: str  # base64 of the 32-byte X25519 public key
    publicKey: str  # base64 SPKI of the signer (checked against the pin, never trusted as given)
    signature: str  # base64 Ed25519 signature over the transcript (udpseal.transcript)

    def check(self) -> None:
        _require(len(self.sessionId) <= 64, "sessionId is too long")
        _require(bool(SESSION_KEYS_B64.match(self.ephemeral)), "ephemeral must be base64")
        _require(bool(SESSION_KEYS_B64.match(self.signature)), "signature must be base64")
        _check_public_key(self.publicKey, "publicKey")


@dataclass(frozen=True)
class Heartbeat(Message, wire="heartbeat"):
    timestamp: float


@dataclass(frozen=True)
class Unregister(Message, wire="unregister", sent_by="client"):
    pass


@dataclass(frozen=True)
class SessionClosed(Message, wire="session_closed"):
    sessionId: str
    reason: str = ""


@dataclass(frozen=True)
class PathCandidates(Message, wire="path_candidates", sent_by="client"):
    """A side of a UDP or TCP session offers where it may be reached directly (common.direct); the
    relay adds the address it saw, and once both sides have spoken sends each ``PeerCandidates``."""

    sessionId: str
    candidates: list[str]
    path: str = "auto"  # "relay": this side will not try (the relay tells the other at once)

    def check(self) -> None:
        _check_candidates(self.candidates)
        _require(self.path in ("auto", "relay", "direct"), "path must be auto, relay or direct")


@dataclass(frozen=True)
class PeerCandidates(Message, wire="peer_candidates", sent_by="relay"):
    """The other side's candidates and the key both sign punch packets with; no candidates:
    use the relay."""

    sessionId: str
    candidates: list[str]
    punchKey: str | None = None  # hex, 16 bytes

    def check(self) -> None:
        _check_candidates(self.candidates)
        if self.punchKey is not None:
            _require(bool(re.fullmatch(r"[0-9a-f]{32}", self.punchKey)), "punchKey must be 32 hex digits")


MAX_REPORTED_BYTES = 2 ** 53 - 1  # the largest count a JSON number carries exactly (to a browser too)


@dataclass(frozen=True)
class PathReport(Message, wire="path_report", sent_by="client"):
    """A side's claim about a session of its own: the path it takes and the bytes it has sent and
    received on the direct path so far (cumulative; sent while the session runs and at its end).
    The relay cannot check it: it keeps it bounded, per side, shown as reported by clients."""

    sessionId: str
    path: str  # "direct" or "relay"
    directBytesSent: int = 0
    directBytesReceived: int = 0

    def check(self) -> None:
        _require(len(self.sessionId) <= 64, "sessionId is too long")
        _require(self.path in ("direct", "relay"), "path must be direct or relay")
        for name in ("directBytesSent", "directBytesReceived"):
            _require(0 <= getattr(self, name) <= MAX_REPORTED_BYTES, f"{name} must be 0 to 2**53-1")


@dataclass(frozen=True)
class PathSync(Message, wire="path_sync"):
    """A TCP session's direct attempt, timed as libp2p's DCUtR does (chuantou_client.directtcp):
    A sends ``ping``, B answers ``pong`` (A now knows the round trip through the relay), A sends
    ``sync`` and dials after half that round trip, B dials as ``sync`` arrives. The relay passes
    it, unchanged, to the session's other side only."""

    sessionId: str
    step: str  # "ping", "pong" or "sync"

    def check(self) -> None:
        _require(len(self.sessionId) <= 64, "sessionId is too long")
        _require(self.step in PATH_SYNC_STEPS, f"step must be one of {', '.join(PATH_SYNC_STEPS)}")


PATH_SYNC_STEPS = ("ping", "pong", "sync")


MAX_CANDIDATES = 8
CANDIDATE_PATTERN = re.compile(r"^(\[[0-9A-Fa-f:.]{2,45}\]|[0-9.]{7,15}):[0-9]{1,5}$")


def _check_candidates(candidates: list[str]) -> None:
    _require(len(candidates) <= MAX_CANDIDATES, f"at most {MAX_CANDIDATES} candidates")
    for candidate in candidates:
        _require(bool(CANDIDATE_PATTERN.match(candidate)), "a candidate must be ip:port or [ipv6]:port")


NORMAL_END = "ended"  # a session_closed reason starting with this is a normal end (a UDP flow went idle)


def is_normal_end(reason: str) -> bool:
    """A normal end is logged at INFO and is not a proxy's last error."""
    return reason == "" or reason.startswith(NORMAL_END)


@dataclass(frozen=True)
class Error(Message, wire="error"):
    message: str
    code: str = "error"
    requestId: str | None = None


# --- encode / decode -------------------------------------------------------------------------

def encode(msg: Message) -> str:
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


def decode(text: str | bytes, sender: str | None = None) -> Message:
    """Parse one frame into a message object, or raise ProtocolError naming the problem.

    ``sender`` ("client" or "relay") is who sent the frame, which picks the shape of a wire
    name both use (``connect_request``) and refuses what that side never sends; without it a
    name the client sends wins."""
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
    cls = _message_class(type_name, sender)
    payload = frame.get("payload", {})
    if payload is None:
        payload = {}
    return _build(cls, payload, type_name)


def _message_class(type_name: str, sender: str | None) -> type[Message]:
    if sender is not None:
        cls = _BY_SENDER[sender].get(type_name)
        if cls is None and any(type_name in r for r in _BY_SENDER.values()):
            raise ProtocolError(f"'{type_name}' is not a message a {sender} sends")
    else:
        cls = CLIENT_MESSAGES.get(type_name) or RELAY_MESSAGES.get(type_name)
    if cls is None:
        raise ProtocolError(f"unknown message type {type_name[:40]!r}")
    return cls


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
