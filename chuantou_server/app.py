"""The long-running relay program: a Server, its saved configuration and its tokens.

The config file (server.json) holds the relay's settings and its secrets: the clients' token
(generated on first start when none is set), extra and per-client tokens, and the admin page's
own token. The command line (cli.py) parses options into overrides for this module and runs
the commands; what a setting means and how a Server is built from the settings lives here.
"""

from __future__ import annotations

import logging
from pathlib import Path

from common import __version__, auth, config, service
from common import protocol as p
from common.bandwidth import EXPECTED as BANDWIDTH_EXPECTED
from common.bandwidth import is_bandwidth, parse_bandwidth
from common.errors import ChuantouError
from common.net import host_for_url

from . import admin_sessions
from . import caps, pool
from .handshakes import DEFAULT_MAX_PENDING, DEFAULT_MAX_PENDING_PER_SOURCE
from .admission import DEFAULT_MAX_UNREGISTERED, DEFAULT_MAX_UNREGISTERED_PER_SOURCE
from .registry import DEFAULT_MAX_RESERVED_PER_CREDENTIAL, DEFAULT_RESERVATION_TIME
from .server import Server
from .settings import DATA_NODE_POLICIES
from .startopts import running_options

log = logging.getLogger("chuantou.server")

CONFIG_KEYS = {
    "host": config.Key(str, "an address such as \"0.0.0.0\"", "0.0.0.0"),
    "port": config.Key(int, "a port number 1-65535", 8200, config.is_port),
    "heartbeatTimeout": config.Key((int, float), "a number of seconds > 0", 25.0, config.is_positive),
    # liveness of data channels: keepalive probes and TCP_USER_TIMEOUT (issue 10 item 2)
    "dataChannelTimeout": config.Key((int, float), "a number of seconds >= 0 (0: off)", 30.0, lambda v: v >= 0),
    "logLevel": config.LOG_LEVEL,
    "token": config.Key(str, "a token string of 16 or more characters", None, lambda v: len(v) >= 16,
                        secret=True),
    "clientTokens": config.Key(dict, "an object mapping client IDs to their tokens", dict,
                               lambda v: all(isinstance(t, str) and len(t) >= 16 for t in v.values()),
                               secret=True),
    "extraTokens": config.Key(list, "a list of token strings", list,
                              lambda v: all(isinstance(t, str) and len(t) >= 16 for t in v), secret=True),
    "noAuth": config.Key(bool, "true or false", False),
    "tlsCert": config.Key(str, "the path of a PEM certificate (chain)", None),
    "tlsKey": config.Key(str, "the path of its PEM private key", None),
    "tlsOnly": config.Key(bool, "true or false", False),
    "probePort": config.Key(int, "a UDP port 1-65535 that answers NAT probes (the direct path)", None,
                            config.is_port),
    "idReservationTime": config.Key((int, float), "a number of seconds >= 0 (0: only while online)",
                                    DEFAULT_RESERVATION_TIME, lambda v: v >= 0),
    "maxReservedIdsPerToken": config.Key(int, "a whole number >= 0", DEFAULT_MAX_RESERVED_PER_CREDENTIAL,
                                         lambda v: v >= 0),
    # the admin page: its own credential and login sessions (issue 9.10, 9.11)
    "adminToken": config.Key(str, "a token string of 16 or more characters (not a client token)", None,
                             lambda v: len(v) >= 16, secret=True),
    "adminSessionIdle": config.Key((int, float), "a number of seconds > 0", admin_sessions.DEFAULT_IDLE,
                                   config.is_positive),
    "adminSessionLifetime": config.Key((int, float), "a number of seconds > 0", admin_sessions.DEFAULT_LIFETIME,
                                       config.is_positive),
    "maxAdminSessions": config.Key(int, "a whole number >= 1", admin_sessions.DEFAULT_MAX_SESSIONS,
                                   lambda v: v >= 1),
    "adminLoginFailuresPerMinute": config.Key(int, "a whole number >= 0 (0: no limit)",
                                              admin_sessions.DEFAULT_LOGIN_FAILURES_PER_MINUTE, lambda v: v >= 0),
    # UDP hardening: the early-datagram queue and the registration rate per source
    "udpEarlyQueueBytes": config.Key(int, "a whole number of bytes > 0", 256 * 1024, config.is_positive),
    "udpEarlyQueueTotalBytes": config.Key(int, "a whole number of bytes > 0", 64 * 1024 * 1024, config.is_positive),
    "udpRegistrationsPerSecond": config.Key((int, float), "a number > 0", 1000.0, config.is_positive),
    # handshake slots, session caps and descriptors (issue 9 items 2, 4, 5; issue 10 item 5)
    "maxPendingHandshakes": config.Key(int, "a whole number >= 1", DEFAULT_MAX_PENDING, lambda v: v >= 1),
    "maxPendingHandshakesPerSource": config.Key(int, "a whole number >= 1", DEFAULT_MAX_PENDING_PER_SOURCE,
                                                lambda v: v >= 1),
    "maxSessions": config.Key(int, "a whole number >= 1", caps.DEFAULT_MAX_SESSIONS, lambda v: v >= 1),
    "maxSessionsPerClient": config.Key(int, "a whole number >= 1", caps.DEFAULT_MAX_SESSIONS_PER_CLIENT,
                                       lambda v: v >= 1),
    "maxSessionsPerTarget": config.Key(int, "a whole number >= 1", caps.DEFAULT_MAX_SESSIONS_PER_TARGET,
                                       lambda v: v >= 1),
    "maxUdpFlowsPerClient": config.Key(int, "a whole number >= 1", caps.DEFAULT_MAX_UDP_FLOWS_PER_CLIENT,
                                       lambda v: v >= 1),
    "maxPendingSessionsPerClient": config.Key(int, "a whole number >= 1",
                                              caps.DEFAULT_MAX_PENDING_SESSIONS_PER_CLIENT, lambda v: v >= 1),
    # pooled data channels (pool.py): per client (0: off), over all, and how long an unbound one stays
    "maxPooledChannelsPerClient": config.Key(int, "a whole number from 0 to 64 (0: no pooling)",
                                             pool.DEFAULT_POOL_PER_CLIENT, lambda v: 0 <= v <= 64),
    "maxPooledChannels": config.Key(int, "a whole number >= 0", pool.DEFAULT_MAX_POOLED, lambda v: 0 <= v <= 1 << 20),
    "poolIdleTimeout": config.Key((int, float), "a number of seconds > 0", pool.DEFAULT_POOL_IDLE_TIMEOUT,
                                  lambda v: v > 0),
    "descriptorReserve": config.Key(int, "a whole number >= 0", caps.DEFAULT_DESCRIPTOR_RESERVE, lambda v: v >= 0),
    "tcpIdleTimeout": config.Key((int, float), "a number of seconds >= 0 (0: off)", 0, lambda v: v >= 0),
    # control channels that have not registered yet (hostile load, issue 9)
    "maxUnregistered": config.Key(int, "a whole number >= 1", DEFAULT_MAX_UNREGISTERED, lambda v: v >= 1),
    "maxUnregisteredPerSource": config.Key(int, "a whole number >= 1", DEFAULT_MAX_UNREGISTERED_PER_SOURCE,
                                           lambda v: v >= 1),
    # GET /metrics (issue 16 item 1): its own bearer token, and whether loopback may scrape without one
    "metricsToken": config.Key(str, "a token string of 16 or more characters (not a client token)", None,
                               lambda v: len(v) >= 16, secret=True),
    "metricsLoopbackOpen": config.Key(bool, "true or false", True),
    # a node of a relay cluster on Redis (issue 14, cluster.py); no "cluster": a relay on its own
    "cluster": config.Key(str, "a Redis URL such as \"redis://HOST:6379/0\"", None,
                          lambda v: v.startswith(("redis://", "rediss://", "unix://")), secret=True),
    "nodeId": config.Key(str, "a node name of 1-64 letters, digits, '.', '_' or '-'", None,
                         lambda v: bool(p.CLIENT_ID_PATTERN.match(v))),
    "advertise": config.Key(str, "the URL clients reach this node at, such as \"ws://relay1.example.com:8200\"",
                            None, lambda v: v.startswith(("ws://", "wss://"))),
    "clusterTtl": config.Key((int, float), "a number of seconds > 0", 8.0, config.is_positive),
    # redirect a registering client when this node has this many more clients than the least loaded one
    "redirectMargin": config.Key(int, "a whole number of clients >= 0 (0: never redirect)", 0, lambda v: v >= 0),
    "dataNode": config.Key(str, "\"b\" (B's node) or \"least-loaded\"", "b", lambda v: v in DATA_NODE_POLICIES),
    # bandwidth limits the relay enforces (issue 16 item 3): each client's sending and receiving over all
    # its sessions, and every byte relayed; "10MiB/s" is accepted as well as a plain number
    "bandwidthPerClient": config.Key((int, str), BANDWIDTH_EXPECTED, 0, is_bandwidth),
    "bandwidthTotal": config.Key((int, str), BANDWIDTH_EXPECTED, 0, is_bandwidth),
}


def default_config_path() -> Path:
    return config.config_dir() / "server.json"


def resolve_settings(path: Path, overrides: dict, config_given: bool = False) -> dict:
    """Defaults <- config file <- ``overrides`` (config keys from the command line; None: not given).

    ``config_given``: the path was named by the user, so a missing file is an error."""
    if config_given and not path.exists():
        raise config.ConfigError(f"config file {path} does not exist")
    for key, flag in (("token", "--token"), ("metricsToken", "--metrics-token")):
        given = overrides.get(key)
        if given is not None and auth.token_problem(given, flag):
            raise config.ConfigError(auth.token_problem(given, flag))
    settings = config.load(path, CONFIG_KEYS)
    for key in ("host", "port", "heartbeatTimeout", "logLevel", "token", "tlsCert", "tlsKey", "metricsToken",
                "cluster", "nodeId", "advertise", "redirectMargin", "dataNode", "probePort"):
        if overrides.get(key) is not None:
            settings[key] = overrides[key]
    if settings["probePort"] is not None and not config.is_port(settings["probePort"]):
        raise config.ConfigError(f"--probe-port {settings['probePort']} is not a port number 1-65535")
    if not config.is_port(settings["port"]):
        raise config.ConfigError(f"--port {settings['port']} is not a port number 1-65535")
    if not config.is_positive(settings["heartbeatTimeout"]):
        raise config.ConfigError(
            f"--heartbeat-timeout {settings['heartbeatTimeout']:g} must be a number of seconds > 0")
    for flag in ("noAuth", "tlsOnly"):  # a flag on the command line can only switch it on
        if overrides.get(flag):
            settings[flag] = True
    if settings["tlsOnly"] and not settings["tlsCert"]:
        raise config.ConfigError("--tls-only needs --tls-cert and --tls-key")
    return settings


def config_problems(path: Path) -> list[str]:
    """Every problem with the config file at ``path``, checked as a start would check it (keys,
    values, tokens, the TLS files) without binding anything: what check-config lists."""
    data, unreadable = config.read_json(path)
    if unreadable:
        return [unreadable]
    settings, found = config.checked(data, CONFIG_KEYS, str(path))
    if found:
        return found
    if settings["tlsOnly"] and not settings["tlsCert"]:
        return [f"{path}: tlsOnly needs tlsCert and tlsKey"]
    try:
        make_server(settings)  # ServerConfig's checks (the admin and metrics tokens), and loads the TLS files
    except (ChuantouError, OSError, ValueError) as exc:
        return [f"{path}: {exc}"]
    return []


def scheme(settings: dict) -> str:
    return "wss" if settings.get("tlsCert") else "ws"


def local_address(host: str) -> str:
    """The address a command on this machine reaches a relay listening on ``host`` at: loopback
    of its family for a wildcard, the address itself otherwise (::1 answers on ::1 only)."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


def local_url(scheme_name: str, host: str, port: object) -> str:
    return f"{scheme_name}://{host_for_url(local_address(host))}:{port}"


def load_file_settings(path: Path) -> dict:
    """The config file's own keys (no defaults filled in), for rewriting it."""
    config.load(path, CONFIG_KEYS)  # validates
    return service.read_json(path) or {}


def caps_settings(settings: dict) -> dict:
    """Server arguments for the handshake, session and descriptor caps."""
    return {
        "max_pending_handshakes": settings["maxPendingHandshakes"],
        "max_pending_handshakes_per_source": settings["maxPendingHandshakesPerSource"],
        "max_sessions": settings["maxSessions"],
        "max_sessions_per_client": settings["maxSessionsPerClient"],
        "max_sessions_per_target": settings["maxSessionsPerTarget"],
        "max_udp_flows_per_client": settings["maxUdpFlowsPerClient"],
        "max_pending_sessions_per_client": settings["maxPendingSessionsPerClient"],
        "descriptor_reserve": settings["descriptorReserve"],
        "tcp_idle_timeout": settings["tcpIdleTimeout"],
        "max_pooled_channels_per_client": settings["maxPooledChannelsPerClient"],
        "max_pooled_channels": settings["maxPooledChannels"],
        "pool_idle_timeout": float(settings["poolIdleTimeout"]),
    }


def make_server(settings: dict) -> Server:
    return Server(
        host=settings["host"], port=settings["port"], heartbeat_timeout=settings["heartbeatTimeout"],
        token=None if settings["noAuth"] else settings["token"],
        client_tokens={} if settings["noAuth"] else settings["clientTokens"],
        extra_tokens=[] if settings["noAuth"] else settings["extraTokens"],
        tls_cert=settings["tlsCert"], tls_key=settings["tlsKey"], tls_only=settings["tlsOnly"],
        id_reservation_time=settings["idReservationTime"],
        max_reserved_ids_per_token=settings["maxReservedIdsPerToken"],
        admin_token=settings["adminToken"],
        admin_session_idle=settings["adminSessionIdle"],
        admin_session_lifetime=settings["adminSessionLifetime"],
        max_admin_sessions=settings["maxAdminSessions"],
        admin_login_failures_per_minute=settings["adminLoginFailuresPerMinute"],
        udp_early_queue_bytes=settings["udpEarlyQueueBytes"],
        udp_early_queue_total_bytes=settings["udpEarlyQueueTotalBytes"],
        udp_registrations_per_second=settings["udpRegistrationsPerSecond"],
        probe_port=settings["probePort"],
        **caps_settings(settings),
        data_channel_timeout=settings["dataChannelTimeout"],
        max_unregistered=settings["maxUnregistered"],
        max_unregistered_per_source=settings["maxUnregisteredPerSource"],
        metrics_token=settings["metricsToken"],
        metrics_loopback_open=settings["metricsLoopbackOpen"],
        cluster_url=settings["cluster"], node_id=settings["nodeId"], advertise=settings["advertise"],
        cluster_ttl=settings["clusterTtl"], cluster_redirect_margin=settings["redirectMargin"],
        data_node=settings["dataNode"],
        bandwidth_per_client=parse_bandwidth(settings["bandwidthPerClient"]),
        bandwidth_total=parse_bandwidth(settings["bandwidthTotal"]),
    )


class ServerApp:
    """A Server plus its config file and tokens; what ``python -m chuantou_server`` runs."""

    def __init__(self, config_path: Path, overrides: dict, *, config_given: bool = False):
        """``overrides``: config keys given on the command line (None: not given)."""
        self.config_path = config_path
        self.given_token = overrides.get("token")
        self.given_metrics_token = overrides.get("metricsToken")
        self.settings = resolve_settings(config_path, overrides, config_given)
        self.server: Server | None = None

    @property
    def log_level(self) -> str:
        return self.settings["logLevel"]

    @property
    def scheme(self) -> str:
        return scheme(self.settings)

    def load_file_settings(self) -> dict:
        return load_file_settings(self.config_path)

    def save_setting(self, key: str, value) -> None:
        """Write one key into the config file, keeping the file's other keys as they are."""
        saved = self.load_file_settings()
        saved[key] = value
        config.save(self.config_path, saved)

    # --- tokens -----------------------------------------------------------------------------

    def ensure_token(self, port: int | str = "PORT") -> None:
        """Secure by default: with no token configured, make one, save it (0600) and show it once.
        The admin page's own token is made the same way (also on an open relay).

        A --token (or --metrics-token) given on the command line is saved too, so a background worker reads it from
        the file rather than from its command line.
        """
        self.ensure_admin_token(port)
        settings = self.settings
        if self.given_metrics_token:  # kept in the file, not on a worker's command line
            self.save_setting("metricsToken", self.given_metrics_token)
        if settings["noAuth"]:
            return
        given = self.given_token
        if settings["token"] and not given:
            return
        token = given or auth.generate_token()
        self.save_setting("token", token)
        settings["token"] = token
        if not given:
            print(f"generated a token for this relay, saved in {self.config_path} (mode 0600):")
            print(f"  {token}")
            print("clients connect with:")
            print(f"  python -m chuantou_client start --server {self.scheme}://<this host's address>:{port} "
                  f"--token {token}")
            print("show it again with: python -m chuantou_server token", flush=True)

    def ensure_admin_token(self, port: int | str = "PORT") -> None:
        """The admin page needs its own token (never a client's): make and save one if there is none."""
        settings = self.settings
        if settings["adminToken"]:
            return
        settings["adminToken"] = auth.generate_token()
        self.save_setting("adminToken", settings["adminToken"])
        print(f"generated an admin token for this relay's page and API, saved in {self.config_path} (mode 0600):")
        print(f"  {settings['adminToken']}")
        page = local_url("https" if settings.get("tlsCert") else "http", settings.get("host") or "0.0.0.0", port)
        print(f"log in on {page}/ (or through an SSH tunnel); "
              "show it again with: python -m chuantou_server token --admin", flush=True)

    # --- lifecycle --------------------------------------------------------------------------

    def start(self) -> "ServerApp":
        self.ensure_token(self.settings["port"])
        self.server = make_server(self.settings)
        self.server.start()
        if not self.server.auth_required:
            log.warning("running an OPEN relay (--no-auth): anyone who reaches port %d can register clients and "
                        "reach the ports they expose; drop --no-auth to require a token", self.server.port)
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()

    def worker_facts(self) -> dict:
        """What the running relay announces in its worker record (status and start read them)."""
        assert self.server is not None, "start() first"
        port = self.server.port
        return {"host": self.settings["host"], "port": port, "version": __version__,
                "tls": self.server.tls_context is not None, "options": running_options(self.settings, port)}
