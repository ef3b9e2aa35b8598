"""Control-channel messages: plain data, encode/decode and validation, no I/O.

Every message travels as one JSON text frame ``{"type": ..., "payload": {...}}`` with the
design's type names and camelCase field names. Each type is a frozen dataclass subclass of
``Message``, registered by its wire name and sender; ``decode`` turns untrusted text into one
of them or raises a single ``ProtocolError`` that the receiver answers with an ``error``
message.

This module is the one to import (``from common import protocol as p``): it holds the session
messages and gathers the rest of the vocabulary by topic: the base and shared values
(common.wire), the codec (common.codec), registration, redirect and pool offers
(common.register_messages) and the direct path (common.path_messages).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .codec import decode, encode
from .path_messages import (
    CANDIDATE_PATTERN, MAX_CANDIDATES, MAX_REPORTED_BYTES, PATH_SYNC_STEPS, PathCandidates, PathReport, PathSync,
    PeerCandidates,
)
from .register_messages import (
    FEATURE_WARM, ID_IN_USE, ID_TAKEN, MAX_REDIRECT_URL, REDIRECT_URL_PATTERN, Challenge, PoolOffer, Register,
    RegisterRedirect, RegisterResponse,
)
from .wire import (
    CLIENT_ID_PATTERN, CLIENT_MESSAGES, HOST_PATTERN, MAX_MESSAGE_BYTES, PROTOCOL_VERSION, PROTOCOLS,
    PUBLIC_KEY_PATTERN, RELAY_MESSAGES, ClientInfo, Message, ProtocolError, RelayAddr, Service, check_public_key,
    message_types, require, valid_port,
)

__all__ = [
    # common.wire
    "CLIENT_ID_PATTERN", "CLIENT_MESSAGES", "HOST_PATTERN", "MAX_MESSAGE_BYTES", "PROTOCOL_VERSION", "PROTOCOLS",
    "PUBLIC_KEY_PATTERN", "RELAY_MESSAGES", "ClientInfo", "Message", "ProtocolError", "RelayAddr", "Service",
    "message_types", "valid_port",
    # common.codec
    "decode", "encode",
    # common.register_messages
    "FEATURE_WARM", "ID_IN_USE", "ID_TAKEN", "MAX_REDIRECT_URL", "REDIRECT_URL_PATTERN", "Challenge", "PoolOffer",
    "Register", "RegisterRedirect", "RegisterResponse",
    # common.path_messages
    "CANDIDATE_PATTERN", "MAX_CANDIDATES", "MAX_REPORTED_BYTES", "PATH_SYNC_STEPS", "PathCandidates", "PathReport",
    "PathSync", "PeerCandidates",
    # session messages, below
    "GetClientList", "ClientList", "ConnectRequest", "ConnectOffer", "CreateSession", "AcceptSession",
    "RejectSession", "SESSION_KEYS_B64", "SessionKeys", "Heartbeat", "Unregister", "SessionClosed", "WARM_UNSUPPORTED",
    "NORMAL_END",
    "is_normal_end", "Error",
]


# --- session messages ------------------------------------------------------------------------

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
    # a warm session (chuantou_client/warm.py): B joins and seals it but connects to its service
    # only on A's "go" frame. The relay passes it on only to a target whose register listed
    # FEATURE_WARM (an older B would ignore it and connect at once), else refuses: WARM_UNSUPPORTED
    warm: bool | None = None

    def check(self) -> None:
        _check_target(self.remotePort, self.protocol, self.remoteHost)
        if self.localPort is not None:
            require(valid_port(self.localPort), f"localPort {self.localPort} is outside 1-65535")
        require(not self.warm or self.protocol == "tcp", "only a TCP session may be warm")


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
    warm: bool | None = None  # hold the sealed session until A's "go" frame (see ConnectRequest)

    def check(self) -> None:
        _check_target(self.remotePort, self.protocol, self.remoteHost)
        check_public_key(self.peerPublicKey, "peerPublicKey")
        require(not self.warm or self.protocol == "tcp", "only a TCP session may be warm")


def _check_target(port: int, protocol: str, host: str | None) -> None:
    require(valid_port(port), f"remotePort {port} is outside 1-65535")
    require(protocol in PROTOCOLS, f"protocol must be one of {PROTOCOLS}")
    if host is not None:
        require(bool(HOST_PATTERN.match(host)), "remoteHost must be a host name or IP address")


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
        check_public_key(self.peerPublicKey, "peerPublicKey")


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
        require(len(self.sessionId) <= 64, "sessionId is too long")
        require(bool(SESSION_KEYS_B64.match(self.ephemeral)), "ephemeral must be base64")
        require(bool(SESSION_KEYS_B64.match(self.signature)), "signature must be base64")
        check_public_key(self.publicKey, "publicKey")


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


WARM_UNSUPPORTED = "warm_unsupported"  # error code: the target (or this relay's path to it) cannot hold warm sessions

NORMAL_END = "ended"  # a session_closed reason starting with this is a normal end (a UDP flow went idle)


def is_normal_end(reason: str) -> bool:
    """A normal end is logged at INFO and is not a proxy's last error."""
    return reason == "" or reason.startswith(NORMAL_END)


@dataclass(frozen=True)
class Error(Message, wire="error"):
    message: str
    code: str = "error"
    requestId: str | None = None
