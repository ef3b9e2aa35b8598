"""Shared by the relay server and the client: protocol data, framing and small socket helpers."""

__version__ = "0.1.0"
