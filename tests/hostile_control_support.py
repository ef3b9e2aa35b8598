"""A raw, deliberately rude WebSocket client for the hostile-control tests: it completes the
upgrade by hand, never reads what the relay answers (a small receive buffer), and pushes
frames for a bounded time or byte count.

Sockets are closed by the ``rude_peers`` fixture; nothing here starts a thread.
"""

from __future__ import annotations

import base64
import os
import re
import socket
import struct
import time

import pytest

HOST = "127.0.0.1"


def masked_text_frame(payload: bytes) -> bytes:
    """A client-to-server text frame with a zero mask key (so the payload goes as it is)."""
    size = len(payload)
    if size < 126:
        head = struct.pack("!BB", 0x81, 0x80 | size)
    elif size < 1 << 16:
        head = struct.pack("!BBH", 0x81, 0x80 | 126, size)
    else:
        head = struct.pack("!BBQ", 0x81, 0x80 | 127, size)
    return head + b"\0\0\0\0" + payload


def upgrade_request(port: int) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (f"GET /ws HTTP/1.1\r\nHost: {HOST}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode()


def read_response_head(sock: socket.socket, timeout: float = 10.0) -> tuple[int, bytes]:
    """(HTTP status, everything read so far) of the relay's answer to an upgrade."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    match = re.match(rb"HTTP/1\.1 (\d{3})", data)
    assert match, f"no HTTP response: {data[:80]!r}"
    return int(match.group(1)), data


def open_rude_socket(port: int, source: str = HOST, rcvbuf: int = 4096) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connect: the window stays small
    sock.bind((source, 0))
    sock.settimeout(10)
    sock.connect((HOST, port))
    return sock


def push_for(sock: socket.socket, frame: bytes, seconds: float, max_bytes: int) -> int:
    """Send ``frame`` over and over for at most ``seconds`` or ``max_bytes``; bytes the relay took.

    A relay that stops reading makes our sends time out: that is the point, and it ends the push."""
    batch = frame * max(1, (256 * 1024) // len(frame))
    deadline = time.monotonic() + seconds
    sent = 0
    sock.settimeout(0.2)
    while sent < max_bytes and time.monotonic() < deadline:
        try:
            sent += sock.send(batch)
        except socket.timeout:
            continue
        except OSError:  # the relay closed us
            break
    return sent


@pytest.fixture
def rude_peers():
    opened: list[socket.socket] = []

    def open_peer(port: int, source: str = HOST, rcvbuf: int = 4096) -> socket.socket:
        sock = open_rude_socket(port, source, rcvbuf)
        opened.append(sock)
        return sock

    yield open_peer
    for sock in opened:
        try:
            sock.close()
        except OSError:
            pass


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")
