"""Text a peer sent, made safe to log: control characters are escaped, so a ``reason`` with a
newline cannot forge a log line, and an escape sequence cannot rewrite an operator's terminal.

``escape_controls`` is applied to every string the control protocol decodes; the
``EscapeControlChars`` filter guards the CLI's log handlers against anything else (an HTTP
path, a header) that reaches a log message.
"""

from __future__ import annotations

import logging
import re

# C0 and C1 controls, DEL, line/paragraph separators, and the bidirectional overrides that can
# make a line read differently from what it holds
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def _escape(match: re.Match) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_controls(text: str) -> str:
    """``text`` with each control character written as ``\\xNN`` (or ``\\uNNNN``)."""
    return _UNSAFE.sub(_escape, text) if _UNSAFE.search(text) else text


class EscapeControlChars(logging.Filter):
    """A handler filter: the formatted message of each record with its control characters
    escaped (a traceback, kept apart in ``exc_info``, keeps its lines)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if _UNSAFE.search(message):
            record.msg, record.args = escape_controls(message), None
        return True


def guard_handlers(logger: logging.Logger | None = None) -> None:
    """Add the filter to every handler of ``logger`` (default: the root logger)."""
    for handler in (logger or logging.getLogger()).handlers:
        if not any(isinstance(f, EscapeControlChars) for f in handler.filters):
            handler.addFilter(EscapeControlChars())
