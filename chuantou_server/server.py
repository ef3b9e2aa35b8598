"""The relay server: one TCP port for the control channel, the data channels and HTTP, and
a UDP socket on the same port number.

``Server.start()`` binds and returns once listening; ``stop()`` closes every socket and joins
every thread. The ``Listener`` (listener.py) accepts and sorts connections by their first
bytes; this module owns the lifecycle, the HTTP hand-off, the connected clients and the
sessions' deadlines. Its settings are one ``ServerConfig`` (settings.py), ``server.config``.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import struct
import threading
import time
from typing import Any
from urllib.parse import urlsplit

from common import __version__, tls
from common import protocol as p
from common.errors import ChuantouError
from common.net import close_quietly, enlarge_udp_buffers, shutdown_quietly
from common.threads import ThreadGroup

from . import admin, admin_sessions, caps, direct_claims, httpd, metrics
from .bandwidth import BandwidthLimits
from .admission import Admission, UnregisteredGate
from .authenticator import Authenticator
from .handshakes import HandshakeGate
from .pool import ChannelPools
from .listener import Listener
from .registry import ClientRegistry
from .sessions import Session, SessionTable
from .settings import ServerConfig
from .signaling import ControlConnection
from .traffic import RelayTraffic
from .udp import ProbeResponder, UdpRelay

log = logging.getLogger("chuantou.server")

CONTROL_SEND_TIMEOUT = 15.0  # a client that stops reading its control channel is dropped
# Settings read each time they are used, so reconfigure() may change them on a running relay.
LIVE_SETTINGS = frozenset({"public_host", "public_port", "token", "client_tokens", "extra_tokens"})


class Server:
    def __init__(self, *args: Any, config: ServerConfig | None = None, **settings: Any):
        """``Server(config=ServerConfig(...))``, or ``Server(host, port, heartbeat_timeout, **more)``
        with ``ServerConfig``'s fields as arguments (see settings.py for what each means)."""
        if config is not None and (args or settings):
            raise TypeError("pass either config= or the settings as arguments, not both")
        self.config: ServerConfig = config if config is not None else ServerConfig(*args, **settings)
        cfg = self.config
        self.port = cfg.port  # the bound port once started (cfg.port may be 0)
        self.authenticator = Authenticator(cfg)
        self.caps = caps.SessionCaps(cfg.max_sessions, cfg.max_sessions_per_client, cfg.max_udp_flows_per_client,
                                     cfg.max_sessions_per_target, cfg.max_pending_sessions_per_client,
                                     cfg.descriptor_reserve)
        self.admin_sessions = admin_sessions.AdminSessions(cfg.admin_session_idle, cfg.admin_session_lifetime,
                                                           cfg.max_admin_sessions)
        self.admin_login_failures = admin_sessions.LoginFailures(cfg.admin_login_failures_per_minute)
        self.unregistered = UnregisteredGate(cfg.max_unregistered, cfg.max_unregistered_per_source)
        self.tls_context = tls.server_context(cfg.tls_cert, cfg.tls_key or cfg.tls_cert) if cfg.tls_cert else None

        self.registry = ClientRegistry(cfg.id_reservation_time, cfg.max_reserved_ids_per_token)
        self.handshakes = HandshakeGate(cfg.max_pending_handshakes, cfg.max_pending_handshakes_per_source,
                                        self.registry.has_source)
        self.sessions = SessionTable()
        self.pools = ChannelPools(cfg.max_pooled_channels_per_client, cfg.max_pooled_channels,
                                  cfg.pool_idle_timeout, self.caps.out_of_descriptors)
        self.bandwidth = BandwidthLimits(cfg.bandwidth_per_client, cfg.bandwidth_total)
        self.traffic = RelayTraffic(self.sessions, self.registry)  # figures for the admin page
        self.metrics = metrics.RelayMetrics(self)  # this relay's own Prometheus registry (GET /metrics)
        self.threads = ThreadGroup("chuantou-server")
        self.started_at: float | None = None
        self.stopping = threading.Event()
        self._listener: Listener | None = None
        self._udp_sock: socket.socket | None = None
        self.udp: UdpRelay | None = None
        self._probe_sock: socket.socket | None = None
        self.probe_port: int | None = None  # bound --probe-port, if any
        self._conn_lock = threading.Lock()
        self._connections: set[ControlConnection] = set()
        self._state_lock = threading.Lock()
        self._started = False
        self.cluster = self._make_cluster()  # None: a relay on its own

    def _make_cluster(self):
        cfg = self.config
        if cfg.cluster_url is None:
            return None
        from .cluster import Cluster  # imported only here: the redis package is an extra
        node_id = cfg.node_id or f"{socket.gethostname()}-{cfg.port}"
        return Cluster(self, cfg.cluster_url, node_id, cfg.advertise, cfg.cluster_ttl)

    def reconfigure(self, **changes: Any) -> None:
        """Change settings of a running relay that it reads each time it uses them
        (``LIVE_SETTINGS``: the public address and the tokens); the rest are fixed at construction."""
        fixed = set(changes) - LIVE_SETTINGS
        if fixed:
            raise ValueError(f"{', '.join(sorted(fixed))} cannot change on a built relay")
        self.config = dataclasses.replace(self.config, **changes)
        self.authenticator = Authenticator(self.config)

    # --- lifecycle --------------------------------------------------------------------------

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> "Server":
        with self._state_lock:
            if self._started:
                return self
            tcp, self._udp_sock = self._bind()
            self.port = tcp.getsockname()[1]
            self._listener = Listener(self, tcp)
            cfg = self.config
            self.udp = UdpRelay(self._udp_sock, self.sessions, self.stopping,
                                early_queue_bytes=cfg.udp_early_queue_bytes,  # UDP hardening
                                early_queue_total_bytes=cfg.udp_early_queue_total_bytes,
                                registrations_per_second=cfg.udp_registrations_per_second,
                                bandwidth=self.bandwidth)
            if cfg.probe_port is not None:
                try:
                    self._probe_sock = self._bind_probe(cfg.probe_port)
                except ChuantouError:
                    close_quietly(tcp)
                    close_quietly(self._udp_sock)
                    raise
                self.probe_port = self._probe_sock.getsockname()[1]
                self.udp.probe_sock = self._probe_sock  # it answers filtering probes from this port
            self._started = True
            self.started_at = time.time()
        self.threads.spawn("accept", self._listener.run)
        self.threads.spawn("udp", self.udp.run)
        if self._probe_sock is not None:
            self.threads.spawn("udp-probe", ProbeResponder(self._probe_sock, self.stopping).run)
        self.threads.spawn("housekeeper", self._housekeeping_loop)
        self.threads.spawn("traffic", self.traffic.run, self.stopping)
        if self.cluster is not None:
            self.cluster.start()
        log.info("chuantou relay %s listening on %s:%d (TCP and UDP)", __version__, self.config.host, self.port)
        return self

    def stop(self) -> None:
        with self._state_lock:
            if not self._started or self.stopping.is_set():
                return
            self.stopping.set()
        assert self._listener is not None
        self._listener.close()  # also wakes threads still reading a first request
        for conn in self._live_connections():
            conn.close()
        self.pools.close_all()  # wakes the threads of pooled channels waiting for a session
        for session in self.sessions.all():
            self.close_session(session, "relay stopping", notify=False)
        for sock in (self._udp_sock, self._probe_sock):  # wakes their readers now, not at their 0.25 s timeout
            shutdown_quietly(sock, socket.SHUT_RD)
        self.threads.join_all(timeout=10.0)
        if self.cluster is not None:
            self.cluster.stop()
        close_quietly(self._udp_sock)
        close_quietly(self._probe_sock)
        self._listener.release()
        log.info("chuantou relay on port %d stopped", self.port)

    def _bind_probe(self, port: int) -> socket.socket:
        host = self.config.host
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
        _dual_stack_if_wildcard(sock, host)
        try:
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            raise ChuantouError(f"cannot bind the UDP probe port {host}:{port}: {exc.strerror or exc}; "
                                f"choose another with --probe-port") from None
        return sock

    def _bind(self) -> tuple[socket.socket, socket.socket]:
        """Bind TCP and UDP on one port number; with port 0, retry until both get the same one."""
        host, wanted = self.config.host, self.config.port
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        for _ in range(20 if wanted == 0 else 1):
            tcp = socket.socket(family, socket.SOCK_STREAM)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            _dual_stack_if_wildcard(tcp, host)
            try:
                tcp.bind((host, wanted))
                tcp.listen(1024)
            except OSError as exc:
                tcp.close()
                raise ChuantouError(
                    f"cannot listen on {host}:{wanted}: {exc.strerror or exc}; "
                    f"is another relay running? choose another port with --port"
                ) from None
            port = tcp.getsockname()[1]
            udp = socket.socket(family, socket.SOCK_DGRAM)
            _dual_stack_if_wildcard(udp, host)
            try:
                udp.bind((host, port))
            except OSError as exc:
                udp.close()
                tcp.close()
                if wanted == 0:
                    continue
                raise ChuantouError(
                    f"cannot bind UDP {host}:{port}: {exc.strerror or exc}; "
                    f"the UDP port is taken, choose another port with --port"
                ) from None
            enlarge_udp_buffers(udp)
            return tcp, udp
        raise ChuantouError("could not find a port free for both TCP and UDP")

    # --- HTTP: the admin page, or a control channel -----------------------------------------

    def serve_http(self, sock: socket.socket, addr: tuple, request: httpd.Request) -> None:
        """Serve a request whose head the listener read; this connection's I/O errors end here."""
        try:
            if request.is_websocket_upgrade and request.path in httpd.CONTROL_PATHS:
                self._serve_control(sock, addr, request)
                return
            httpd.send(sock, admin.handle(self, request, addr), include_body=request.method != "HEAD")
            close_quietly(sock)
        except OSError as exc:  # the peer went away while we answered it
            log.debug("connection from %s:%s dropped: %s", addr[0], addr[1], exc)
            close_quietly(sock)

    def _serve_control(self, sock: socket.socket, addr: tuple, request: httpd.Request) -> None:
        admission, problem = self.unregistered.admit(addr[0])
        if admission is None:
            try:
                httpd.send_text(sock, 503, f"{problem}\n", {"Retry-After": "10"})
            finally:
                close_quietly(sock)
            return
        try:
            self._serve_admitted_control(sock, addr, request, admission)
        finally:
            admission.release()

    def _serve_admitted_control(self, sock: socket.socket, addr: tuple, request: httpd.Request,
                                admission: Admission) -> None:
        sock.settimeout(None)  # simple-websocket needs a blocking socket; SO_SNDTIMEO bounds sends
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(CONTROL_SEND_TIMEOUT))

        def reader_thread(target):
            thread = threading.Thread(target=target, name=f"chuantou-server-ws-{addr[0]}:{addr[1]}", daemon=True)
            self.threads.adopt(thread)
            return thread

        try:
            ws = httpd.accept_websocket(sock, request, reader_thread, self.config.max_message_size)
        except httpd.BadRequest as exc:
            log.debug("connection from %s:%s refused: %s", addr[0], addr[1], exc)
            httpd.send_text(sock, exc.status, f"{exc}\n")
            close_quietly(sock)
            return
        conn = ControlConnection(self, ws, sock, addr, self._relay_host_from(request, sock), admission)
        with self._conn_lock:
            if self.stopping.is_set():
                conn.close()
                return
            self._connections.add(conn)
        conn.serve()

    def _relay_host_from(self, request: httpd.Request, sock: socket.socket) -> str:
        if self.config.public_host:
            return self.config.public_host
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
        return self.authenticator.required

    def relay_addr(self, conn: ControlConnection, protocol: str) -> p.RelayAddr:
        """Where ``conn``'s client opens data channels: the host it used to reach us."""
        return p.RelayAddr(host=conn.relay_host, port=self.config.public_port or self.port, protocol=protocol)

    # --- clients and sessions ---------------------------------------------------------------

    def _live_connections(self) -> list[ControlConnection]:
        with self._conn_lock:
            return list(self._connections)

    def connection_ended(self, conn: ControlConnection) -> None:
        with self._conn_lock:
            self._connections.discard(conn)
        self.pools.close(conn.pool)
        if conn.client_id and self.registry.unregister(conn.client_id, conn):
            log.info("client %s disconnected", conn.client_id)
            if self.cluster is not None:
                self.cluster.release(conn.client_id, conn.credential)
            # Sessions still waiting for this client cannot complete; running ones keep going
            # on their own sockets until they end (a direct one is forgotten here: it runs on, unseen).
            for session in self.sessions.for_client(conn.client_id):
                if not session.joined:
                    self.close_session(session, f"client '{conn.client_id}' went offline")
                elif session.direct_held:  # its reports and its end no longer reach us; it runs on
                    self.close_session(session, f"client '{conn.client_id}' went offline", notify=False)

    def drop_client(self, conn: ControlConnection, reason: str) -> None:
        """Take a client offline (heartbeat timeout, unregister) and close all its sessions."""
        if conn.client_id:
            log.info("client %s dropped: %s", conn.client_id, reason)
            if self.registry.unregister(conn.client_id, conn):
                if self.cluster is not None:
                    self.cluster.release(conn.client_id, conn.credential)
                for session in self.sessions.for_client(conn.client_id):
                    self.close_session(session, f"client '{conn.client_id}' {reason}")
        conn.close()

    def close_session(self, session: Session, reason: str, notify: bool = True) -> None:
        if not self.traffic.retire(session, self.sessions.remove):
            return
        session.close_sockets()
        if self.udp is not None and session.protocol == "udp":
            self.udp.forget(session)
        if self.cluster is not None:  # a party on another node hears of it through its node
            self.cluster.session_closed(session.id, reason, notify)
        if notify:
            for client_id in {session.client_a, session.client_b}:
                conn = self.registry.get(client_id)
                if conn is not None:
                    conn.send(p.SessionClosed(sessionId=session.id, reason=reason))

    # --- deadlines --------------------------------------------------------------------------

    def _housekeeping_loop(self) -> None:
        cfg = self.config
        tick = max(0.05, min(0.5, cfg.heartbeat_timeout / 4, cfg.session_join_timeout / 4))
        while not self.stopping.wait(tick):
            self.expire_once()
            self.sessions.trimmer.tick()

    def expire_once(self) -> None:
        cfg = self.config
        now = time.monotonic()
        for conn in self._live_connections():
            if conn.client_id is None and now - conn.opened > cfg.handshake_timeout:
                if not conn.closed:
                    self.metrics.registration_timeouts.inc()
                log.info("%s closed: no register within %g s", conn, cfg.handshake_timeout)
                conn.close()
            elif conn.client_id is not None and now - conn.last_seen > cfg.heartbeat_timeout:
                if self.registry.get(conn.client_id) is conn:
                    self.metrics.heartbeat_timeouts.inc()
                self.drop_client(conn, f"sent nothing for {cfg.heartbeat_timeout:g} s (heartbeat timeout)")
        for session, reason in self.sessions.expired(cfg.session_join_timeout, cfg.udp_idle_timeout,
                                                      cfg.tcp_idle_timeout):
            log.info("session %s closed: %s", session.id[:8], reason)
            self.close_session(session, reason)
        for session in self.sessions.unreported_direct(direct_claims.UNREPORTED_HOLD):
            self.close_session(session, "ended (went direct, unreported)", notify=False)  # it runs on, unseen

    # --- figures ----------------------------------------------------------------------------

    def status(self) -> dict:
        return {
            "version": __version__,
            "port": self.port,
            "uptime": time.time() - self.started_at if self.started_at else 0.0,
            "clients": len(self.registry),
            "sessions": len(self.sessions),
            "threads": len(self.threads),
            "udpBytesRelayed": self.udp.relayed_bytes if self.udp is not None else 0,
            # what clients claim went direct (direct_claims.py): unchecked, never part of what was relayed
            "directBytesReported": sum(self.traffic.direct_by_direction().values()),
            **({"cluster": self.cluster.status()} if self.cluster is not None else {}),
        }


def _dual_stack_if_wildcard(sock: socket.socket, host: str) -> None:
    """``::`` serves IPv4 too (as ::ffff:a.b.c.d), whatever the system's default."""
    if host == "::":
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)


def _timeval(seconds: float) -> bytes:
    whole = int(seconds)
    return struct.pack("ll", whole, int((seconds - whole) * 1e6))
