"""The relay's settings as one frozen value: ``ServerConfig``.

``Server(**kwargs)`` builds one from its keyword arguments, ``Server(config=...)`` takes one
as is; relay modules read ``server.config.x``. The defaults live here (and in the modules that
own each limit); checks that need no I/O run when a config is made, so a bad one never reaches
a socket. Secrets stay out of ``repr``.
"""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass, field
from types import MappingProxyType
from typing import Mapping

from common import auth
from common import protocol as p
from common.errors import ChuantouError

from . import admin_sessions, caps, pool
from .admission import DEFAULT_MAX_UNREGISTERED, DEFAULT_MAX_UNREGISTERED_PER_SOURCE
from .cluster_url import url_problem
from .handshakes import DEFAULT_MAX_PENDING, DEFAULT_MAX_PENDING_PER_SOURCE
from .registry import DEFAULT_MAX_RESERVED_PER_CREDENTIAL, DEFAULT_RESERVATION_TIME
from .udp import EARLY_QUEUE_BYTES, EARLY_QUEUE_TOTAL_BYTES, REGISTRATIONS_PER_SECOND

# where a cross-node session is pumped (cluster.py): B's node, or the live node with the fewest sessions
DATA_NODE_POLICIES = ("b", "least-loaded")


@dataclass(frozen=True)
class ServerConfig:
    """``token=None`` (and no other tokens) runs an open relay: any client may register.
    ``client_tokens`` maps a client ID to the only token that may register it;
    ``extra_tokens`` are further relay-wide tokens (one per person, say). A client ID can
    be taken over only with the token that registered it, while it is online and for
    ``id_reservation_time`` seconds after it goes offline (0: only while online); each
    token keeps at most ``max_reserved_ids_per_token`` offline IDs reserved.

    ``admin_token`` opens the admin page and API (never a registration token); None turns
    them off. Its login sessions expire after ``admin_session_idle`` seconds unused and
    ``admin_session_lifetime`` seconds in all; at most ``max_admin_sessions`` live at once.

    ``/metrics`` (metrics.py) is open to loopback peers while ``metrics_loopback_open``, and
    otherwise needs ``metrics_token`` or the admin credential."""

    host: str = "0.0.0.0"
    port: int = 8200  # 0: any free port (the bound one is Server.port)
    heartbeat_timeout: float = 25.0
    _: KW_ONLY
    public_host: str | None = None
    public_port: int | None = None
    session_join_timeout: float = 10.0
    udp_idle_timeout: float = 60.0
    handshake_timeout: float = 10.0
    max_message_size: int = p.MAX_MESSAGE_BYTES
    token: str | None = field(default=None, repr=False)
    client_tokens: Mapping[str, str] = field(default_factory=dict, repr=False)
    extra_tokens: tuple[str, ...] = field(default=(), repr=False)
    max_sessions_per_client: int = caps.DEFAULT_MAX_SESSIONS_PER_CLIENT
    max_udp_flows_per_client: int = caps.DEFAULT_MAX_UDP_FLOWS_PER_CLIENT
    max_sessions_per_target: int = caps.DEFAULT_MAX_SESSIONS_PER_TARGET
    max_sessions: int = caps.DEFAULT_MAX_SESSIONS
    max_pending_sessions_per_client: int = caps.DEFAULT_MAX_PENDING_SESSIONS_PER_CLIENT
    descriptor_reserve: int = caps.DEFAULT_DESCRIPTOR_RESERVE
    tcp_idle_timeout: float = 0.0  # 0: off (ssh sessions may idle for hours)
    max_pending_handshakes: int = DEFAULT_MAX_PENDING
    max_pending_handshakes_per_source: int = DEFAULT_MAX_PENDING_PER_SOURCE
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_only: bool = False
    id_reservation_time: float = DEFAULT_RESERVATION_TIME
    max_reserved_ids_per_token: int = DEFAULT_MAX_RESERVED_PER_CREDENTIAL
    # the admin page's credential and login sessions (admin_sessions.py)
    admin_token: str | None = field(default=None, repr=False)
    admin_session_idle: float = admin_sessions.DEFAULT_IDLE
    admin_session_lifetime: float = admin_sessions.DEFAULT_LIFETIME
    max_admin_sessions: int = admin_sessions.DEFAULT_MAX_SESSIONS
    admin_login_failures_per_minute: int = admin_sessions.DEFAULT_LOGIN_FAILURES_PER_MINUTE
    udp_early_queue_bytes: int = EARLY_QUEUE_BYTES
    udp_early_queue_total_bytes: int = EARLY_QUEUE_TOTAL_BYTES
    udp_registrations_per_second: float = REGISTRATIONS_PER_SECOND
    probe_port: int | None = None  # a second UDP port answering NAT probes (common.direct); 0: any free one
    data_channel_timeout: float = 30.0  # a silent data channel is dropped after it
    max_unregistered: int = DEFAULT_MAX_UNREGISTERED
    max_unregistered_per_source: int = DEFAULT_MAX_UNREGISTERED_PER_SOURCE
    metrics_token: str | None = field(default=None, repr=False)
    metrics_loopback_open: bool = True
    # a node of a relay cluster (cluster.py): None runs a relay on its own
    # redis://HOST:6379/0, or redis+cluster://HOST:PORT for a Redis Cluster (cluster_url.py; may hold a password)
    cluster_url: str | None = field(default=None, repr=False)
    node_id: str | None = None  # default: the host name and port
    advertise: str | None = None  # ws://HOST:PORT where clients reach this node (default: from host and port)
    cluster_ttl: float = 8.0  # seconds a killed node's keys outlive it
    # > 0: answer register with a redirect when this node has that many more clients than the least
    # loaded live node (cluster_redirect.py); 0: never redirect
    cluster_redirect_margin: int = 0
    data_node: str = "b"  # where a cross-node session is pumped: "b" (B's node) or "least-loaded"
    # bytes/s (0: off): each client's sending and its receiving over all its sessions, and every
    # byte the relay relays (bandwidth.py)
    bandwidth_per_client: int = 0
    bandwidth_total: int = 0
    # pooled data channels (pool.py): per registered client (0: no pooling), over all, and how long
    # an unbound one stays open
    max_pooled_channels_per_client: int = pool.DEFAULT_POOL_PER_CLIENT
    max_pooled_channels: int = pool.DEFAULT_MAX_POOLED
    pool_idle_timeout: float = pool.DEFAULT_POOL_IDLE_TIMEOUT

    def __post_init__(self) -> None:
        # Copies a caller cannot change under us (frozen only stops reassignment).
        object.__setattr__(self, "client_tokens", MappingProxyType(dict(self.client_tokens or {})))
        object.__setattr__(self, "extra_tokens", tuple(self.extra_tokens or ()))
        if self.admin_token is not None:
            problem = auth.token_problem(self.admin_token, "the admin token")
            if problem:
                raise ChuantouError(problem)
            if self.admin_token in self.registration_tokens():
                raise ChuantouError("the admin token must not be a client registration token: "
                                    "make a separate one with python -m chuantou_server token --admin")
        if self.metrics_token is not None:
            problem = auth.token_problem(self.metrics_token, "the metrics token")
            if problem:
                raise ChuantouError(problem)
            if self.metrics_token in self.registration_tokens():  # a client could read every client's figures
                raise ChuantouError("the metrics token must not be a client registration token: make a separate "
                                    "one (any random string of 16 or more characters)")
        problem = None if self.cluster_url is None else url_problem(self.cluster_url)
        if problem:
            raise ChuantouError(problem)
        if self.data_node not in DATA_NODE_POLICIES:
            raise ChuantouError(f"data_node must be one of {', '.join(DATA_NODE_POLICIES)}, not {self.data_node!r}")
        if self.cluster_ttl <= 0:
            raise ChuantouError("cluster_ttl must be a number of seconds > 0")
        margin = self.cluster_redirect_margin
        if isinstance(margin, bool) or not isinstance(margin, int) or margin < 0:
            raise ChuantouError("the redirect margin must be a whole number of clients >= 0 (0: never redirect)")
        for name in ("bandwidth_per_client", "bandwidth_total"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ChuantouError(f"{name} must be a whole number of bytes per second >= 0 (0: off)")
        for name in ("max_pooled_channels_per_client", "max_pooled_channels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= (64 if "client" in name else 1 << 20):
                raise ChuantouError(f"{name} must be a whole number >= 0 (0: no pooled data channels)"
                                    + (" and at most 64" if "client" in name else ""))
        if not self.pool_idle_timeout > 0:
            raise ChuantouError("pool_idle_timeout must be a number of seconds > 0")
        if self.tls_only and not self.tls_cert:
            raise ChuantouError("tls_only needs a certificate: pass --tls-cert and --tls-key")

    def registration_tokens(self) -> tuple[str, ...]:
        """Every token that may register some client (relay-wide and bound to one ID)."""
        relay_wide = (self.token,) if self.token is not None else ()
        return (*relay_wide, *self.client_tokens.values(), *self.extra_tokens)
