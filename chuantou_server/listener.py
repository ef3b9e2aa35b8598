"""The relay's TCP listener: the accept loop, the handshake gate, and the first-byte dispatch.

The accept loop only accepts: each connection takes a slot in the ``HandshakeGate`` and gets
its own thread, which reads the first bytes under the handshake deadline (a TLS handshake
first, if the relay has a certificate) and hands the connection on: the data-channel magic
``0xFD 0x01`` to ``relay.serve_data_channel``, a pooled channel's ``0xFD 0x06`` to
``pool.serve_pool_channel``, an HTTP head to ``Server.serve_http`` (the
admin page, or a WebSocket control channel); anything else is closed.

Only the handshake's failures (timeouts, resets, garbage) are the peer's doing and end at
DEBUG. Once a handler has the connection, it deals with its own I/O errors; anything else
that escapes one is a bug and is logged as such.
"""

from __future__ import annotations

import logging
import socket
import time
from typing import TYPE_CHECKING, Callable, cast

from common import pages, tls
from common.frames import DATA_MAGIC, HEADER_SIZE, POOL_MAGIC
from common.net import close_quietly, recv_exact, tune_tcp

from . import httpd
from .busy import SpareDescriptor
from .pool import serve_pool_channel
from .relay import serve_data_channel

if TYPE_CHECKING:
    from .server import Server

log = logging.getLogger("chuantou.server")

HTTP_FIRST_BYTES = b"GPHDOCT"  # GET POST PUT PATCH HEAD DELETE OPTIONS CONNECT TRACE

Handler = Callable[[], None]


class Listener:
    def __init__(self, server: Server, sock: socket.socket):
        self.server = server
        self.sock = sock
        self.gate = server.handshakes
        self.spare_descriptor = SpareDescriptor()  # to refuse at once at the descriptor limit

    def close(self) -> None:
        """Stop accepting and wake the threads still reading a first request (at stop)."""
        close_quietly(self.sock)
        self.gate.abort_all()

    def release(self) -> None:
        """Give back the spare descriptor, once the accept loop has ended."""
        self.spare_descriptor.close()

    def run(self) -> None:
        """The accept loop, until the relay stops."""
        stopping = self.server.stopping
        while not stopping.is_set():
            try:
                sock, addr = self.sock.accept()
            except OSError as exc:
                if stopping.is_set():
                    return
                if not self.spare_descriptor.refuse_one(self.sock, exc):
                    self.spare_descriptor.limit_log.bit("accept", "accept", "accept failed: %s", exc)
                    stopping.wait(0.1)
                continue
            self._start_connection(sock, addr)

    def _start_connection(self, sock: socket.socket, addr: tuple) -> None:
        if not self.gate.enter(addr[0], sock):
            log.debug("connection from %s:%s closed: too many pending handshakes", addr[0], addr[1])
            close_quietly(sock)
            return
        tune_tcp(sock)
        try:
            self.server.threads.spawn(f"conn-{addr[0]}:{addr[1]}", self._dispatch, sock, addr)
        except RuntimeError:
            self.gate.leave(addr[0], sock)
            log.warning("cannot start a thread for %s:%s; connection closed", addr[0], addr[1])
            close_quietly(sock)

    def _dispatch(self, sock: socket.socket, addr: tuple) -> None:
        """Read the first bytes under the handshake deadline and hand the connection on."""
        stream, handler = self._handshake(sock, addr)
        if handler is None:
            return
        try:
            handler()
        except Exception:
            log.exception("connection from %s:%s failed in its handler", addr[0], addr[1])
            close_quietly(stream)

    def _handshake(self, sock: socket.socket, addr: tuple) -> tuple[socket.socket, Handler | None]:
        """Returns the connection (TLS-wrapped if it spoke TLS) and what serves it, or (it, None)
        once the connection has been closed. The gate slot is given back either way."""
        deadline = time.monotonic() + self.server.config.handshake_timeout
        stream: socket.socket | None = sock
        try:
            stream = self._tls_layer(sock, addr, deadline)
            if stream is None:
                return sock, None
            return stream, self._first_bytes(stream, addr, deadline)
        except (OSError, ValueError) as exc:  # timeouts, resets, EOF, garbage: only this connection ends
            log.debug("connection from %s:%s dropped: %s", addr[0], addr[1], exc)
            self.gate.note_failed(addr[0])
            close_quietly(stream)
            return sock, None
        finally:
            self.gate.leave(addr[0], sock)

    def _tls_layer(self, sock: socket.socket, addr: tuple, deadline: float) -> socket.socket | None:
        """The stream to read: ``sock``, or TLS over it; None if it was refused (and closed)."""
        context = self.server.tls_context
        if context is None:
            return sock
        if tls.peek_first_byte(sock, deadline) == tls.TLS_RECORD_START:
            # TlsStream has the socket methods the relay uses; the handlers take it as a socket
            return cast(socket.socket, tls.TlsStream.handshake(sock, context, True, deadline))
        if self.server.config.tls_only:
            log.debug("plain connection from %s:%s refused (TLS only)", addr[0], addr[1])
            refuse_plain_connection(sock, deadline)
            return None
        return sock

    def _first_bytes(self, sock: socket.socket, addr: tuple, deadline: float) -> Handler | None:
        first = recv_exact(sock, 2, deadline)
        if first == DATA_MAGIC:
            header = first + recv_exact(sock, HEADER_SIZE - 2, deadline)
            return lambda: serve_data_channel(self.server, sock, header)
        if first == POOL_MAGIC:
            header = first + recv_exact(sock, HEADER_SIZE - 2, deadline)
            return lambda: serve_pool_channel(self.server, sock, header)
        if first[0] in HTTP_FIRST_BYTES:
            request = self._read_http(sock, first, deadline)
            if request is None:
                return None
            return lambda: self.server.serve_http(sock, addr, request)
        log.debug("connection from %s:%s closed: unknown first bytes %r", addr[0], addr[1], first)
        close_quietly(sock)
        return None

    def _read_http(self, sock: socket.socket, first: bytes, deadline: float) -> httpd.Request | None:
        try:
            return httpd.read_request(sock, first, deadline)
        except httpd.BadRequest as exc:
            httpd.send_text(sock, exc.status, f"{exc}\n")
            close_quietly(sock)
            return None


TLS_ONLY_REPLY = pages.encode(pages.text(
    426, "this relay accepts only TLS: clients use --server wss://..., browsers use https://...\n",
    {"Upgrade": "TLS/1.3, TLS/1.2"}))


def refuse_plain_connection(sock: socket.socket, deadline: float) -> None:
    """On a --tls-only relay: tell a plain HTTP peer (a ws:// client, a browser) to use TLS, with
    a 426 that websocket-client and browsers show; anything else is just closed."""
    try:
        sock.settimeout(max(0.01, min(1.0, deadline - time.monotonic())))
        first = sock.recv(1, socket.MSG_PEEK)
        if first and first in HTTP_FIRST_BYTES:
            sock.sendall(TLS_ONLY_REPLY)
    except OSError:
        pass
    finally:
        close_quietly(sock)
