"""Registration messages: the challenge, ``register`` and the relay's two answers to it, no I/O.

A relay answers ``register`` with ``register_response`` (which may offer pooled data
channels, ``PoolOffer``) or, as a cluster node, with ``register_redirect`` to a less loaded
node. Part of the vocabulary ``common.protocol`` gathers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .wire import CLIENT_ID_PATTERN, PROTOCOL_VERSION, Message, RelayAddr, check_public_key, require

# register_response codes: the ID is live with the same credential and takeover was false; the
# ID is online with, or reserved for, another credential
ID_IN_USE = "id_in_use"
ID_TAKEN = "id_taken"
# register_redirect.url: a relay URL with a host (a name, IPv4, or [IPv6]), an optional port and path
MAX_REDIRECT_URL = 255
# what a peer of this version can do, beyond its protocolVersion: a client lists them in register
# (FEATURE_WARM: it holds a warm session until its "go" frame, chuantou_client/warmtarget.py), a relay
# in register_response (FEATURE_WARM: it passes connect_request.warm on only to a target that listed
# it). An older peer sends none: every feature is then off.
FEATURE_WARM = "warm"
FEATURE_PATTERN = re.compile(r"^[a-z][a-z0-9-]{0,31}$")
MAX_FEATURES = 16
REDIRECT_URL_PATTERN = re.compile(r"^wss?://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(:[0-9]{1,5})?(/[A-Za-z0-9._~/-]*)?$")


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
        require(0 <= self.size <= 64, f"pool.size {self.size} is outside 0-64")
        require(self.idleTimeout > 0, "pool.idleTimeout must be > 0")
        require(re.fullmatch(r"[0-9a-f]{32}", self.id) is not None and
                 re.fullmatch(r"[0-9a-f]{32}", self.secret) is not None, "pool id and secret must be 32 hex digits")


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
    features: list[str] | None = None  # FEATURE_* this client supports (an older one sends none)

    def check(self) -> None:
        require(
            bool(CLIENT_ID_PATTERN.match(self.clientId)),
            "clientId must be 1-64 characters of letters, digits, '.', '_' or '-', "
            "starting with a letter or digit",
        )
        check_public_key(self.publicKey, "publicKey")
        check_features(self.features)


def check_features(features: list[str] | None) -> None:
    if features is not None:
        require(len(features) <= MAX_FEATURES, f"features lists at most {MAX_FEATURES} names")
        require(all(FEATURE_PATTERN.match(name) for name in features),
                "features must be short lower-case names (letters, digits, '-')")


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
    features: list[str] | None = None  # FEATURE_* this relay supports (an older one sends none)

    def check(self) -> None:
        check_features(self.features)


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
        require(len(self.url) <= MAX_REDIRECT_URL and REDIRECT_URL_PATTERN.match(self.url) is not None,
                 "url must look like ws://HOST:PORT or wss://HOST:PORT (at most 255 characters)")
        require(self.node is None or CLIENT_ID_PATTERN.match(self.node) is not None,
                 "node must be a node name of 1-64 letters, digits, '.', '_' or '-'")
        require(self.reason is None or len(self.reason) <= 200, "reason must be at most 200 characters")
