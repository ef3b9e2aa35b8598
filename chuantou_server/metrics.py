"""The relay's Prometheus metrics (``GET /metrics``) and its health check (``GET /healthz``).

Each Server has its own ``CollectorRegistry``, so relays in one process never share figures.
What the relay already knows is read live at each scrape by ``LiveFigures`` (clients, open
sessions, bytes a running pipe has moved, handshakes, threads, UDP drops); only events the
relay keeps no count of (sessions opened and refused, heartbeat and registration timeouts,
cross-node requests) are prometheus_client counters, bumped where they happen. Every label
takes values from a small fixed set (protocols, directions, the reasons below), never from
what a peer sends; the one exception is ``node`` on a cluster node's per-node gauges, whose
values are the node IDs the operator gave the cluster's relays (read from the node table).

Who may scrape: see ``access()``; the health check needs no credential and says nothing.
"""

from __future__ import annotations

import hmac
import ipaddress
import threading
import time
from typing import TYPE_CHECKING, Iterator

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from . import caps, udp

if TYPE_CHECKING:
    from .server import Server

PROTOCOLS = ("tcp", "udp")
DIRECTIONS = ("a_to_b", "b_to_a")  # A: the gateway client that asked, B: the target
# Why a session was refused, besides the caps' own limits (caps.LIMITS):
TARGET_OFFLINE = "target_offline"
TARGET_IS_SELF = "target_is_self"
WARM_UNSUPPORTED = "warm_unsupported"  # a warm session asked of a target that cannot hold one
REFUSAL_REASONS = (TARGET_OFFLINE, TARGET_IS_SELF, WARM_UNSUPPORTED, *caps.LIMITS)

# Why a cross-node request (a connect_request for a client on another node) got no session:
STORE_UNREACHABLE = "store_unreachable"  # not sent: Redis did not answer
NODE_SILENT = "node_silent"  # sent to the target's node, which nobody there listened to
LIMIT = "limit"  # the data node's caps
TIMEOUT = "timeout"  # the data node did not answer within cluster.REQUEST_TIMEOUT
OTHER = "other"  # a refusal code this node does not know (a newer data node)
CLUSTER_REFUSAL_REASONS = (STORE_UNREACHABLE, TARGET_OFFLINE, NODE_SILENT, LIMIT, TIMEOUT, OTHER)

ALLOWED, DENIED, LIMITED = "allowed", "denied", "limited"


class RelayMetrics:
    """One relay's registry: its live figures, its event counters and the process's own."""

    def __init__(self, server: Server):
        self.registry = CollectorRegistry()
        self.sessions_opened = Counter("chuantou_relay_sessions_opened", "Sessions the relay created, by protocol",
                                       ["protocol"], registry=self.registry)
        self.sessions_refused = Counter("chuantou_relay_sessions_refused",
                                        "Session requests the relay refused, by protocol and reason",
                                        ["protocol", "reason"], registry=self.registry)
        self.heartbeat_timeouts = Counter("chuantou_relay_heartbeat_timeouts",
                                          "Clients dropped for sending nothing within the heartbeat timeout",
                                          registry=self.registry)
        self.registration_timeouts = Counter("chuantou_relay_registration_timeouts",
                                             "Control channels closed for not registering in time",
                                             registry=self.registry)
        for protocol in PROTOCOLS:  # every series from the start, so a rate() has a zero to begin with
            self.sessions_opened.labels(protocol)
            for reason in REFUSAL_REASONS:
                self.sessions_refused.labels(protocol, reason)
        self.cluster_requests_sent: Counter | None = None  # only on a cluster node
        self.cluster_requests_refused: Counter | None = None
        if server.config.cluster_url is not None:
            self.cluster_requests_sent = Counter(
                "chuantou_relay_cluster_requests_sent", "Session requests this node sent to another node "
                "(its client asked for a client there)", registry=self.registry)
            self.cluster_requests_refused = Counter(
                "chuantou_relay_cluster_requests_refused", "Session requests for a client on another node that got "
                "no session, by reason (store_unreachable and target_offline ones were never sent)",
                ["reason"], registry=self.registry)
            for reason in CLUSTER_REFUSAL_REASONS:
                self.cluster_requests_refused.labels(reason)
        self.registry.register(LiveFigures(server))
        ProcessCollector(registry=self.registry)  # process_open_fds, process_max_fds, CPU, memory

    def session_refused(self, protocol: str, reason: str) -> None:
        if protocol in PROTOCOLS and reason in REFUSAL_REASONS:
            self.sessions_refused.labels(protocol, reason).inc()

    def session_opened(self, protocol: str) -> None:
        if protocol in PROTOCOLS:
            self.sessions_opened.labels(protocol).inc()

    def cluster_request_sent(self) -> None:
        if self.cluster_requests_sent is not None:
            self.cluster_requests_sent.inc()

    def cluster_request_refused(self, reason: str) -> None:
        if self.cluster_requests_refused is not None:
            self.cluster_requests_refused.labels(reason if reason in CLUSTER_REFUSAL_REASONS else OTHER).inc()

    def exposition(self, accept: str) -> tuple[str, bytes]:
        """(content type, body) in the text format the scraper asked for (Prometheus or OpenMetrics)."""
        encoder, content_type = choose_encoder(accept)
        return content_type, encoder(self.registry)


class LiveFigures(Collector):
    """Figures read from the relay's own state at each scrape (nothing counted twice)."""

    def __init__(self, server: Server):
        self.server = server

    def collect(self) -> Iterator:
        server = self.server
        yield _gauge("chuantou_relay_clients_online", "Registered clients", len(server.registry))
        yield self._sessions_open()
        yield self._bytes_relayed()
        yield self._bytes_direct_reported()
        stages = GaugeMetricFamily("chuantou_relay_handshakes_in_progress",
                                   "Connections not through their handshake yet: first bytes (TLS, HTTP head, "
                                   "data-channel header) or a control channel not registered yet", labels=["stage"])
        stages.add_metric(["first_bytes"], server.handshakes.pending)
        stages.add_metric(["registration"], server.unregistered.pending)
        yield stages
        yield _gauge("chuantou_relay_threads", "Threads of this relay", len(server.threads))
        yield _gauge("chuantou_process_threads", "Threads of the whole process", threading.active_count())
        yield _gauge("chuantou_relay_descriptor_headroom",
                     "File descriptors free above the reserve kept for control connections (descriptorReserve)",
                     server.caps.descriptors.headroom())
        yield self._udp_drops()
        if server.cluster is not None:
            yield from cluster_figures(server.cluster.status())

    def _sessions_open(self) -> GaugeMetricFamily:
        counts = {(protocol, state): 0 for protocol in PROTOCOLS for state in ("joining", "relaying")}
        for session in self.server.sessions.all():
            key = (session.protocol, "relaying" if session.joined else "joining")
            if key in counts:
                counts[key] += 1
        family = GaugeMetricFamily("chuantou_relay_sessions_open", "Open sessions, by protocol and state",
                                   labels=["protocol", "state"])
        for (protocol, state), count in counts.items():
            family.add_metric([protocol, state], count)
        return family

    def _bytes_relayed(self) -> CounterMetricFamily:
        totals = self.server.traffic.bytes_by_direction()  # running sessions' live counts included
        family = CounterMetricFamily("chuantou_relay_bytes_relayed",
                                     "Bytes relayed between clients, by protocol and direction "
                                     "(advances while a session runs)", labels=["protocol", "direction"])
        for protocol in PROTOCOLS:
            for index, direction in enumerate(DIRECTIONS):
                family.add_metric([protocol, direction], totals.get((protocol, index), 0))
        return family

    def _bytes_direct_reported(self) -> CounterMetricFamily:
        totals = self.server.traffic.direct_by_direction()
        family = CounterMetricFamily("chuantou_relay_bytes_direct_reported",
                                     "Bytes that went directly between clients, as the clients report it "
                                     "(claims the relay cannot check, capped per session), by protocol and "
                                     "direction", labels=["protocol", "direction"])
        for protocol in PROTOCOLS:
            for index, direction in enumerate(DIRECTIONS):
                family.add_metric([protocol, direction], totals.get((protocol, index), 0))
        return family

    def _udp_drops(self) -> CounterMetricFamily:
        relay = self.server.udp
        drops = dict(relay.drops) if relay is not None else {}
        family = CounterMetricFamily("chuantou_relay_udp_datagrams_dropped", "UDP datagrams dropped, by reason",
                                     labels=["reason"])
        for reason in udp.DROP_REASONS:
            family.add_metric([reason], drops.get(reason, 0))
        return family


def cluster_figures(view: dict) -> Iterator[GaugeMetricFamily]:
    """A cluster node's figures from its ``Cluster.status()`` (the node table, read from Redis at
    this scrape): the store's state, the nodes alive (their keys expire when a node dies) and the
    load each node last wrote. The table says what a node wrote at its last refresh (a few
    seconds old at most), hence the age gauge."""
    up = view.get("store") == "reachable"
    yield _gauge("chuantou_relay_cluster_store_up", "1 while the cluster store (Redis) answers, else 0",
                 1 if up else 0)
    nodes = [node for node in view.get("nodes", []) if isinstance(node, dict) and isinstance(node.get("id"), str)]
    yield _gauge("chuantou_relay_cluster_nodes", "Nodes alive in the cluster's node table (0 while the store "
                 "is unreachable: unknown)", len(nodes))
    now = time.time()
    families = {
        "clients": GaugeMetricFamily("chuantou_relay_cluster_node_clients",
                                     "Clients registered on each node, as it last wrote in the node table",
                                     labels=["node"]),
        "sessions": GaugeMetricFamily("chuantou_relay_cluster_node_sessions",
                                      "Open sessions on each node, as it last wrote in the node table",
                                      labels=["node"]),
    }
    age = GaugeMetricFamily("chuantou_relay_cluster_node_update_age_seconds",
                            "Seconds since each node last wrote its record in the node table", labels=["node"])
    for node in nodes:
        for field, family in families.items():
            if _is_number(node.get(field)):
                family.add_metric([node["id"]], node[field])
        if _is_number(node.get("updatedAt")):
            age.add_metric([node["id"]], max(0.0, now - node["updatedAt"]))
    yield from families.values()
    yield age


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


# --- access and health ----------------------------------------------------------------------

def is_loopback(ip: str) -> bool:
    """Loopback, also as an IPv4-mapped IPv6 address (a dual-stack relay on :: sees ::ffff:127.0.0.1)."""
    try:
        address = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def access(server: Server, peer: tuple, bearer: str | None, admin_session: bool) -> str:
    """ALLOWED, DENIED or LIMITED for a scrape: open from loopback (unless metricsLoopbackOpen is
    off; a reverse proxy on this host makes everyone look local), else the metrics token or the
    admin credential (its token as Bearer, or a login session's cookie). Wrong tokens count
    against the source like failed admin logins."""
    cfg = server.config
    if cfg.metrics_loopback_open and is_loopback(peer[0]):
        return ALLOWED
    if admin_session:
        return ALLOWED
    if bearer is None:
        return DENIED
    failures = server.admin_login_failures
    if failures.blocked(peer[0]):
        return LIMITED
    given = bearer.encode("utf-8", "replace")
    for token in (cfg.metrics_token, cfg.admin_token):
        if token is not None and hmac.compare_digest(given, token.encode()):
            return ALLOWED
    failures.failed(peer[0])
    return DENIED


def healthy(server: Server) -> bool:
    """The relay accepts and serves: started, not stopping, and not out of file descriptors."""
    return server.started_at is not None and not server.stopping.is_set() and not server.caps.out_of_descriptors()
