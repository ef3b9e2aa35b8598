"""Just enough HTTP/1.1 for the relay port: read one request head, answer or upgrade it.

The accept loop has already read the first bytes; this module reads the rest of the head
under the connection's deadline and lets h11 parse it (request line, header syntax, the
Host rules, the 16 KiB cap), then either writes a short response or hands the socket to
simple-websocket for the control channel. h11 only parses here: the relay answers one
request per connection and closes, so its connection state machine is not used past the head.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import h11
import simple_websocket
from wsproto.utilities import ProtocolError as WebSocketProtocolError

from common import pages

from .control_socket import ControlSocket

MAX_HEAD_BYTES = 16 * 1024
CONTROL_PATHS = ("/", "/ws")


class BadRequest(Exception):
    def __init__(self, status: int, reason: str):
        self.status = status
        super().__init__(reason)


@dataclass
class Request:
    method: str
    target: str
    version: str
    headers: dict[str, str] = field(default_factory=dict)  # lower-case names; a repeated one: the last

    @property
    def path(self) -> str:
        return urlsplit(self.target).path or "/"

    def header(self, name: str, default: str = "") -> str:
        return self.headers.get(name.lower(), default)

    @property
    def is_websocket_upgrade(self) -> bool:
        return (
            self.method == "GET"
            and "websocket" in self.header("upgrade").lower()
            and "upgrade" in self.header("connection").lower()
        )


def read_request(sock: socket.socket, first: bytes, deadline: float) -> Request:
    """Read a request head that starts with ``first``; raise BadRequest if it is not one.

    At most MAX_HEAD_BYTES + 1 bytes are read before the head must have ended: h11 refuses
    a buffer past its ``max_incomplete_event_size`` (431) and reads no further."""
    parser = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
    data, received = first, len(first)
    while True:
        parser.receive_data(data)
        try:
            event = parser.next_event()
        except h11.RemoteProtocolError as exc:
            raise _refusal(exc) from None
        if isinstance(event, h11.Request):
            return _request_from(event)
        room = MAX_HEAD_BYTES + 1 - received
        if room <= 0:  # h11 has refused such a buffer already; this only keeps the bound in one place
            raise BadRequest(431, f"request head larger than {MAX_HEAD_BYTES} bytes")
        data = _recv_some(sock, min(4096, room), deadline)
        received += len(data)


def _recv_some(sock: socket.socket, size: int, deadline: float) -> bytes:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError("request head not complete before the deadline")
    sock.settimeout(remaining)
    chunk = sock.recv(size)
    if not chunk:
        raise ConnectionError("peer closed before the request head ended")
    return chunk


def _refusal(exc: h11.RemoteProtocolError) -> BadRequest:
    if exc.error_status_hint == 431:
        return BadRequest(431, f"request head larger than {MAX_HEAD_BYTES} bytes")
    # h11 names the rule that was broken; the bytes it quotes after it stay out of the answer
    rule = str(exc).split(": bytearray(", 1)[0]
    return BadRequest(exc.error_status_hint, f"malformed request head: {rule}")


def _request_from(event: h11.Request) -> Request:
    version = event.http_version.decode("ascii")
    if not version.startswith("1."):
        raise BadRequest(505, "only HTTP/1.x is spoken here")
    headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in event.headers}
    return Request(event.method.decode("latin-1"), event.target.decode("latin-1"), "HTTP/" + version, headers)


def send(sock: socket.socket, response: pages.Response, include_body: bool = True) -> None:
    """Write ``response`` (headers from common/pages.py); the caller then closes the connection."""
    sock.sendall(pages.encode(response, include_body))


def send_text(sock: socket.socket, status: int, message: str, headers: dict[str, str] | None = None) -> None:
    send(sock, pages.text(status, message, headers))


def accept_websocket(sock: socket.socket, request: Request, thread_factory, max_message_size: int):
    """Complete the WebSocket handshake; returns a simple_websocket.Server whose ``sock`` is
    the connection's ControlSocket.

    Raises BadRequest for an upgrade request the WebSocket library refuses (no or a wrong
    Sec-WebSocket-Version or -Key, ...)."""
    control_socket = ControlSocket(sock)
    environ: dict[str, object] = {"werkzeug.socket": control_socket}
    for name, value in request.headers.items():
        environ["HTTP_" + name.upper().replace("-", "_")] = value
    try:
        ws = simple_websocket.Server(
            environ,
            receive_bytes=65536,
            ping_interval=None,  # we run our own heartbeat messages
            max_message_size=max_message_size,
            thread_class=thread_factory,
        )
    except (WebSocketProtocolError, simple_websocket.ConnectionError) as exc:
        raise BadRequest(400, f"bad WebSocket handshake: {exc}") from None
    control_socket.watch(ws)
    return ws
