"""JSON text frames to and from ``Message`` objects: encode, decode and field validation, no I/O.

Every message travels as one JSON text frame ``{"type": ..., "payload": {...}}``. ``decode``
turns untrusted text into the registered class of its type (``common.wire.Message``), checking
each field against the class's annotations and its ``check()``, or raises one ``ProtocolError``.
It knows the classes that have been defined: import it through ``common.protocol``, which
defines them all.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing

from .logsafe import escape_controls
from .wire import BY_SENDER, CLIENT_MESSAGES, MAX_MESSAGE_BYTES, RELAY_MESSAGES, Message, ProtocolError, require


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
        require(len(text) <= MAX_MESSAGE_BYTES, f"message of {len(text)} bytes exceeds {MAX_MESSAGE_BYTES}")
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError("message is not UTF-8 text") from None
    require(isinstance(text, str), "message must be a text frame")
    require(len(text) <= MAX_MESSAGE_BYTES, f"message of {len(text)} characters exceeds {MAX_MESSAGE_BYTES}")
    try:
        frame = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(f"message is not valid JSON: {exc}") from None
    require(isinstance(frame, dict), "message must be a JSON object with 'type' and 'payload'")
    type_name = frame.get("type")
    require(isinstance(type_name, str), "message has no string 'type'")
    cls = _message_class(type_name, sender)
    payload = frame.get("payload", {})
    if payload is None:
        payload = {}
    return _build(cls, payload, type_name)


def _message_class(type_name: str, sender: str | None) -> type[Message]:
    if sender is not None:
        cls = BY_SENDER[sender].get(type_name)
        if cls is None and any(type_name in r for r in BY_SENDER.values()):
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
    require(isinstance(payload, dict), f"{where}: payload must be an object")
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
        require(isinstance(value, list), f"{where} must be a list")
        (item,) = typing.get_args(hint)
        return [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    if hint is bool:
        require(isinstance(value, bool), f"{where} must be true or false")
    elif hint is int:
        require(isinstance(value, int) and not isinstance(value, bool), f"{where} must be an integer")
    elif hint is float:
        require(isinstance(value, (int, float)) and not isinstance(value, bool), f"{where} must be a number")
        try:
            value = float(value)
        except OverflowError:  # an integer literal of hundreds of digits
            raise ProtocolError(f"{where} is too large a number") from None
    elif hint is str:
        require(isinstance(value, str), f"{where} must be a string")
        value = escape_controls(value)  # peers' text ends up in logs and pages: no forged lines
    return value
