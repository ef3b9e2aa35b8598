"""The base of the control-channel vocabulary: plain data shared by every message module, no I/O.

``Message`` is the frozen-dataclass base each message type subclasses with its wire name and
sender, which registers it for ``common.codec.decode``; the checks and value types here are the
ones several message modules use. Callers import ``common.protocol``, which gathers them all.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

PROTOCOL_VERSION = 2  # 2: UDP registrations prove the secret over a relay challenge (common.frames)
MAX_MESSAGE_BYTES = 64 * 1024
CLIENT_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
HOST_PATTERN = re.compile(r"^[A-Za-z0-9.:_-]{1,253}$")
# a client's public key: base64 of its SubjectPublicKeyInfo DER (sealed sessions; a hint only,
# since a client trusts the key its peer proves against its own pin, never what the relay says)
PUBLIC_KEY_PATTERN = re.compile(r"^[A-Za-z0-9+/]{4,2048}={0,2}$")
PROTOCOLS = ("tcp", "udp")


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
            registry = BY_SENDER[sender]
            if wire in registry:
                raise TypeError(f"two messages named {wire!r} sent by the {sender}")
            registry[wire] = cls


BY_SENDER: dict[str, dict[str, type[Message]]] = {"client": {}, "relay": {}}
CLIENT_MESSAGES = BY_SENDER["client"]  # what the relay may receive
RELAY_MESSAGES = BY_SENDER["relay"]  # what a client may receive


def message_types() -> dict[str, list[type[Message]]]:
    """Every wire name with the classes it may decode to."""
    names: dict[str, list[type[Message]]] = {}
    for registry in BY_SENDER.values():
        for wire, cls in registry.items():
            if cls not in names.setdefault(wire, []):
                names[wire].append(cls)
    return names


def valid_port(value: int) -> bool:
    return 1 <= value <= 65535


def require(condition: bool, problem: str) -> None:
    if not condition:
        raise ProtocolError(problem)


def check_public_key(value: str | None, name: str) -> None:
    if value is not None:
        require(bool(PUBLIC_KEY_PATTERN.match(value)), f"{name} must be base64 of at most 1.5 KiB")


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
        require(valid_port(self.port), f"relayAddr.port {self.port} is outside 1-65535")
        require(self.protocol in PROTOCOLS, f"relayAddr.protocol must be one of {PROTOCOLS}")


@dataclass(frozen=True)
class Service:
    port: int
    protocol: str

    def check(self) -> None:
        require(valid_port(self.port), f"service.port {self.port} is outside 1-65535")
        require(self.protocol in PROTOCOLS, f"service.protocol must be one of {PROTOCOLS}")
