"""Test helpers: deadline waits, small local services and the user's side of a connection.

Every thread started here is named ``svc-...`` so the leak check in conftest.py can tell
the test's own threads from the library's (``chuantou-...``). Services bind 127.0.0.1
port 0 and are stopped by fixtures; ``stop()`` closes every socket and joins every thread.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import websocket

HOST = "127.0.0.1"
SERVICE_THREAD_PREFIX = "svc-"
IO_TIMEOUT = 10.0  # no single blocking call in a test waits longer than this


# --- waiting -----------------------------------------------------------------------------------

def wait_until(predicate, timeout: float = 5.0, interval: float = 0.01, message: str | None = None):
    """Poll ``predicate`` until it returns something truthy (returned) or ``timeout`` passes (AssertionError)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            what = message or getattr(predicate, "__name__", repr(predicate))
            raise AssertionError(f"not true within {timeout:g} s: {what}")
        time.sleep(interval)  # the polling interval of a deadline loop


def relay_url(server) -> str:
    return f"ws://{HOST}:{server.port}"


def free_port() -> int:
    """A port nothing listens on right now (bound and released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


# --- thread bookkeeping ----------------------------------------------------------------------

class _Threads:
    def __init__(self, prefix: str):
        self.prefix = prefix
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def spawn(self, name: str, target, *args) -> threading.Thread:
        thread = threading.Thread(target=target, args=args, name=f"{SERVICE_THREAD_PREFIX}{self.prefix}-{name}",
                                  daemon=True)
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
        thread.start()
        return thread

    def join(self, timeout: float = 5.0) -> list[str]:
        deadline = time.monotonic() + timeout
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))
        return [t.name for t in threads if t.is_alive()]


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _close(sock: socket.socket | None) -> None:
    if sock is None:
        return
    _shutdown(sock)
    try:
        sock.close()
    except OSError:
        pass


# --- byte helpers ------------------------------------------------------------------------------

def recv_until_eof(sock: socket.socket, chunk: int = 1 << 20) -> bytes:
    parts = []
    while True:
        data = sock.recv(chunk)
        if not data:
            return b"".join(parts)
        parts.append(data)


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    buf = bytearray()
    while len(buf) < size:
        data = sock.recv(size - len(buf))
        if not data:
            raise ConnectionError(f"peer closed after {len(buf)} of {size} bytes")
        buf += data
    return bytes(buf)


def hash_until_eof(sock: socket.socket) -> tuple[str, int]:
    """Read to EOF; return (sha256 hex, byte count) without keeping the bytes."""
    digest = hashlib.sha256()
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    total = 0
    while True:
        n = sock.recv_into(buf)
        if not n:
            return digest.hexdigest(), total
        digest.update(view[:n])
        total += n


def send_and_close_write(sock: socket.socket, payload: bytes) -> None:
    view = memoryview(payload)
    for start in range(0, len(view), 1 << 20):
        sock.sendall(view[start:start + (1 << 20)])
    sock.shutdown(socket.SHUT_WR)


def exchange(sock: socket.socket, payload: bytes) -> tuple[str, int]:
    """Send ``payload`` then FIN while reading to EOF at the same time; return what was read (sha256, size)."""
    errors = []

    def send():
        try:
            send_and_close_write(sock, payload)
        except OSError as exc:
            errors.append(exc)

    sender = threading.Thread(target=send, name=f"{SERVICE_THREAD_PREFIX}user-sender", daemon=True)
    sender.start()
    try:
        result = hash_until_eof(sock)
    finally:
        sender.join(IO_TIMEOUT)
    if errors:
        raise errors[0]
    return result


def echo_bytes(sock: socket.socket, size: int) -> None:
    """Send ``size`` bytes through an echo path and read them all back (not kept)."""
    sock.sendall(b"x" * size)
    got = 0
    while got < size:
        chunk = sock.recv(1 << 20)
        if not chunk:
            raise ConnectionError(f"the echo path closed after {got} of {size} bytes")
        got += len(chunk)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def connect(port: int, timeout: float = IO_TIMEOUT) -> socket.socket:
    sock = socket.create_connection((HOST, port), timeout=timeout)
    sock.settimeout(timeout)
    return sock


def echo_roundtrip(port: int, data: bytes = b"hello through the tunnel") -> bytes:
    """Send ``data`` on a new connection to ``port`` and return as many bytes read back (an echo behind it)."""
    with connect(port) as user:
        user.sendall(data)
        return recv_exactly(user, len(data))


def closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    """True if the peer closes ``sock`` (EOF or reset) within ``timeout``, False if it sends data or stays open."""
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


# --- TCP services ------------------------------------------------------------------------------

class TcpService:
    """A threaded TCP server on 127.0.0.1:0 running ``handler(conn, service)`` per connection."""

    def __init__(self, handler, name: str = "tcp"):
        self.handler = handler
        self.name = name
        self.port: int | None = None
        self.results: list = []  # whatever handlers want to report
        self._listener: socket.socket | None = None
        self._threads = _Threads(name)
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._stopping = threading.Event()

    def start(self) -> "TcpService":
        self._listener = socket.create_server((HOST, 0), backlog=256)
        self.port = self._listener.getsockname()[1]
        self._threads.spawn("accept", self._accept_loop)
        return self

    def stop(self) -> list[str]:
        self._stopping.set()
        _close(self._listener)  # shutdown() wakes the blocked accept()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            _shutdown(conn)
        return self._threads.join()

    def spawn(self, name: str, target, *args) -> threading.Thread:
        """For handlers that need a helper thread of their own."""
        return self._threads.spawn(name, target, *args)

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self._conns.add(conn)
            self._threads.spawn("conn", self._serve, conn)

    def _serve(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(30.0)
            self.handler(conn, self)
        except OSError:
            pass
        finally:
            with self._lock:
                self._conns.discard(conn)
            _close(conn)


def echo_handler(conn: socket.socket, service: TcpService) -> None:
    while True:
        data = conn.recv(1 << 16)
        if not data:
            return
        conn.sendall(data)


def greeting_handler(greeting: bytes):
    """Send ``greeting`` on connect, then echo."""

    def handler(conn: socket.socket, service: TcpService) -> None:
        conn.sendall(greeting)
        echo_handler(conn, service)

    return handler


def exchange_handler(payload: bytes):
    """Send ``payload`` then FIN while reading to EOF; record {'received': (sha, size)} in service.results."""

    def handler(conn: socket.socket, service: TcpService) -> None:
        done = threading.Event()

        def send():
            try:
                send_and_close_write(conn, payload)
            except OSError:
                pass
            finally:
                done.set()

        service.spawn("sender", send)
        received = hash_until_eof(conn)
        done.wait(30.0)
        service.results.append({"received": received})

    return handler


def reply_after_eof_handler(reply_size: int):
    """Read to EOF, then send sha256(received) (32 bytes) followed by ``reply_size`` pattern bytes."""

    def handler(conn: socket.socket, service: TcpService) -> None:
        received = recv_until_eof(conn)
        conn.sendall(hashlib.sha256(received).digest() + pattern(reply_size))

    return handler


def pattern(size: int) -> bytes:
    """Deterministic bytes that differ at every offset within a 251-byte cycle."""
    block = bytes(range(251))
    return (block * (size // len(block) + 1))[:size]


# --- UDP service -------------------------------------------------------------------------------

class UdpEchoService:
    """Echoes every datagram back to its sender; remembers the sizes it saw."""

    def __init__(self, name: str = "udp-echo"):
        self.name = name
        self.port: int | None = None
        self.sizes: list[int] = []
        self._sock: socket.socket | None = None
        self._threads = _Threads(name)
        self._stopping = threading.Event()

    def start(self) -> "UdpEchoService":
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind((HOST, 0))
        self._sock.settimeout(0.05)  # lets the loop notice stop()
        self.port = self._sock.getsockname()[1]
        self._threads.spawn("loop", self._loop)
        return self

    def stop(self) -> list[str]:
        self._stopping.set()
        alive = self._threads.join()
        self._sock.close()
        return alive

    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                data, addr = self._sock.recvfrom(65535)
            except socket.timeout:
                continue
            except OSError:
                continue
            self.sizes.append(len(data))
            try:
                self._sock.sendto(data, addr)
            except OSError:
                pass


def udp_roundtrip(sock: socket.socket, port: int, payload: bytes, timeout: float = 8.0,
                  resend_every: float = 1.0) -> bytes:
    """Send ``payload`` to 127.0.0.1:port from ``sock`` and return its echo.

    Resends every ``resend_every`` seconds (UDP may drop, e.g. while a session is being set
    up) until ``timeout``. Replies that are not ``payload`` (a late echo of an earlier resend)
    are skipped, and reported if the echo never comes.
    """
    deadline = time.monotonic() + timeout
    others = []
    while True:
        sock.sendto(payload, (HOST, port))
        resend_at = min(deadline, time.monotonic() + resend_every)
        while True:
            remaining = resend_at - time.monotonic()
            if remaining <= 0:
                break
            sock.settimeout(remaining)
            try:
                data, _ = sock.recvfrom(65535)
            except socket.timeout:
                break
            if data == payload:
                return data
            others.append(data)
        if time.monotonic() >= deadline:
            seen = [f"{len(d)} bytes {d[:20]!r}" for d in others[-3:]]
            raise AssertionError(f"no echo of the {len(payload)}-byte datagram through port {port} within "
                                 f"{timeout:g} s; other replies: {seen}")


# --- HTTP and WebSocket services ---------------------------------------------------------------

WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


class WsConnection:
    """The server side of an RFC 6455 connection after the handshake (no extensions)."""

    def __init__(self, rfile, sock: socket.socket):
        self.rfile = rfile
        self.sock = sock

    def _read(self, size: int) -> bytes:
        data = self.rfile.read(size)
        if len(data) != size:
            raise ConnectionError("peer closed inside a frame")
        return data

    def recv(self):
        """Return (opcode, payload) of the next whole message, control frames included."""
        message_opcode, parts = None, []
        while True:
            b1, b2 = self._read(2)
            fin, opcode, masked, size = b1 & 0x80, b1 & 0x0F, b2 & 0x80, b2 & 0x7F
            if size == 126:
                (size,) = struct.unpack("!H", self._read(2))
            elif size == 127:
                (size,) = struct.unpack("!Q", self._read(8))
            mask = self._read(4) if masked else None
            payload = self._read(size)
            if mask and size:
                key = (mask * (size // 4 + 1))[:size]
                payload = (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(size, "big")
            if opcode >= OP_CLOSE:  # control frames are never fragmented
                return opcode, payload
            if opcode != OP_CONT:
                message_opcode = opcode
            parts.append(payload)
            if fin:
                return message_opcode, b"".join(parts)

    def send(self, opcode: int, payload: bytes) -> None:
        size = len(payload)
        if size < 126:
            head = struct.pack("!BB", 0x80 | opcode, size)
        elif size < 1 << 16:
            head = struct.pack("!BBH", 0x80 | opcode, 126, size)
        else:
            head = struct.pack("!BBQ", 0x80 | opcode, 127, size)
        self.sock.sendall(head + payload)


def ws_echo(ws: WsConnection) -> None:
    """Echo text and binary messages, answer pings, answer a close and return."""
    while True:
        opcode, payload = ws.recv()
        if opcode in (OP_TEXT, OP_BINARY):
            ws.send(opcode, payload)
        elif opcode == OP_PING:
            ws.send(OP_PONG, payload)
        elif opcode == OP_CLOSE:
            ws.send(OP_CLOSE, payload[:2])
            return


def ws_greet_then_echo(greeting: str):
    def session(ws: WsConnection) -> None:
        ws.send(OP_TEXT, greeting.encode())
        ws_echo(ws)

    return session


class _Handler(BaseHTTPRequestHandler):
    server: "_HTTPServer"

    def log_message(self, format, *args):  # keep test output quiet
        pass

    def _route(self, method: str) -> None:
        routes = self.server.service.routes
        if method == "GET" and "websocket" in self.headers.get("Upgrade", "").lower():
            return self._upgrade()
        body = b""
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            body = self.rfile.read(length)
        route = routes.get((method, self.path)) or routes.get((method, "*"))
        if route is None:
            status, reply, ctype = 404, b"not found\n", "text/plain"
        else:
            status, reply, ctype = route(self.path, body)
        if isinstance(reply, str):
            reply = reply.encode()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def do_GET(self):
        self._route("GET")

    def do_POST(self):
        self._route("POST")

    def _upgrade(self) -> None:
        service = self.server.service
        key = self.headers.get("Sec-WebSocket-Key", "")
        if service.ws_session is None or (service.ws_path and self.path != service.ws_path) or not key:
            self.send_error(400, "no WebSocket here")
            return
        accept = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
        self.wfile.write(
            ("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
             f"Sec-WebSocket-Accept: {accept}\r\n\r\n").encode()
        )
        self.wfile.flush()
        self.close_connection = True
        try:
            service.ws_session(WsConnection(self.rfile, self.connection))
        except (ConnectionError, OSError, ValueError):
            pass


class _HTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer whose request threads are named, tracked, and joined on stop."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, service: "HttpService"):
        self.service = service
        self.live: set[socket.socket] = set()
        self.live_lock = threading.Lock()
        super().__init__((HOST, 0), _Handler)

    def process_request(self, request, client_address):
        with self.live_lock:
            self.live.add(request)
        self.service._threads.spawn("conn", self.process_request_thread, request, client_address)

    def shutdown_request(self, request):
        with self.live_lock:
            self.live.discard(request)
        super().shutdown_request(request)


class HttpService:
    """An HTTP server (http.server.ThreadingHTTPServer) that can also upgrade to WebSocket.

    ``routes`` maps (method, path) -> fn(path, body) -> (status, body, content type);
    ``ws_session(ws)`` serves an upgraded connection (on ``ws_path`` only, if given).
    """

    def __init__(self, routes=None, ws_session=None, ws_path: str | None = None, name: str = "http"):
        self.routes = routes or {}
        self.ws_session = ws_session
        self.ws_path = ws_path
        self.name = name
        self.port: int | None = None
        self._threads = _Threads(name)
        self._httpd: _HTTPServer | None = None

    def start(self) -> "HttpService":
        self._httpd = _HTTPServer(self)
        self.port = self._httpd.server_address[1]
        self._threads.spawn("serve", self._httpd.serve_forever, 0.05)
        return self

    def stop(self) -> list[str]:
        self._httpd.shutdown()
        self._httpd.server_close()
        with self._httpd.live_lock:
            live = list(self._httpd.live)
        for sock in live:
            _shutdown(sock)
        return self._threads.join()


def text_route(text: str | bytes, status: int = 200):
    return lambda path, body: (status, text, "text/plain; charset=utf-8")


def text_service(text: str | bytes, name: str = "web") -> HttpService:
    """An HttpService answering every GET, whatever its path, with ``text`` (start it with ``services``)."""
    return HttpService({("GET", "*"): text_route(text)}, name=name)


def json_route(fn):
    """fn(request json or None) -> reply object."""

    def route(path, body):
        request = json.loads(body) if body else None
        return 200, json.dumps(fn(request)), "application/json"

    return route


# --- the user's side ---------------------------------------------------------------------------

def http_get(port: int, path: str = "/", timeout: float = IO_TIMEOUT, headers: dict | None = None,
             host: str = HOST) -> tuple[int, bytes]:
    """(status, body) of a GET to host:port (an IPv6 literal too)."""
    return http_request(port, "GET", path, None, timeout, headers, host)


def http_request(port: int, method: str, path: str, payload=None, timeout: float = IO_TIMEOUT,
                 headers: dict | None = None, host: str = HOST) -> tuple[int, bytes]:
    """(status, body) of one request; ``payload`` (if not None) goes as JSON."""
    status, _, body = _http(port, method, path, payload, timeout, headers, host)
    return status, body


def http_json(port: int, method: str, path: str, headers: dict | None = None, body=None,
              timeout: float = IO_TIMEOUT):
    """(status, response, body) of one request sent as given (``body`` as JSON if not None); the
    reply's body is decoded from JSON if it says it is JSON, else as text. ``response`` keeps the headers."""
    status, response, raw = _http(port, method, path, body, timeout, headers, HOST)
    if raw and response.getheader("Content-Type", "").startswith("application/json"):
        return status, response, json.loads(raw)
    return status, response, raw.decode()


def _http(port: int, method: str, path: str, payload, timeout: float, headers: dict | None, host: str):
    conn = http.client.HTTPConnection(host, port, timeout=timeout)  # http.client: no proxy ever applies
    try:
        body = json.dumps(payload).encode() if payload is not None else None
        headers = dict(headers or {})
        if body is not None:
            headers.setdefault("Content-Type", "application/json")
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response, response.read()
    finally:
        conn.close()


def ws_connect(port: int, path: str = "/ws", timeout: float = IO_TIMEOUT) -> websocket.WebSocket:
    return websocket.create_connection(f"ws://{HOST}:{port}{path}", timeout=timeout)


def random_bytes(size: int) -> bytes:
    return os.urandom(size)
