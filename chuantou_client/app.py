"""The long-running client program: a Client, its saved configuration, and its local API.

The config file holds the server URL, the client ID (generated once, then reused) and the
proxies; proxies created or deleted through the API are saved, and restored at the next
start. The local API's secret is kept apart, in the state directory (apiauth.py).
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from common import auth, config, identity, service
from common.bandwidth import EXPECTED as BANDWIDTH_EXPECTED
from common.bandwidth import is_bandwidth, parse_bandwidth
from common import protocol as p
from common.errors import ChuantouError

from . import apiauth
from .admin import AdminServer
from .pool import DEFAULT_POOL_COUNT
from .client import DEFAULT_SERVER_URL, Client, check_server_url, generate_client_id
from .export import parse_ports
from .known_clients import KnownClients, identity_path, known_clients_path, parse_allow_from
from .listen import DEFAULT_LOCAL_HOST, LOCAL_HOST_HELP, is_valid_local_host, listen_address, parse_local_host
from .proxy import PROTOCOL_CHOICES
from .relays import IN_ORDER, ORDERS
from .startopts import running_options
from .warm import DEFAULT_WARM, MAX_WARM, check_warm_count

log = logging.getLogger("chuantou.client")


def _valid_url(value: str) -> bool:
    try:
        check_server_url(value)
    except ChuantouError:
        return False
    return True


def _valid_allow_from(value: list) -> bool:
    try:
        parse_allow_from(value)
    except ChuantouError:
        return False
    return True


def _valid_fingerprint(value: str) -> bool:
    try:
        identity.check_fingerprint(value)
    except ChuantouError:
        return False
    return True


def _valid_allow(value: str) -> bool:
    try:
        parse_ports(value)
    except ChuantouError:
        return False
    return True


def _valid_pool_count(value: int) -> bool:
    return 0 <= value <= 64  # the relay offers fewer if it allows fewer (pool.py)


CONFIG_KEYS = {
    "server": config.Key(str, "a relay URL such as \"ws://relay.example.com:8200\"", DEFAULT_SERVER_URL, _valid_url),
    "clientId": config.Key(str, "1-64 letters, digits, '.', '_' or '-'", None,
                           lambda v: bool(p.CLIENT_ID_PATTERN.match(v))),
    "adminPort": config.Key(int, "a port number 1-65535", 8201, config.is_port),
    "logLevel": config.LOG_LEVEL,
    "proxies": config.Key(list, "a list of proxies", list),
    # its length is checked where it is chosen (chosen_token): a good --token can replace a short one
    "token": config.Key(str, "the relay's token (a string)", None, secret=True),
    "allow": config.Key(str, "ports other clients may reach here, like \"22,3000-3999\" or \"none\"", None,
                        _valid_allow),
    "ca": config.Key(str, "the path of a PEM file of trusted CA certificates", None),
    "tlsFingerprint": config.Key(str, "the SHA-256 fingerprint of the relay's certificate", None),
    "tlsInsecure": config.Key(bool, "true or false", False),
    "maxPendingConnects": config.Key(int, "a whole number >= 1", 256, lambda v: v >= 1),  # sessions set up at once
    # data channels kept open to the relay ahead of sessions (pool.py)
    "poolCount": config.Key(int, "a whole number from 0 to 64 (0: none)", DEFAULT_POOL_COUNT, _valid_pool_count),
    "allowHosts": config.Key(list, "a list of host names or addresses", list,
                             lambda v: all(isinstance(h, str) and p.HOST_PATTERN.match(h) for h in v)),
    # who may reach this client, checked against the key a peer proves (--allow-from)
    "allowFrom": config.Key(list, "a list of client IDs and SHA256: fingerprints", list, _valid_allow_from),
    # the direct path for UDP flows (direct.py)
    "path": config.Key(str, "one of auto, relay, direct", "auto", lambda v: v in ("auto", "relay", "direct")),
    "directDeadline": config.Key((int, float), "a number of seconds > 0", 1.0, lambda v: v > 0),
    # sessions with peers that cannot seal (older clients) run in the clear instead of being refused
    "allowUnsealed": config.Key(bool, "true or false", False),
    # the order several --server URLs are tried in (relays.py)
    "serverOrder": config.Key(str, "one of in-order, random", IN_ORDER, lambda v: v in ORDERS),
}

PROXY_KEYS = {
    "localPort": config.Key(int, "a port number 1-65535", None, config.is_port, required=True),
    "targetClient": config.Key(str, "a client ID", None, lambda v: bool(p.CLIENT_ID_PATTERN.match(v)), required=True),
    "targetPort": config.Key(int, "a port number 1-65535", None, config.is_port, required=True),
    "protocol": config.Key(str, "one of tcp, udp, both", "both", lambda v: v in PROTOCOL_CHOICES),
    "targetHost": config.Key(str, "a host on the target client's network", None,
                             lambda v: bool(p.HOST_PATTERN.match(v))),
    "localHost": config.Key(str, LOCAL_HOST_HELP, None, is_valid_local_host),  # --local-host (10.12)
    "targetFingerprint": config.Key(str, "the target's key, SHA256:...", None, _valid_fingerprint),
    # bytes/s each way over all its connections (issue 16 item 3); "10MiB/s" is accepted from a hand edit
    "bandwidth": config.Key((int, str), BANDWIDTH_EXPECTED, 0, is_bandwidth),
    "allowUnsealed": config.Key(bool, "true or false", False),  # this proxy may reach a target that cannot seal
    # TCP sessions kept set up ahead of users (chuantou_client/warm.py); saved only when not the default
    "warm": config.Key(int, f"a whole number 0-{MAX_WARM}", DEFAULT_WARM, lambda v: 0 <= v <= MAX_WARM),
}


def default_config_path() -> Path:
    return config.config_dir() / "client.json"


def default_secret_path(config_path: Path) -> Path:
    """Where the API secret of the client using ``config_path`` lives (as the CLI finds it)."""
    default = config_path == default_config_path()
    files = service.ServiceFiles.for_role("client", None if default else str(config_path))
    return apiauth.secret_path(files.state_dir, files.name)


def chosen_token(overrides: dict, settings: dict, config_path: Path) -> str | None:
    """The token in use: --token, else $CHUANTOU_TOKEN, else the saved one; a short one is refused
    (ConfigError naming where it came from, never the token)."""
    for token, where in ((overrides.get("token"), "--token"), (os.environ.get("CHUANTOU_TOKEN"), "$CHUANTOU_TOKEN"),
                         (settings["token"], f"the token saved in {config_path}")):
        if token:
            problem = auth.token_problem(token, where)
            if problem:
                raise config.ConfigError(problem)
            return token
    return None


def load_settings(path: Path) -> dict:
    settings = config.load(path, CONFIG_KEYS)
    settings["proxies"] = [
        config.validate(entry, PROXY_KEYS, f"{path}: proxies[{i}]") for i, entry in enumerate(settings["proxies"])
    ]
    return settings


def config_problems(path: Path) -> list[str]:
    """Every problem with the client config at ``path`` (its keys, each saved proxy, the token,
    the CA file) without starting anything: what check-config lists."""
    data, unreadable = config.read_json(path)
    if unreadable:
        return [unreadable]
    settings, found = config.checked(data, CONFIG_KEYS, str(path))
    ports: dict[int, int] = {}
    for i, entry in enumerate(settings.get("proxies") or []):
        proxy, bad = config.checked(entry, PROXY_KEYS, f"{path}: proxies[{i}]")
        found += bad
        port = proxy.get("localPort")
        if port in ports:
            found.append(f"{path}: proxies[{i}]: local port {port} is also the port of proxies[{ports[port]}]")
        elif port is not None:
            ports[port] = i
    if settings.get("token"):
        problem = auth.token_problem(settings["token"], f"the token saved in {path}")
        if problem:
            found.append(problem)
    if settings.get("ca") and not Path(settings["ca"]).is_file():
        found.append(f"{path}: key 'ca': no such file {settings['ca']}")
    return found


class ClientApp:
    """A Client plus its config file and local API; what ``python -m chuantou_client`` runs."""

    def __init__(self, config_path: Path, overrides: dict, *, admin_host: str = "127.0.0.1",
                 api_secret_path: Path | None = None):
        """``api_secret_path``: the local API's secret (default: in the state directory, named
        after the config file as the CLI expects)."""
        self.config_path = config_path
        self.settings = load_settings(config_path)
        token = chosen_token(overrides, self.settings, config_path)  # before anything is saved
        changed = False
        if overrides.get("allow") is not None:
            parse_ports(overrides["allow"])  # a clear error for a bad --allow
        if overrides.get("allowFrom"):
            overrides["allowFrom"] = parse_allow_from(overrides["allowFrom"])  # a clear error for a bad one
        if overrides.get("directDeadline") is not None and not overrides["directDeadline"] > 0:
            raise config.ConfigError(f"--direct-deadline {overrides['directDeadline']:g} must be > 0 seconds")
        if overrides.get("poolCount") is not None:
            if not _valid_pool_count(overrides["poolCount"]):
                raise config.ConfigError(f"--pool-count {overrides['poolCount']} must be a whole number from 0 to 64 "
                                         f"(0: no pooled data channels)")
            if overrides["poolCount"] != self.settings["poolCount"]:  # 0 is a value here, not "not given"
                self.settings["poolCount"] = overrides["poolCount"]
                changed = True
        for key in ("server", "clientId", "token", "allow", "allowHosts", "ca", "tlsFingerprint", "tlsInsecure",
                    "allowFrom", "path", "directDeadline", "allowUnsealed", "serverOrder"):
            if overrides.get(key) and overrides[key] != self.settings[key]:
                self.settings[key] = overrides[key]
                changed = True
        if not self.settings["clientId"]:
            self.settings["clientId"] = generate_client_id()
            changed = True
        self.server_url = os.environ.get("CHUANTOU_SERVER") if not overrides.get("server") else None
        self.server_url = self.server_url or self.settings["server"]
        admin_port = overrides.get("adminPort")  # 0: any free port (tests)
        if admin_port is not None and admin_port != 0 and not config.is_port(admin_port):
            raise config.ConfigError(f"--admin-port {admin_port} is not a port number 1-65535")
        self.admin_port = admin_port if admin_port is not None else self.settings["adminPort"]
        if admin_port and admin_port != self.settings["adminPort"]:  # remembered, like --server
            self.settings["adminPort"] = admin_port
            changed = True
        self.admin_host = admin_host
        self.log_level = overrides.get("logLevel") or self.settings["logLevel"]  # --log-level is not saved
        self.token = token  # the one in use, for the worker record's options (compared by fingerprint)
        self.client = Client(self.server_url, self.settings["clientId"], token=token,
                             allow=self.settings["allow"], allow_hosts=self.settings["allowHosts"],
                             ca_file=self.settings["ca"], tls_fingerprint=self.settings["tlsFingerprint"],
                             tls_insecure=self.settings["tlsInsecure"],
                             max_pending_connects=self.settings["maxPendingConnects"],
                             pool_count=self.settings["poolCount"],
                             identity=identity.load_or_create(identity_path(config_path)),
                             known_clients=KnownClients(known_clients_path(config_path)),
                             allow_from=self.settings["allowFrom"], path=self.settings["path"],
                             direct_deadline=self.settings["directDeadline"],
                             allow_unsealed=self.settings["allowUnsealed"],
                             server_order=self.settings["serverOrder"])
        if changed or not config_path.exists():  # only now: Client() has checked the URL and the ID
            self.save()
        self.admin = AdminServer(self, admin_host, self.admin_port,
                                 secret_path=api_secret_path or default_secret_path(config_path))
        self.failed_proxies: dict[int, str] = {}
        self._lock = threading.Lock()

    def save(self) -> None:
        config.save(self.config_path, self.settings)

    # --- lifecycle --------------------------------------------------------------------------

    def start(self) -> "ClientApp":
        self.admin.start()  # first: a busy admin port is a clear, early failure
        self.client.protect_socket(self.admin.listening_socket)  # never a session's target (issue 9.9)
        self.client.start(wait=False)
        for entry in self.settings["proxies"]:
            self._open_proxy(entry)
        return self

    def stop(self) -> None:
        self.admin.stop()
        self.client.stop()

    def worker_facts(self) -> dict:
        """What the running client announces in its worker record (status, start and the API find it)."""
        return {"adminPort": self.admin.port, "clientId": self.client.client_id, "server": self.server_url,
                "configPath": str(self.config_path), "options": running_options(self, self.log_level, self.token)}

    def _open_proxy(self, entry: dict):
        try:
            proxy = self.client.create_proxy(entry["localPort"], entry["targetClient"], entry["targetPort"],
                                             entry["protocol"], target_host=entry["targetHost"],
                                             target_fingerprint=entry["targetFingerprint"],
                                             bandwidth=entry["bandwidth"],
                                             allow_unsealed=entry["allowUnsealed"], warm=entry["warm"],
                                             **_local_host_argument(entry["localHost"]))
        except ChuantouError as exc:
            self.failed_proxies[entry["localPort"]] = str(exc)
            log.error("saved proxy %s -> %s:%s not restored: %s", entry["localPort"], entry["targetClient"],
                      entry["targetPort"], exc)
            return None
        self.failed_proxies.pop(entry["localPort"], None)
        return proxy

    # --- what the API offers ----------------------------------------------------------------

    def status(self) -> dict:
        status = self.client.status()
        status.update({
            "pid": os.getpid(),
            "configPath": str(self.config_path),
            "adminUrl": f"http://{self.admin_host}:{self.admin.port}/",
            "failedProxies": [{"localPort": port, "error": err} for port, err in self.failed_proxies.items()],
        })
        return status

    def proxies(self) -> list[dict]:
        return [proxy.info() for proxy in self.client.proxies]

    def list_clients(self) -> list[str]:
        return self.client.list_clients()

    def create_proxy(self, local_port: int, target_client: str, target_port: int, protocol: str = "both",
                     target_host: str | None = None, local_host: str | None = None,
                     target_fingerprint: str | None = None, bandwidth: int | str | None = None,
                     allow_unsealed: bool = False, warm: int | None = None):
        if local_host is not None:
            local_host = parse_local_host(local_host)  # a clear error naming the value
        rate = parse_bandwidth(bandwidth or 0)  # a clear error naming the value; saved as bytes/s
        warm = check_warm_count(DEFAULT_WARM if warm is None else warm)  # a clear error naming the option
        entry = config.validate(
            {"localPort": local_port, "targetClient": target_client, "targetPort": target_port, "protocol": protocol,
             "targetHost": target_host, "localHost": local_host, "targetFingerprint": target_fingerprint,
             "bandwidth": rate, "allowUnsealed": bool(allow_unsealed), "warm": warm},
            PROXY_KEYS, "proxy",
        )
        if not entry["allowUnsealed"]:
            del entry["allowUnsealed"]  # the default: saved only when asked for
        for key in ("targetHost", "localHost", "targetFingerprint"):
            if entry[key] is None:
                del entry[key]
        if not entry["bandwidth"]:
            del entry["bandwidth"]
        if entry["warm"] == DEFAULT_WARM:
            del entry["warm"]
        with self._lock:
            proxy = self.client.create_proxy(local_port, target_client, target_port, protocol, target_host=target_host,
                                             target_fingerprint=entry.get("targetFingerprint"), bandwidth=rate,
                                             allow_unsealed=bool(allow_unsealed), warm=warm,
                                             **_local_host_argument(local_host))
            self.settings["proxies"] = [e for e in self.settings["proxies"] if e["localPort"] != local_port]
            self.settings["proxies"].append(entry)
            self.failed_proxies.pop(local_port, None)
            self.save()
        return proxy

    def delete_proxy(self, local_port: int) -> str | None:
        """Close and forget the proxy on ``local_port``; return its description, or None if none."""
        with self._lock:
            proxy = next((x for x in self.client.proxies if x.local_port == local_port), None)
            saved = [e for e in self.settings["proxies"] if e["localPort"] == local_port]
            if proxy is None and not saved:
                return None
            if proxy is not None:
                proxy.close()
            self.settings["proxies"] = [e for e in self.settings["proxies"] if e["localPort"] != local_port]
            self.failed_proxies.pop(local_port, None)
            self.save()
        if proxy is not None:
            return proxy.description
        entry = saved[0]
        where = listen_address(entry.get("localHost") or DEFAULT_LOCAL_HOST, local_port)
        return f"{where} -> {entry['targetClient']}:{entry['targetPort']}"


def _local_host_argument(local_host: str | None) -> dict:
    """Client.create_proxy's keyword for a saved or given localHost (none: its loopback default)."""
    return {} if local_host is None else {"local_host": local_host}
