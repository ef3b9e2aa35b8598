"""The relay server: one TCP port for the control channel, the data channels and HTTP, and
a UDP socket on the same port number.

``Server.start()`` binds and returns once listening; ``stop()`` closes every socket and joins
every thread. The accept loop only accepts: each connection gets its own thread, which reads
the first bytes under a deadline and dispatches on them (HTTP / WebSocket, the data-channel
magic ``0xFD 0x01``, anything else is closed).
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
from urllib.parse import urlsplit

from common import __version__, auth, tls
from common import protocol as p
from common.errors import ChuantouError
from common.frames import DATA_MAGIC, HEADER_SIZE
from common.net import close_quietly, enlarge_udp_buffers, recv_exact, tune_tcp
from common.threads import ThreadGroup

from . import admin, admin_sessions, caps, httpd
from .busy import SpareDescriptor
from .handshakes import DEFAULT_MAX_PENDING, DEFAULT_MAX_PENDING_PER_SOURCE, HandshakeGate
from .admission import DEFAULT_MAX_UNREGISTERED, DEFAULT_MAX_UNREGISTERED_PER_SOURCE, UnregisteredGate
from .registry import DEFAULT_MAX_RESERVED_PER_CREDENTIAL, DEFAULT_RESERVATION_TIME, ClientRegistry
from .relay import serve_data_channel
from .sessions import SessionTable
from .traffic import RelayTraffic
from .signaling import ControlConnection
from .udp import EARLY_QUEUE_BYTES, EARLY_QUEUE_TOTAL_BYTES, REGISTRATIONS_PER_SECOND, UdpRelay

log = logging.getLogger("chuantou.server")

HTTP_FIRST_BYTES = b"GPHDOCT"  # GET POST PUT PATCH HEAD DELETE OPTIONS CONNECT TRACE
CONTROL_SEND_TIMEOUT = 15.0  # a client that stops reading its control channel is dropped


class Server:
    def __init__(
        self,
        host: str = "0.0.0.0",
        port: int = 8200,
        heartbeat_timeout: float = 25.0,
        *,
        public_host: str | None = None,
        public_port: int | None = None,
        session_join_timeout: float = 10.0,
        udp_idle_timeout: float = 60.0,
        handshake_timeout: float = 10.0,
        max_message_size: int = p.MAX_MESSAGE_BYTES,
        token: str | None = None,
        client_tokens: dict[str, str] | None = None,
        extra_tokens=(),
        max_sessions_per_client: int = caps.DEFAULT_MAX_SESSIONS_PER_CLIENT,
        max_udp_flows_per_client: int = caps.DEFAULT_MAX_UDP_FLOWS_PER_CLIENT,
        max_sessions_per_target: int = caps.DEFAULT_MAX_SESSIONS_PER_TARGET,
        max_sessions: int = caps.DEFAULT_MAX_SESSIONS,
        max_pending_sessions_per_client: int = caps.DEFAULT_MAX_PENDING_SESSIONS_PER_CLIENT,
        descriptor_reserve: int = caps.DEFAULT_DESCRIPTOR_RESERVE,
        tcp_idle_timeout: float = 0.0,
        max_pending_handshakes: int = DEFAULT_MAX_PENDING,
        max_pending_handshakes_per_source: int = DEFAULT_MAX_PENDING_PER_SOURCE,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        tls_only: bool = False,
        id_reservation_time: float = DEFAULT_RESERVATION_TIME,
        max_reserved_ids_per_token: int = DEFAULT_MAX_RESERVED_PER_CREDENTIAL,
        # the admin page's credential and login sessions (admin_sessions.py)
        admin_token: str | None = None,
        admin_session_idle: float = admin_sessions.DEFAULT_IDLE,
        admin_session_lifetime: float = admin_sessions.DEFAULT_LIFETIME,
        max_admin_sessions: int = admin_sessions.DEFAULT_MAX_SESSIONS,
        admin_login_failures_per_minute: int = admin_sessions.DEFAULT_LOGIN_FAILURES_PER_MINUTE,
        udp_early_queue_bytes: int = EARLY_QUEUE_BYTES,
        udp_early_queue_total_bytes: int = EARLY_QUEUE_TOTAL_BYTES,
        udp_registrations_per_second: float = REGISTRATIONS_PER_SECOND,
        data_channel_timeout: float = 30.0,
        max_unregistered: int = DEFAULT_MAX_UNREGISTERED,
        max_unregistered_per_source: int = DEFAULT_MAX_UNREGISTERED_PER_SOURCE,
    ):
        """``token=None`` (and no other tokens) runs an open relay: any client may register.
        ``client_tokens`` maps a client ID to the only token that may register it;
        ``extra_tokens`` are further relay-wide tokens (one per person, say). A client ID can
        be taken over only with the token that registered it, while it is online and for
        ``id_reservation_time`` seconds after it goes offline (0: only while online); each
        token keeps at most ``max_reserved_ids_per_token`` offline IDs reserved.

        ``admin_token`` opens the admin page and API (never a registration token); None turns
        them off. Its login sessions expire after ``admin_session_idle`` seconds unused and
        ``admin_session_lifetime`` seconds in all; at most ``max_admin_sessions`` live at once."""
        self.host = host
        self.port = port
        self.heartbeat_timeout = heartbeat_timeout
        self.data_channel_timeout = data_channel_timeout  # a silent data channel is dropped after it
        self.public_host = public_host
        self.public_port = public_port
        self.session_join_timeout = session_join_timeout
        self.udp_idle_timeout = udp_idle_timeout
        self.tcp_idle_timeout = tcp_idle_timeout  # 0: off (ssh sessions may idle for hours)
        self.handshake_timeout = handshake_timeout
        self.max_message_size = max_message_size
        self.token = token
        self.client_tokens = dict(client_tokens or {})
        self.extra_tokens = list(extra_tokens)
        self.caps = caps.SessionCaps(max_sessions, max_sessions_per_client, max_udp_flows_per_client,
                                     max_sessions_per_target, max_pending_sessions_per_client, descriptor_reserve)
        if admin_token is not None and auth.token_problem(admin_token):
            raise ChuantouError(auth.token_problem(admin_token, "the admin token"))
        if admin_token is not None and admin_token in (token, *self.client_tokens.values(), *self.extra_tokens):
            raise ChuantouError("the admin token must not be a client registration token: "
                                "make a separate one with python -m chuantou_server token --admin")
        self.admin_token = admin_token
        self.admin_sessions = admin_sessions.AdminSessions(admin_session_idle, admin_session_lifetime,
                                                           max_admin_sessions)
        self.admin_login_failures = admin_sessions.LoginFailures(admin_login_failures_per_minute)
        self.udp_limits = {"early_queue_bytes": udp_early_queue_bytes,  # UDP hardening
                           "early_queue_total_bytes": udp_early_queue_total_bytes,
                           "registrations_per_second": udp_registrations_per_second}
        self.unregistered = UnregisteredGate(max_unregistered, max_unregistered_per_source)
        if tls_only and not tls_cert:
            raise ChuantouError("tls_only needs a certificate: pass --tls-cert and --tls-key")
        self.tls_context = tls.server_context(tls_cert, tls_key or tls_cert) if tls_cert else None
        self.tls_only = tls_only

        self.registry = ClientRegistry(id_reservation_time, max_reserved_ids_per_token)
        self.handshakes = HandshakeGate(max_pending_handshakes, max_pending_handshakes_per_source,
                                        self.registry.has_source)
        self.sessions = SessionTable()
        self.traffic = RelayTraffic(self.sessions, self.registry)  # figures for the admin page
        self.threads = ThreadGroup("chuantou-server")
        self.started_at: float | None = None
        self._stopping = threading.Event()
        self._listener: socket.socket | None = None
        self._udp_sock: socket.socket | None = None
        self.udp: UdpRelay | None = None
        self._conn_lock = threading.Lock()
        self._connections: set[ControlConnection] = set()
        self._state_lock = threading.Lock()
        self._started = False

    # --- lifecycle --------------------------------------------------------------------------

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> "Server":
        with self._state_lock:
            if self._started:
                return self
            self._listener, self._udp_sock = self._bind()
            self.port = self._listener.getsockname()[1]
            self.udp = UdpRelay(self._udp_sock, self.sessions, self._stopping, **self.udp_limits)
            self.spare_descriptor = SpareDescriptor()  # to refuse at once at the descriptor limit
            self._started = True
            self.started_at = time.time()
        self.threads.spawn("accept", self._accept_loop)
        self.threads.spawn("udp", self.udp.run)
        self.threads.spawn("housekeeper", self._housekeeping_loop)
        self.threads.spawn("traffic", self.traffic.run, self._stopping)
        log.info("chuantou relay %s listening on %s:%d (TCP and UDP)", __version__, self.host, self.port)
        return self

    def stop(self) -> None:
        with self._state_lock:
            if not self._started or self._stopping.is_set():
                return
            self._stopping.set()
        close_quietly(self._listener)
        self.handshakes.abort_all()  # wakes threads still reading a first request
        for conn in self._live_connections():
            conn.close()
        for session in self.sessions.all():
            self.close_session(session, "relay stopping", notify=False)
        self.threads.join_all(timeout=10.0)
        close_quietly(self._udp_sock)
        self.spare_descriptor.close()
        log.info("chuantou relay on port %d stopped", self.port)

    def _bind(self) -> tuple[socket.socket, socket.socket]:
        """Bind TCP and UDP on one port number; with port 0, retry until both get the same one."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        for _ in range(20 if self.port == 0 else 1):
            tcp = socket.socket(family, socket.SOCK_STREAM)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            _dual_stack_if_wildcard(tcp, self.host)
            try:
                tcp.bind((self.host, self.port))
                tcp.listen(1024)
            except OSError as exc:
                tcp.close()
                raise ChuantouError(
                    f"cannot listen on {self.host}:{self.port}: {exc.strerror or exc}; "
                    f"is another relay running? choose another port with --port"
                ) from None
            port = tcp.getsockname()[1]
            udp = socket.socket(family, socket.SOCK_DGRAM)
            _dual_stack_if_wildcard(udp, self.host)
            try:
                udp.bind((self.host, port))
            except OSError as exc:
                udp.close()
                tcp.close()
                if self.port == 0:
                    continue
                raise ChuantouError(
                    f"cannot bind UDP {self.host}:{port}: {exc.strerror or exc}; "
                    f"the UDP port is taken, choose another port with --port"
                ) from None
            enlarge_udp_buffers(udp)
            return tcp, udp
        raise ChuantouError("could not find a port free for both TCP and UDP")

    # --- accept and dispatch ----------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                sock, addr = self._listener.accept()
            except OSError as exc:
                if self._stopping.is_set():
                    return
                if not self.spare_descriptor.refuse_one(self._listener, exc):
                    self.spare_descriptor.limit_log.bit("accept", "accept", "accept failed: %s", exc)
                    self._stopping.wait(0.1)
                continue
            if not self.handshakes.enter(addr[0], sock):
                log.debug("connection from %s:%s closed: too many pending handshakes", addr[0], addr[1])
                close_quietly(sock)
                continue
            tune_tcp(sock)
            try:
                self.threads.spawn(f"conn-{addr[0]}:{addr[1]}", self._dispatch, sock, addr)
            except RuntimeError:
                self.handshakes.leave(addr[0], sock)
                log.warning("cannot start a thread for %s:%s; connection closed", addr[0], addr[1])
                close_quietly(sock)

    def _dispatch(self, sock: socket.socket, addr: tuple) -> None:
        """Read the first bytes under the handshake deadline and hand the connection on."""
        deadline = time.monotonic() + self.handshake_timeout
        raw = sock
        handshaking = True
        try:
            if self.tls_context is not None:
                if tls.peek_first_byte(sock, deadline) == tls.TLS_RECORD_START:
                    sock = tls.TlsStream.handshake(sock, self.tls_context, True, deadline)
                elif self.tls_only:
                    log.debug("plain connection from %s:%s refused (TLS only)", addr[0], addr[1])
                    refuse_plain_connection(sock, deadline)
                    return
            first = recv_exact(sock, 2, deadline)
            if first == DATA_MAGIC:
                header = first + recv_exact(sock, HEADER_SIZE - 2, deadline)
                self.handshakes.leave(addr[0], raw)
                handshaking = False
                serve_data_channel(self, sock, header)
            elif first[0] in HTTP_FIRST_BYTES:
                request = self._read_http(sock, first, deadline)
                self.handshakes.leave(addr[0], raw)
                handshaking = False
                if request is not None:
                    self._serve_http(sock, addr, request)
            else:
                log.debug("connection from %s:%s closed: unknown first bytes %r", addr[0], addr[1], first)
                close_quietly(sock)
        except (OSError, ValueError) as exc:  # timeouts, resets, EOF: only this connection ends
            log.debug("connection from %s:%s dropped: %s", addr[0], addr[1], exc)
            if handshaking:
                self.handshakes.note_failed(addr[0])
            close_quietly(sock)
        finally:
            if handshaking:
                self.handshakes.leave(addr[0], raw)

    def _read_http(self, sock: socket.socket, first: bytes, deadline: float) -> httpd.Request | None:
        try:
            return httpd.read_request(sock, first, deadline)
        except httpd.BadRequest as exc:
            httpd.send_response(sock, exc.status, f"{exc}\n")
            close_quietly(sock)
            return None

    def _serve_http(self, sock: socket.socket, addr: tuple, request: httpd.Request) -> None:
        if request.is_websocket_upgrade and request.path in httpd.CONTROL_PATHS:
            self._serve_control(sock, addr, request)
            return
        try:
            status, content_type, body, *headers = admin.handle(self, request, addr)  # headers: optional dict
            httpd.send_response(sock, status, body, content_type, *headers)
        finally:
            close_quietly(sock)

    def _serve_control(self, sock: socket.socket, addr: tuple, request: httpd.Request) -> None:
        admission, problem = self.unregistered.admit(addr[0])
        if admission is None:
            try:
                httpd.send_response(sock, 503, f"{problem}\n", extra_headers={"Retry-After": "10"})
            finally:
                close_quietly(sock)
            return
        try:
            self._serve_admitted_control(sock, addr, request, admission)
        finally:
            admission.release()

    def _serve_admitted_control(self, sock: socket.socket, addr: tuple, request: httpd.Request, admission) -> None:
        sock.settimeout(None)  # simple-websocket needs a blocking socket; SO_SNDTIMEO bounds sends
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(CONTROL_SEND_TIMEOUT))

        def reader_thread(target):
            thread = threading.Thread(target=target, name=f"chuantou-server-ws-{addr[0]}:{addr[1]}", daemon=True)
            self.threads.adopt(thread)
            return thread

        try:
            ws = httpd.accept_websocket(sock, request, reader_thread, self.max_message_size)
        except httpd.BadRequest as exc:
            log.debug("connection from %s:%s refused: %s", addr[0], addr[1], exc)
            httpd.send_response(sock, exc.status, f"{exc}\n")
            close_quietly(sock)
            return
        conn = ControlConnection(self, ws, sock, addr, self._relay_host_from(request, sock), admission)
        with self._conn_lock:
            if self._stopping.is_set():
                conn.close()
                return
            self._connections.add(conn)
        conn.serve()

    def _relay_host_from(self, request: httpd.Request, sock: socket.socket) -> str:
        if self.public_host:
            return self.public_host
        host = request.header("host")
        if host:
            try:
                name = urlsplit("//" + host).hostname
            except ValueError:
                name = None
            if name:
                return name
        return sock.getsockname()[0]

    @property
    def auth_required(self) -> bool:
        return self.token is not None or bool(self.client_tokens) or bool(self.extra_tokens)

    def authenticate(self, client_id: str, nonce: str, proof: str | None) -> tuple[str | None, str | None]:
        """Check a registration's proof. Returns (credential, None) or (None, problem); the
        credential is a fingerprint of the token that matched (None on an open relay)."""
        bound = self.client_tokens.get(client_id)
        candidates = [bound] if bound else [t for t in (self.token, *self.extra_tokens) if t]
        if not candidates:
            return None, None
        if not proof:
            return None, "authentication failed: this relay requires a token; pass --token (or set CHUANTOU_TOKEN)"
        for token in candidates:
            if auth.proof_matches(token, nonce, client_id, proof):
                return auth.fingerprint(token), None
        return None, "authentication failed"

    def relay_addr(self, conn: ControlConnection, protocol: str) -> p.RelayAddr:
        """Where ``conn``'s client opens data channels: the host it used to reach us."""
        return p.RelayAddr(host=conn.relay_host, port=self.public_port or self.port, protocol=protocol)

    # --- clients and sessions ---------------------------------------------------------------

    def _live_connections(self) -> list[ControlConnection]:
        with self._conn_lock:
            return list(self._connections)

    def connection_ended(self, conn: ControlConnection) -> None:
        with self._conn_lock:
            self._connections.discard(conn)
        if conn.client_id and self.registry.unregister(conn.client_id, conn):
            log.info("client %s disconnected", conn.client_id)
            # Sessions still waiting for this client cannot complete; running ones keep going
            # on their own sockets until they end.
            for session in self.sessions.for_client(conn.client_id):
                if not session.joined:
                    self.close_session(session, f"client '{conn.client_id}' went offline")

    def drop_client(self, conn: ControlConnection, reason: str) -> None:
        """Take a client offline (heartbeat timeout, unregister) and close all its sessions."""
        if conn.client_id:
            log.info("client %s dropped: %s", conn.client_id, reason)
            if self.registry.unregister(conn.client_id, conn):
                for session in self.sessions.for_client(conn.client_id):
                    self.close_session(session, f"client '{conn.client_id}' {reason}")
        conn.close()

    def close_session(self, session, reason: str, notify: bool = True) -> None:
        if not self.sessions.remove(session):
            return
        self.traffic.session_closed(session)
        session.close_sockets()
        if self.udp is not None and session.protocol == "udp":
            self.udp.forget(session)
        if notify:
            for client_id in {session.client_a, session.client_b}:
                conn = self.registry.get(client_id)
                if conn is not None:
                    conn.send(p.SessionClosed(sessionId=session.id, reason=reason))

    # --- deadlines --------------------------------------------------------------------------

    def _housekeeping_loop(self) -> None:
        tick = max(0.05, min(0.5, self.heartbeat_timeout / 4, self.session_join_timeout / 4))
        while not self._stopping.wait(tick):
            self.expire_once()

    def expire_once(self) -> None:
        now = time.monotonic()
        for conn in self._live_connections():
            if conn.client_id is None and now - conn.opened > self.handshake_timeout:
                log.info("%s closed: no register within %g s", conn, self.handshake_timeout)
                conn.close()
            elif conn.client_id is not None and now - conn.last_seen > self.heartbeat_timeout:
                self.drop_client(conn, f"sent nothing for {self.heartbeat_timeout:g} s (heartbeat timeout)")
        for session, reason in self.sessions.expired(self.session_join_timeout, self.udp_idle_timeout,
                                                      self.tcp_idle_timeout):
            log.info("session %s closed: %s", session.id[:8], reason)
            self.close_session(session, reason)

    # --- figures ----------------------------------------------------------------------------

    def status(self) -> dict:
        return {
            "version": __version__,
            "port": self.port,
            "uptime": time.time() - self.started_at if self.started_at else 0.0,
            "clients": len(self.registry),
            "sessions": len(self.sessions),
            "threads": len(self.threads),
        }


def _dual_stack_if_wildcard(sock: socket.socket, host: str) -> None:
    """``::`` serves IPv4 too (as ::ffff:a.b.c.d), whatever the system's default."""
    if host == "::":
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)


def _timeval(seconds: float) -> bytes:
    whole = int(seconds)
    return struct.pack("ll", whole, int((seconds - whole) * 1e6))


_TLS_ONLY_TEXT = b"this relay accepts only TLS: clients use --server wss://..., browsers use https://...\n"
TLS_ONLY_REPLY = (b"HTTP/1.1 426 Upgrade Required\r\nUpgrade: TLS/1.3, TLS/1.2\r\nConnection: close\r\n"
                  b"Content-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\n\r\n%s"
                  % (len(_TLS_ONLY_TEXT), _TLS_ONLY_TEXT))


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
