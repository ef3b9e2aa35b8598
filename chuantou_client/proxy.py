"""The gateway side (A): a local port whose connections and datagrams lead to a port on the
target client (B) through the relay.

One listener thread per protocol. Each accepted TCP connection asks the relay for a
session, joins its data channel and is pumped by a Pipe; UDP peers are handled in udp.py.
A bandwidth limit is one RateLimit per direction, shared by every connection and flow of the
proxy: TCP waits for it (backpressure), UDP drops what is over it and counts the drops.
"""

from __future__ import annotations

import errno
import logging
import socket
import threading
import time

from common import protocol as p
from common.errors import ChuantouError, PortInUseError
from common.bandwidth import parse_bandwidth
from common.identity import check_fingerprint
from common.limits import RateLimit
from common.net import arm_reset, close_quietly, reset_connection, tune_tcp
from common.pipe import Pipe
from common.threads import ThreadGroup

from . import directchoice
from .earlyjoin import EarlyJoin
from .listen import DEFAULT_LOCAL_HOST, exposure_warning, listen_address, parse_local_host
from .pending import PendingRequest
from .udp import UdpGateway
from .warm import WarmPool

log = logging.getLogger("chuantou.client")

PROTOCOL_CHOICES = ("tcp", "udp", "both")


class Proxy:
    """A running proxy: ``localhost:local_port -> target_client_id:target_port``. Close with ``close()``."""

    def __init__(self, client, local_port: int, target_client_id: str, target_port: int,
                 protocol: str = "both", local_host: str = DEFAULT_LOCAL_HOST, target_host: str | None = None,
                 target_fingerprint: str | None = None, bandwidth: int | str = 0,
                 allow_unsealed: bool = False, warm: int = 0):
        _check_proxy_args(local_port, target_client_id, target_port, protocol)
        if target_host is not None and not p.HOST_PATTERN.match(target_host):
            raise ChuantouError(f"target host {target_host!r} is not a host name or IP address")
        self.target_host = target_host
        # the target's key, pinned before the first session (else known_clients decides)
        self.target_fingerprint = check_fingerprint(target_fingerprint) if target_fingerprint else None
        self.allow_unsealed = allow_unsealed  # with a target that cannot seal: run its sessions in the clear
        self.client = client
        self.local_port = local_port
        self.local_host = parse_local_host(local_host)
        self.target_client_id = target_client_id
        self.target_port = target_port
        self.protocol = protocol
        self.bandwidth = parse_bandwidth(bandwidth or 0)  # bytes/s each way; 0: no limit
        # (user -> target, target -> user), shared by all of this proxy's connections and flows
        self.limits: tuple[RateLimit | None, RateLimit | None] = (
            (RateLimit(self.bandwidth), RateLimit(self.bandwidth)) if self.bandwidth else (None, None))
        self.bandwidth_drops = 0  # UDP datagrams dropped over the limit, both directions
        self.threads = ThreadGroup(f"chuantou-proxy-{local_port}")
        self.connections_total = 0
        self._done_bytes = [0, 0]  # of finished connections: user->target, target->user
        self._pipes: set[Pipe] = set()
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._tcp: socket.socket | None = None
        self._guard_keys: list[tuple] = []
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.udp: UdpGateway | None = None
        self.warm = WarmPool(self, warm)  # TCP sessions set up ahead of their users (warm.py)

    def __repr__(self) -> str:
        return f"<Proxy {self.local_host}:{self.local_port} -> {self.target_client_id}:{self.target_port} {self.protocol}>"

    @property
    def description(self) -> str:
        return f"{listen_address(self.local_host, self.local_port)} -> {self.target}"

    @property
    def target(self) -> str:
        host = f"{self.target_host}:" if self.target_host else ""
        return f"{self.target_client_id}:{host}{self.target_port}"

    @property
    def exposure_warning(self) -> str | None:
        """Why listening off loopback is worth a second thought (None on loopback)."""
        return exposure_warning(self.local_host, self.local_port, self.target)

    # --- lifecycle --------------------------------------------------------------------------

    def open(self) -> "Proxy":
        """Bind the local port(s) (raising PortInUseError if taken) and start listening."""
        tcp, udp = _bind_proxy_sockets(self.local_host, self.local_port, self.protocol)
        self._tcp = tcp
        if tcp is not None:
            self.local_port = tcp.getsockname()[1]
        if udp is not None:
            self.local_port = udp.getsockname()[1]
            self.udp = UdpGateway(self, udp)
        self.threads.prefix = f"chuantou-proxy-{self.local_port}"
        self._guard_keys = [self.client.self_guard.protect(sock, kind)
                            for sock, kind in ((tcp, "tcp"), (udp, "udp")) if sock is not None]
        if tcp is not None:
            self.threads.spawn("tcp", self._accept_loop)
            self.warm.start()
        if self.udp is not None:
            self.threads.spawn("udp", self.udp.run)
        log.info("proxy created: %s (%s)", self.description, self.protocol)
        if self.exposure_warning:
            log.warning("%s", self.exposure_warning)
        return self

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        for key in self._guard_keys:
            self.client.self_guard.release(key)
        close_quietly(self._tcp)
        self.warm.stop()
        if self.udp is not None:
            self.udp.close()
        with self._lock:
            pipes = list(self._pipes)
        for pipe in pipes:
            pipe.abort()
        self.threads.join_all(timeout=5.0)
        self.client.forget_proxy(self)
        log.info("proxy closed: %s", self.description)

    def __enter__(self) -> "Proxy":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    # --- figures ----------------------------------------------------------------------------

    @property
    def active_connections(self) -> int:
        with self._lock:
            tcp = len(self._pipes)
        return tcp + (self.udp.active_flows if self.udp else 0)

    @property
    def bytes_sent(self) -> int:
        """Bytes from local users towards the target."""
        with self._lock:
            total = self._done_bytes[0] + sum(pipe.sent[0] for pipe in self._pipes)
        return total + (self.udp.bytes[0] if self.udp else 0)

    @property
    def bytes_received(self) -> int:
        with self._lock:
            total = self._done_bytes[1] + sum(pipe.sent[1] for pipe in self._pipes)
        return total + (self.udp.bytes[1] if self.udp else 0)

    def info(self) -> dict:
        return {
            "localPort": self.local_port,
            "localHost": self.local_host,
            "targetClientId": self.target_client_id,
            "targetPort": self.target_port,
            "targetHost": self.target_host,
            "protocol": self.protocol,
            "bandwidth": self.bandwidth,
            "bandwidthDrops": self.bandwidth_drops,
            "targetFingerprint": self.target_fingerprint,
            # sessions are sealed end to end unless the target cannot seal and unsealed ones are allowed
            "sealed": self.sealed_state(),
            "allowUnsealed": self.allow_unsealed,
            # sessions set up ahead of users (not users' connections: activeConnections leaves them out)
            "warm": self.warm.count,
            "warmState": self.warm.state(),
            "warmReady": self.warm.ready,
            "warmTaken": self.warm.taken,
            "activeConnections": self.active_connections,
            "totalConnections": self.connections_total,
            "bytesSent": self.bytes_sent,
            "bytesReceived": self.bytes_received,
            "lastError": self.last_error,
            "lastErrorAt": self.last_error_at,
        }

    def sealed_state(self) -> str:
        """"sealed", or "unsealed allowed" when a target that cannot seal may be reached in the clear."""
        return "unsealed allowed" if self.allow_unsealed or self.client.allow_unsealed else "sealed"

    def record_failure(self, reason: str) -> None:
        """Remember why the latest connection through this proxy failed, for `proxy list` and the page."""
        self.last_error = reason
        self.last_error_at = time.time()

    # --- TCP --------------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        assert self._tcp is not None  # open() runs this loop only with a TCP listener
        while not self._closed.is_set():
            try:
                user, addr = self._tcp.accept()
            except OSError:
                if self._closed.is_set():
                    return
                self._closed.wait(0.1)  # e.g. out of file descriptors: do not spin
                continue
            tune_tcp(user)
            arm_reset(user)  # should this process die, the user sees a reset, not an end of stream
            self.connections_total += 1
            self._start_connection(user, addr)

    def _start_connection(self, user: socket.socket, addr: tuple) -> None:
        """Ask for the session here, so the relay's answer travels while the connection's thread
        starts; the control reader sends the join header on a pooled channel as the answer comes.
        A warm session, if one is ready, skips all of that (warm.py)."""
        if self.warm.serve(user, addr):
            return
        early = EarlyJoin.take(self.client, "A")
        try:
            pending = self.client.control.start_request(self.connect_request("tcp"), on_reply=early.send_header)
        except ChuantouError as exc:
            early.close()
            self._connection_failed(user, addr, exc)
            return
        try:
            self.threads.spawn(f"conn-{addr[1]}", self._serve_connection, user, addr, pending, early)
        except RuntimeError:
            pending.cancel()  # the relay's session, if it makes one, expires unjoined
            early.close()
            log.warning("proxy :%d: cannot start a thread; connection from %s closed", self.local_port, addr)
            close_quietly(user)

    def _serve_connection(self, user: socket.socket, addr: tuple, pending: PendingRequest, early: EarlyJoin) -> None:
        try:
            reply = pending.wait(self.client.request_timeout)
        except ChuantouError as exc:
            early.close()
            self._connection_failed(user, addr, exc)
            return
        with self.client.sessions.track(reply.sessionId, "A", **self.session_facts("tcp")) as record:
            try:
                relay = self.client.join_session(record, reply, early)
                sealed = directchoice.seal_a(self.client, self, relay, reply, record)
                record.sealed = sealed is not relay
                relay = sealed
            except ChuantouError as exc:
                self._connection_failed(user, addr, exc)
                return
            self.pump(user, relay, reply.sessionId, record)

    def pump(self, user: socket.socket, relay, session_id: str, record, already_sent: int = 0) -> None:
        """Pump a user's connection through its joined (and sealed) session until both end
        (``already_sent``: bytes of the user's the caller forwarded itself, counted here)."""
        pipe = Pipe(user, relay, on_done=self._connection_done, limits=self.limits)
        pipe.sent[0] += already_sent
        with self._lock:
            if self._closed.is_set():
                pipe.abort()
            self._pipes.add(pipe)
        self.client.sessions.attach(record, pipe)
        try:
            pipe.run(self.threads, f"a-{session_id[:8]}")
        finally:
            self.client.tcp_reports.ended(record, pipe)  # a direct session's last report and end

    def _connection_failed(self, user: socket.socket, addr: tuple, exc: ChuantouError) -> None:
        log.warning("proxy %s: connection from %s:%s closed: %s", self.description, addr[0], addr[1], exc)
        self.record_failure(str(exc))
        reset_connection(user)  # the session never started: the user must not see a clean end

    def udp_allowed(self, direction: int, size: int) -> bool:
        """May a datagram of ``size`` bytes go ``direction`` (0: to the target) now? Counts a drop if not."""
        limit = self.limits[direction]
        if limit is None or limit.try_take(size):
            return True
        with self._lock:  # the gateway's thread and every flow's thread drop here
            self.bandwidth_drops += 1
        return False

    def connect_request(self, protocol: str) -> p.ConnectRequest:
        return p.ConnectRequest(toClientId=self.target_client_id, remotePort=self.target_port,
                                remoteHost=self.target_host, protocol=protocol, localPort=self.local_port)

    def session_facts(self, protocol: str) -> dict:
        """What the session book records of a session this proxy asked for (side A)."""
        return {"peer": self.target_client_id, "port": self.target_port, "protocol": protocol,
                "local_port": self.local_port, "owner": self}

    def _connection_done(self, pipe: Pipe) -> None:
        with self._lock:
            self._pipes.discard(pipe)
            self._done_bytes[0] += pipe.sent[0]
            self._done_bytes[1] += pipe.sent[1]


def _check_proxy_args(local_port, target_client_id, target_port, protocol) -> None:
    if not isinstance(local_port, int) or not 0 <= local_port <= 65535:
        raise ChuantouError(f"local port {local_port!r} is not a port number (1-65535)")
    if not isinstance(target_port, int) or not 1 <= target_port <= 65535:
        raise ChuantouError(f"target port {target_port!r} is not a port number (1-65535)")
    if not isinstance(target_client_id, str) or not p.CLIENT_ID_PATTERN.match(target_client_id):
        raise ChuantouError(f"target client ID {target_client_id!r} is not a valid client ID")
    if protocol not in PROTOCOL_CHOICES:
        raise ChuantouError(f"protocol {protocol!r} must be one of tcp, udp, both")


def _dual_stack_if_all(sock: socket.socket, host: str) -> None:
    """``::`` means every address, IPv4 ones too, whatever the system's bindv6only says."""
    if host == "::":
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)


def _bind_proxy_sockets(host: str, port: int, protocol: str):
    """Bind what the protocol needs on one port number; PortInUseError names the port if taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(20 if port == 0 else 1):
        tcp = udp = None
        try:
            if protocol in ("tcp", "both"):
                tcp = socket.socket(family, socket.SOCK_STREAM)
                tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                _dual_stack_if_all(tcp, host)
                tcp.bind((host, port))
                tcp.listen(512)
            if protocol in ("udp", "both"):
                udp = socket.socket(family, socket.SOCK_DGRAM)
                _dual_stack_if_all(udp, host)
                udp.bind((host, tcp.getsockname()[1] if tcp else port))
            return tcp, udp
        except OSError as exc:
            close_quietly(tcp)
            close_quietly(udp)
            if port == 0:
                continue
            if exc.errno == errno.EADDRINUSE:
                raise PortInUseError(port, host) from None
            if exc.errno == errno.EACCES:
                raise ChuantouError(f"no permission to listen on port {port} (ports below 1024 need "
                                    f"administrator rights); choose another with --local-port") from None
            if exc.errno == errno.EADDRNOTAVAIL:
                raise ChuantouError(f"cannot listen on {listen_address(host, port)}: no network interface of this "
                                    f"machine has the address {host}; choose another with --local-host") from None
            raise ChuantouError(f"cannot listen on {listen_address(host, port)}: {exc.strerror or exc}") from None
    raise ChuantouError("could not find a local port free for both TCP and UDP")
