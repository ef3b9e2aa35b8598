"""The chuantou client: registers with the relay, serves as target (B) for other clients, and
runs proxies (A) that lead local ports to ports on other clients.

``Client(url, client_id).start()`` returns once registered; ``stop()`` closes every proxy,
session and socket and joins every thread.
"""

from __future__ import annotations

import logging
import random
import secrets
import threading
import time
from urllib.parse import urlsplit

from common import protocol as p
from common.errors import ChuantouError
from common.identity import generate as generate_identity
from common.threads import ThreadGroup
from common.tls import client_context, normalize_fingerprint

from .control import ControlChannel, split_server_urls
from .datachannel import TlsSettings
from .joining import SessionJoining
from .direct import DirectPaths
from .natprobe import probe_nat
from .directreport import TcpReports
from .export import ExportPolicy
from .pool import DEFAULT_POOL_COUNT, ChannelPool
from .proxy import Proxy
from .relays import IN_ORDER, ORDERS
from .sealing import Sealing
from .udpseal import KeyMailbox, SealStats
from .warmtarget import WarmHolds
from .selfguard import SelfGuard
from .sessions import SessionBook
from .target import PendingConnects, prepare_offer, serve_connect_request

log = logging.getLogger("chuantou.client")

DEFAULT_SERVER_URL = "ws://127.0.0.1:8200"


def generate_client_id() -> str:
    return "client-" + secrets.token_hex(4)


def check_server_url(url: str) -> str:
    """One relay URL, or several separated by commas (a cluster's nodes, tried in order)."""
    urls = split_server_urls(url)
    for one in urls:
        _check_one_server_url(one)
    return ",".join(urls)


def _check_one_server_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ChuantouError(f"server URL {url!r} must look like ws://HOST:8200 (or wss:// for TLS)")
    try:
        parts.port
    except ValueError:
        raise ChuantouError(f"server URL {url!r} has an invalid port") from None
    return url


def make_tls_settings(url: str, ca_file, fingerprint, insecure):
    """The TLS settings for a wss:// relay, or None for ws://."""
    if urlsplit(url).scheme != "wss":
        if ca_file or fingerprint or insecure:
            raise ChuantouError("--ca, --tls-fingerprint and --tls-insecure need a wss:// server URL")
        return None
    if fingerprint:
        fingerprint = normalize_fingerprint(fingerprint)
    if insecure and not fingerprint:
        log.warning("TLS certificate verification is OFF (--tls-insecure): anyone on the path can read and "
                    "change this client's traffic; use --ca or --tls-fingerprint instead")
    return TlsSettings(client_context(ca_file, fingerprint, insecure), fingerprint)


class Client(SessionJoining):
    def __init__(
        self,
        server_url: str = DEFAULT_SERVER_URL,
        client_id: str | None = None,
        *,
        heartbeat_interval: float = 5.0,
        heartbeat_timeout: float = 25.0,
        connect_timeout: float = 10.0,
        request_timeout: float = 10.0,
        reconnect_max_delay: float = 30.0,
        udp_idle_timeout: float = 60.0,
        udp_keepalive: float = 15.0,  # UDP flows re-prove their address this often (NAT mappings, relay restarts)
        target_host: str = "127.0.0.1",
        token: str | None = None,
        allow: str | None = None,
        allow_hosts=(),
        ca_file: str | None = None,
        tls_fingerprint: str | None = None,
        tls_insecure: bool = False,
        data_channel_timeout: float = 30.0,
        max_pending_connects: int = 256,
        identity=None,
        known_clients=None,
        allow_from=(),
        path: str = "auto",
        direct_deadline: float = 1.0,
        direct_keepalive: float = 2.0,
        direct_retry: float = 5.0,
        allow_unsealed: bool = False,
        server_order: str = IN_ORDER,
        server_order_seed: int | None = None,
        pool_count: int = DEFAULT_POOL_COUNT,
    ):
        """``token``: the relay's token (or this ID's own). ``allow``: ports other clients may
        reach here, e.g. ``"22,3000-3999"`` or ``"none"`` (default: all, on ``target_host``
        only); ``allow_hosts``: further hosts of this network they may reach. With a
        ``wss://`` URL the control channel and every data channel use TLS, verified against
        the system CAs, or ``ca_file``, or pinned by ``tls_fingerprint`` (SHA-256). ``max_pending_connects``: sessions B sets up at once (more are refused).

        No session reaches this client's own proxies, nor a socket given to ``protect_socket``
        (the local API), whatever ``allow`` says.

        TCP sessions are sealed end to end (sealing.py) with ``identity`` (a common.identity
        Identity; default: a new one in memory), pinning peers' keys in ``known_clients`` (a
        KnownClients; default: in memory); ``allow_from``: the IDs and SHA256 fingerprints that
        may reach this client (default: any peer that passes its pin). UDP sessions are sealed too
        (udpseal.py). ``allow_unsealed``: run sessions in the clear with peers that cannot seal
        (registered without a key); refused by default.

        ``path``: whether new TCP sessions and UDP flows try a direct path to the peer first
        ("auto": try, and fall back to the relay after ``direct_deadline`` seconds; "relay": never;
        "direct": try every one, and end it rather than relay it; see direct.py, directtcp.py).
        Either path carries the same sealed bytes and datagrams. A direct UDP flow pings its peer
        every ``direct_keepalive`` seconds and ends when the path went silent for three of them (a
        direct TCP session's connection: keepalive and TCP_USER_TIMEOUT of as long); a
        pair whose attempt failed (or whose path died) is tried again after ``direct_retry``
        seconds, doubling per failure up to 300 s.

        ``server_order``: with several URLs in ``server_url`` (a cluster's nodes), "in-order" tries
        them as given, "random" in an order shuffled once per start (``server_order_seed`` makes
        that order reproducible); see relays.py.

        ``pool_count``: data channels kept open to the relay ahead of sessions (pool.py; 0: none),
        so that a session joins without a new connection."""
        self.server_url = check_server_url(server_url)
        if server_order not in ORDERS:
            raise ChuantouError(f"server order {server_order!r} is invalid: use one of {', '.join(ORDERS)}")
        self.server_order = server_order
        self.client_id = client_id or generate_client_id()
        if not p.CLIENT_ID_PATTERN.match(self.client_id):
            raise ChuantouError(
                f"client ID {self.client_id!r} is invalid: use 1-64 letters, digits, '.', '_' or '-'"
            )
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        self.udp_idle_timeout = udp_idle_timeout
        self.udp_keepalive = udp_keepalive
        self.data_channel_timeout = data_channel_timeout  # keepalive and TCP_USER_TIMEOUT of data channels
        self.target_host = target_host
        self.export = ExportPolicy(allow, allow_hosts, target_host)
        self.self_guard = SelfGuard()
        self.pending_connects = PendingConnects(max_pending_connects)
        self.warm_holds = WarmHolds()  # warm sessions of other clients held here, waiting for their go
        self.tls = make_tls_settings(self.server_url, ca_file, tls_fingerprint, tls_insecure)
        if isinstance(pool_count, bool) or not isinstance(pool_count, int) or not 0 <= pool_count <= 64:
            raise ChuantouError(f"pool count {pool_count!r} must be a whole number from 0 to 64 (0: no pooled "
                                f"data channels)")
        self.sealing = Sealing(identity or generate_identity(), known_clients, allow_from, timeout=request_timeout)
        self.allow_unsealed = allow_unsealed  # sessions with peers that cannot seal (older clients) run in the clear
        self.udp_keys = KeyMailbox()  # the peers' halves of sealed UDP sessions' key exchanges
        self.udp_seal_stats = SealStats()  # datagrams ended UDP sessions dropped (running ones count their own)
        self.threads = ThreadGroup(f"chuantou-client-{self.client_id}")
        self.pool = ChannelPool(pool_count, self.threads, self.tls, request_timeout)
        self.direct = DirectPaths(path, direct_deadline, direct_keepalive, direct_retry)
        self.sessions = SessionBook()  # every session as A and as B, and what is left of ended ones
        self.tcp_reports = TcpReports(self)  # what direct TCP sessions tell the relay
        self.control = ControlChannel(
            self.server_url, self.client_id, self.threads, self._on_message,
            heartbeat_interval=heartbeat_interval, heartbeat_timeout=heartbeat_timeout,
            connect_timeout=connect_timeout, reconnect_max_delay=reconnect_max_delay, token=token, tls=self.tls,
            on_lost=self._settle_sessions, public_key=self.sealing.identity.public_key_b64,
            on_registered=self._registered, on_tick=self._tick,
            server_order=server_order, order_rng=random.Random(server_order_seed),
        )
        self.started_at: float | None = None
        self._proxies: list[Proxy] = []
        self._lock = threading.Lock()
        self._started = False
        self._stopped = False

    def __repr__(self) -> str:
        return f"<Client {self.client_id} -> {self.server_url} ({self.control.state})>"

    # --- lifecycle --------------------------------------------------------------------------

    def __enter__(self) -> "Client":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout: float | None = None, wait: bool = True) -> "Client":
        """Connect and register; raise ChuantouError if that does not happen within ``timeout``.

        With ``wait=False`` return at once and keep trying in the background (what a service
        wants when the relay is not up yet).
        """
        if self._started:
            return self
        self._started = True
        self.started_at = time.time()
        log.info("client %s %s", self.client_id, self.export.describe())
        self.control.start()
        self.pool.start()
        if not wait:
            return self
        deadline = time.monotonic() + (timeout if timeout is not None else self.connect_timeout)
        while not self.control.registered.is_set():
            if self.control.finished.is_set() or time.monotonic() >= deadline:
                reason = self.control.last_error or "no answer"
                refused = self.control.state == "failed"
                self.stop()
                if refused:
                    raise ChuantouError(f"cannot register with the relay at {self.server_url}: {reason}")
                raise ChuantouError(
                    f"cannot register with the relay at {self.server_url}: {reason}; "
                    f"check that the server is running and that --server points at it"
                )
            self.control.registered.wait(0.05)
        return self

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        for proxy in list(self._proxies):
            proxy.close()
        self.control.stop()
        self.direct.stop_tcp()
        self.pool.stop()
        self.sessions.abort_all()
        self.warm_holds.abort_all()
        self.threads.join_all(timeout=10.0)

    @property
    def connected(self) -> bool:
        return self.control.registered.is_set()

    def wait_connected(self, timeout: float) -> bool:
        return self.control.registered.wait(timeout)

    # --- what users call --------------------------------------------------------------------

    def list_clients(self) -> list[str]:
        reply = self.control.request(p.GetClientList(), timeout=self.request_timeout)
        return [c.id for c in reply.clients]

    def create_proxy(self, local_port: int, target_client_id: str, target_port: int,
                     protocol: str = "both", local_host: str = "127.0.0.1", target_host: str | None = None,
                     target_fingerprint: str | None = None, bandwidth: int | str = 0,
                     allow_unsealed: bool = False, warm: int = 0) -> Proxy:
        """Listen on ``local_host:local_port``; each connection there reaches ``target_port`` on
        the target client (on ``target_host`` of its network, if that client allows it).
        Raises PortInUseError if the local port is taken. ``target_fingerprint`` pins the
        target's key (SHA256:...) before the first session. ``bandwidth`` (bytes/s, or text
        such as "10MiB/s"; 0: none) limits each direction, over all the proxy's connections;
        ``allow_unsealed`` lets this proxy reach a target that cannot seal (an older chuantou)
        in the clear. ``warm``: TCP sessions kept set up ahead of users (warm.py). 0 here, so a
        program embedding the client opens exactly the sessions its users do; the CLI and the
        saved config default to warm.DEFAULT_WARM."""
        if self._stopped:
            raise ChuantouError("this client is stopped; create a new Client")
        proxy = Proxy(self, local_port, target_client_id, target_port, protocol, local_host, target_host,
                      target_fingerprint, bandwidth, allow_unsealed, warm).open()
        with self._lock:
            self._proxies.append(proxy)
        return proxy

    def protect_socket(self, sock) -> None:
        """Keep sessions away from ``sock``, a TCP socket this program listens on (its API)."""
        self.self_guard.protect(sock, "tcp")

    @property
    def proxies(self) -> list[Proxy]:
        with self._lock:
            return list(self._proxies)

    def status(self) -> dict:
        return {
            "clientId": self.client_id,
            "fingerprint": self.sealing.fingerprint,
            "serverUrl": self.server_url,
            "serverOrder": self.server_order,
            "relayUrl": self.control.url,  # the one in use or being tried (a redirect may have led there)
            "state": self.control.state,
            "lastError": self.control.last_error,
            "nextAttemptAt": self.control.next_attempt_at,
            "reconnects": self.control.reconnects,
            "startedAt": self.started_at,
            "activeSessions": len(self.sessions),
            "exports": self.export.describe(),
            "proxies": [proxy.info() for proxy in self.proxies],
            "direct": self.direct.describe(),
        }

    def connections(self) -> list[dict]:
        """Sessions running through this client, as A (from a proxy) and as B (to a local port)."""
        out = [record.connection_info() for record in self.sessions.records()]
        out.sort(key=lambda c: c["startedAt"])
        return out

    def byte_totals(self) -> tuple[int, int]:
        """(received, sent) through the relay since start: proxies (A) plus sessions as B."""
        received, sent = self.sessions.byte_totals()
        for proxy in self.proxies:
            received, sent = received + proxy.bytes_received, sent + proxy.bytes_sent
        return received, sent

    # --- used by proxies and the target side ------------------------------------------------

    def seal_counts(self) -> dict:
        """Datagrams sealed UDP sessions dropped (rejected: forged or altered; replayed; tooBig)
        and passed, over ended and running sessions."""
        total = SealStats()
        total.add(self.udp_seal_stats)
        for record in self.sessions.records():
            seal = getattr(record.handle, "seal", None)
            if seal is not None:
                total.add(seal.stats)
        return total.as_dict()

    def _tick(self) -> None:
        """Every heartbeat interval (on the heartbeat thread)."""
        self.sessions.trimmer.tick()
        self.tcp_reports.tick()

    def _settle_sessions(self, why: str) -> None:
        """The control channel ended: the relay closes every session of ours when it drops us, and
        behind a dead link its resets never arrive. Reset our TCP sessions now so no user waits
        on a connection that can never finish (UDP flows open new sessions on their own)."""
        self.pool.reset(None)  # the relay closes a registration's pooled channels with it
        for proxy in self.proxies:
            proxy.warm.drop(f"connection to the relay ended ({why})")
        self.warm_holds.abort_all()
        count = self.sessions.abort_all(tcp_only=True)
        if count:
            log.warning("connection to the relay ended (%s): resetting %d session(s) it no longer relays", why, count)

    def forget_proxy(self, proxy: Proxy) -> None:
        """A proxy closed: drop it, keeping its bytes in the totals."""
        received, sent = proxy.bytes_received, proxy.bytes_sent
        with self._lock:
            known = proxy in self._proxies
            if known:
                self._proxies.remove(proxy)
        if known:
            self.sessions.add_bytes(received, sent)

    def end_session(self, session_id: str, reason: str) -> None:
        """Tell the relay a session ended here (UDP flows end without a socket closing at the relay)."""
        if self.sessions.close_reason(session_id) is not None or not self.connected:
            return
        try:
            self.control.send(p.SessionClosed(sessionId=session_id, reason=reason))
        except ChuantouError:
            pass  # the relay's own idle expiry will end it

    def _registered(self, reply: p.RegisterResponse) -> None:
        """After each registration, find out what our NAT does (a thread: the caller reads the relay)."""
        self.pool.reset(reply.pool)  # an older relay offers no pool
        self.direct.relay_knows = reply.udpPort is not None  # an older relay knows no direct path
        for proxy in self.proxies:  # (after relay_knows: whether warm sessions apply depends on it)
            proxy.warm.registered()
        if not self.direct.relay_knows:
            self.direct.nat = {"mapping": "unknown (the relay offers no direct path: an older version)",
                               "filtering": "filtering unknown"}
            return
        try:
            self.threads.spawn("nat-probe", self._probe_nat, reply)
        except RuntimeError:
            pass

    def _probe_nat(self, reply: p.RegisterResponse) -> None:
        url = urlsplit(self.control.url)  # the relay we registered with (of several, the one in use)
        host = url.hostname or "127.0.0.1"
        port = reply.udpPort or url.port or (443 if url.scheme == "wss" else 80)
        self.direct.nat = probe_nat(host, port, reply.probePort, self.control.stopping_event)
        log.info("NAT: %s, %s", self.direct.nat["mapping"], self.direct.nat["filtering"])

    def _on_message(self, msg) -> None:
        """Messages the relay starts; runs on the control reader thread, so it must not block."""
        if isinstance(msg, p.ConnectOffer):
            prepared = prepare_offer(self, msg)  # checks and the join header, here: no thread hand-off first
            if prepared is None:
                return
            try:
                self.threads.spawn(f"target-{msg.sessionId[:8]}", serve_connect_request, self, msg, prepared)
            except RuntimeError:
                prepared.abandon()
                log.warning("cannot start a thread for a session from %s", msg.fromClientId)
        elif isinstance(msg, p.SessionKeys):
            self.udp_keys.post(msg)
        elif isinstance(msg, p.SessionClosed):
            self._session_closed(msg)
        elif isinstance(msg, p.PeerCandidates):
            self.direct.deliver(msg)
        elif isinstance(msg, p.PathSync):
            self.direct.deliver_sync(msg)
        elif isinstance(msg, p.Error) and msg.code == "unknown_session":
            # our accept/reject crossed the session's end (the user hung up first): a normal race
            log.debug("relay reported: %s", msg.message)
        elif isinstance(msg, p.Error):
            log.warning("relay reported: %s", msg.message)

    def _session_closed(self, msg: p.SessionClosed) -> None:
        handle, owner = self.sessions.closed(msg.sessionId, msg.reason)
        if any(proxy.warm.closed(msg.sessionId) for proxy in self.proxies):
            log.info("warm session %s... closed by the relay (a new one replaces it): %s", msg.sessionId[:8],
                     msg.reason)
        elif p.is_normal_end(msg.reason):  # e.g. a UDP flow that went idle: nothing to act on
            log.debug("session %s... ended: %s", msg.sessionId[:8], msg.reason)
        else:
            log.warning("session %s... closed by the relay: %s", msg.sessionId[:8], msg.reason)
            if owner is not None:
                owner.record_failure(msg.reason)
        self.udp_keys.cancel(msg.sessionId)  # wakes a UDP flow waiting for the peer's keys
        if handle is not None:
            handle.abort()
