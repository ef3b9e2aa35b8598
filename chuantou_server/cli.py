"""Command line of the relay: run in the foreground, or start/stop/status/logs a background
service under a supervisor, with an optional saved config file."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import ssl
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

from common import __version__, auth, config, logsafe, service
from common import startcheck
from common.startcheck import config_restored_on_failure
from common.net import host_for_url

from . import admin_sessions
from . import caps
from .handshakes import DEFAULT_MAX_PENDING, DEFAULT_MAX_PENDING_PER_SOURCE
from .admission import DEFAULT_MAX_UNREGISTERED, DEFAULT_MAX_UNREGISTERED_PER_SOURCE
from .registry import DEFAULT_MAX_RESERVED_PER_CREDENTIAL, DEFAULT_RESERVATION_TIME
from .server import Server
from .startopts import RUN_OPTION_DEFAULTS, given_options, running_options

MODULE = "chuantou_server"
LOG_LEVELS = ("debug", "info", "warning", "error")

CONFIG_KEYS = {
    "host": config.Key(str, "an address such as \"0.0.0.0\"", "0.0.0.0"),
    "port": config.Key(int, "a port number 1-65535", 8200, config.is_port),
    "heartbeatTimeout": config.Key((int, float), "a number of seconds > 0", 25.0, config.is_positive),
    # liveness of data channels: keepalive probes and TCP_USER_TIMEOUT (issue 10 item 2)
    "dataChannelTimeout": config.Key((int, float), "a number of seconds >= 0 (0: off)", 30.0, lambda v: v >= 0),
    "logLevel": config.Key(str, f"one of {', '.join(LOG_LEVELS)}", "info", lambda v: v in LOG_LEVELS),
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
    "descriptorReserve": config.Key(int, "a whole number >= 0", caps.DEFAULT_DESCRIPTOR_RESERVE, lambda v: v >= 0),
    "tcpIdleTimeout": config.Key((int, float), "a number of seconds >= 0 (0: off)", 0, lambda v: v >= 0),
    # control channels that have not registered yet (hostile load, issue 9)
    "maxUnregistered": config.Key(int, "a whole number >= 1", DEFAULT_MAX_UNREGISTERED, lambda v: v >= 1),
    "maxUnregisteredPerSource": config.Key(int, "a whole number >= 1", DEFAULT_MAX_UNREGISTERED_PER_SOURCE,
                                           lambda v: v >= 1),
}
OPTION_TO_KEY = {"host": "host", "port": "port", "heartbeat_timeout": "heartbeatTimeout", "log_level": "logLevel",
                 "token": "token", "tls_cert": "tlsCert", "tls_key": "tlsKey"}

EXAMPLES = """examples:
  python -m chuantou_server                      run in the foreground on port 8200
  python -m chuantou_server start --autostart    run in the background, also at boot
  python -m chuantou_server status
  python -m chuantou_server logs -f
  python -m chuantou_server stop
"""


def files(args) -> service.ServiceFiles:
    return service.ServiceFiles.for_role("server", getattr(args, "config", None))


def default_config_path() -> Path:
    return config.config_dir() / "server.json"


def _add_run_options(parser: argparse.ArgumentParser, inherit: bool) -> None:
    # In subcommands the defaults are SUPPRESS, so options given before the subcommand survive.
    default = argparse.SUPPRESS if inherit else None
    parser.add_argument("--host", default=default, help="address to listen on (default 0.0.0.0)")
    parser.add_argument("--port", type=int, default=default, help="TCP and UDP port (default 8200)")
    parser.add_argument("--heartbeat-timeout", type=float, default=default,
                        help="seconds of silence before a client is dropped (default 25)")
    parser.add_argument("--config", default=default, metavar="FILE",
                        help=f"config file (default {default_config_path()}, if it exists)")
    parser.add_argument("--log-level", choices=LOG_LEVELS, default=default)
    parser.add_argument("--token", default=default, help="token clients must prove, 16+ characters (default: the "
                        "saved one, generated on first start). While this process runs, other local users can read "
                        "it in /proc/PID/cmdline: prefer the saved config (python -m chuantou_server token)")
    parser.add_argument("--no-auth", action="store_true", default=default,
                        help="run an open relay: anyone who reaches the port may register (not recommended)")
    parser.add_argument("--tls-cert", default=default, metavar="PEM", help="serve TLS (wss://) on the same port "
                        "with this certificate chain")
    parser.add_argument("--tls-key", default=default, metavar="PEM", help="the certificate's private key")
    parser.add_argument("--tls-only", action="store_true", default=default, help="refuse plain connections")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m chuantou_server", description="chuantou relay server.", epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"chuantou {__version__}")
    _add_run_options(parser, inherit=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    start = sub.add_parser("start", help="run in the background under a supervisor",
                           epilog="example: python -m chuantou_server start --port 8200 --autostart")
    _add_run_options(start, inherit=True)
    start.add_argument("--autostart", action="store_true", help="also start at boot (systemd user unit or crontab)")

    stop = sub.add_parser("stop", help="stop the background server and remove autostart",
                          epilog="example: python -m chuantou_server stop")
    stop.add_argument("--keep-autostart", action="store_true", help="leave the start-at-boot entry in place")

    status = sub.add_parser("status", help="is it running; port, uptime, clients, sessions",
                            epilog="example: python -m chuantou_server status")

    logs = sub.add_parser("logs", help="show the background server's log",
                          epilog="example: python -m chuantou_server logs -f -n 100")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    logs.add_argument("-n", "--lines", type=int, default=50, help="lines to show (default 50)")

    token = sub.add_parser(
        "token", help="show the relay's token; add, list or remove tokens",
        epilog="examples:\n  python -m chuantou_server token\n  python -m chuantou_server token --admin\n"
               "  python -m chuantou_server token add --client-id B\n"
               "  python -m chuantou_server token list\n  python -m chuantou_server token remove --client-id B",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    token.add_argument("action", nargs="?", choices=("show", "add", "list", "remove"), default="show")
    token.add_argument("--client-id", metavar="ID", help="with add/remove: a token only this client ID may use "
                       "(and the only one that may register it)")
    token.add_argument("--fingerprint", help="with remove: the extra token with this fingerprint (see token list)")
    token.add_argument("--admin", action="store_true", help="the admin page's token instead of a client token: "
                       "show it (made if missing) or add a new one in its place")

    for command in (stop, status, logs, token):
        command.add_argument("--config", default=argparse.SUPPRESS, metavar="FILE",
                             help="the server started with this config file (default: the default one)")

    supervise = sub.add_parser("_supervise")  # internal: the supervisor process
    supervise.add_argument("worker_args", nargs=argparse.REMAINDER)
    return parser


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
    }


def resolve_settings(args) -> dict:
    """Defaults <- config file <- command-line options."""
    path = getattr(args, "config", None)
    if path is not None and not Path(path).exists():
        raise config.ConfigError(f"config file {path} does not exist")
    given_token = getattr(args, "token", None)
    if given_token is not None and auth.token_problem(given_token, "--token"):
        raise config.ConfigError(auth.token_problem(given_token, "--token"))
    settings = config.load(Path(path) if path else default_config_path(), CONFIG_KEYS)
    for option, key in OPTION_TO_KEY.items():
        value = getattr(args, option, None)
        if value is not None:
            settings[key] = value
    if not config.is_port(settings["port"]):
        raise config.ConfigError(f"--port {settings['port']} is not a port number 1-65535")
    if not config.is_positive(settings["heartbeatTimeout"]):
        raise config.ConfigError(
            f"--heartbeat-timeout {settings['heartbeatTimeout']:g} must be a number of seconds > 0")
    if getattr(args, "no_auth", None):
        settings["noAuth"] = True
    if getattr(args, "tls_only", None):
        settings["tlsOnly"] = True
    if settings["tlsOnly"] and not settings["tlsCert"]:
        raise config.ConfigError("--tls-only needs --tls-cert and --tls-key")
    return settings


def config_path(args) -> Path:
    return Path(args.config) if getattr(args, "config", None) else default_config_path()


def scheme(settings: dict) -> str:
    return "wss" if settings.get("tlsCert") else "ws"


def ensure_token(args, settings: dict, port: int | str = "PORT") -> None:
    """Secure by default: with no token configured, make one, save it (0600) and show it once.
    The admin page's own token is made the same way (also on an open relay).

    A --token given on the command line is saved too, so a background worker reads it from
    the file rather than from its command line.
    """
    ensure_admin_token(args, settings, port)
    if settings["noAuth"]:
        return
    path = config_path(args)
    given = getattr(args, "token", None)
    if settings["token"] and not given:
        return
    saved = load_file_settings(path)
    saved["token"] = given or auth.generate_token()
    config.save(path, saved)
    settings["token"] = saved["token"]
    if not given:
        print(f"generated a token for this relay, saved in {path} (mode 0600):")
        print(f"  {saved['token']}")
        print("clients connect with:")
        print(f"  python -m chuantou_client start --server {scheme(settings)}://<this host's address>:{port} --token {saved['token']}")
        print("show it again with: python -m chuantou_server token", flush=True)


def ensure_admin_token(args, settings: dict, port: int | str = "PORT") -> None:
    """The admin page needs its own token (never a client's): make and save one if there is none."""
    if settings["adminToken"]:
        return
    path = config_path(args)
    saved = load_file_settings(path)
    saved["adminToken"] = settings["adminToken"] = auth.generate_token()
    config.save(path, saved)
    print(f"generated an admin token for this relay's page and API, saved in {path} (mode 0600):")
    print(f"  {settings['adminToken']}")
    page = local_url("https" if settings.get("tlsCert") else "http", settings.get("host") or "0.0.0.0", port)
    print(f"log in on {page}/ (or through an SSH tunnel); "
          "show it again with: python -m chuantou_server token --admin", flush=True)


def load_file_settings(path: Path) -> dict:
    """The config file's own keys (no defaults filled in), for rewriting it."""
    config.load(path, CONFIG_KEYS)  # validates
    return service.read_json(path) or {}


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
        **caps_settings(settings),
        data_channel_timeout=settings["dataChannelTimeout"],
        max_unregistered=settings["maxUnregistered"],
        max_unregistered_per_source=settings["maxUnregisteredPerSource"],
    )


def worker_args(args) -> list[str]:
    """The foreground command line equivalent to ``args``' run options."""
    out = []
    for option in ("host", "port", "heartbeat_timeout", "config", "log_level", "tls_cert", "tls_key"):
        value = getattr(args, option, None)
        if value is not None:
            if option in ("config", "tls_cert", "tls_key"):
                value = os.path.abspath(value)  # the worker may run from another directory (at boot)
            out += [f"--{option.replace('_', '-')}", str(value)]
    for flag in ("no_auth", "tls_only"):
        if getattr(args, flag, None):
            out.append(f"--{flag.replace('_', '-')}")
    return out  # never the token: it is saved in the config file, not shown in `ps`


# --- commands -------------------------------------------------------------------------------

def run_foreground(args) -> int:
    running = refuse_if_running(args, "command")  # before ensure_token, which saves a --token
    if running:  # a second copy would only fail on the busy port, after saving its options
        raise config.ConfigError(f"{running}; stop it first: python -m chuantou_server stop")
    settings = resolve_settings(args)
    logging.basicConfig(level=settings["logLevel"].upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stdout)
    logsafe.guard_handlers()
    threading.stack_size(512 * 1024)  # thousands of pump threads: keep their stacks modest
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    ensure_token(args, settings, settings["port"])
    server = make_server(settings)
    server.start()
    if not server.auth_required:
        logging.getLogger("chuantou.server").warning(
            "running an OPEN relay (--no-auth): anyone who reaches port %d can register clients and reach "
            "the ports they expose; drop --no-auth to require a token", server.port)
    facts = {"host": settings["host"], "port": server.port, "version": __version__,
             "tls": server.tls_context is not None, "options": running_options(settings, server.port)}
    with service.WorkerRecord(files(args), facts):
        print(f"chuantou relay listening on {settings['host']}:{server.port}; "
              f"clients connect with --server {scheme(settings)}://<this host>:{server.port}", flush=True)
        try:
            while not stop.wait(1.0):
                pass
        except KeyboardInterrupt:
            pass
        finally:
            server.stop()
    return 0


def cmd_start(args) -> int:
    svc = files(args)
    if service.already_running(svc):
        print(refuse_if_running(args, "start"))
        if args.autostart:  # the one start option that can be applied to a running relay
            service.install_autostart_or_warn(svc, MODULE, worker_args(args))
        return 0
    settings = resolve_settings(args)  # fail here, in the user's terminal, on a bad config
    with config_restored_on_failure(config_path(args)):  # a --token of a relay that did not start is not kept
        ensure_token(args, settings, settings["port"])
        worker = service.start_background(svc, MODULE, worker_args(args))
    port = worker.get("port")
    print(f"chuantou server started (pid {service.supervisor_pid(svc)}), listening on port {port}")
    print(f"clients connect with: python -m chuantou_client start --server {scheme(settings)}://<this host's address>:"
          f"{port}" + ("" if settings["noAuth"] else " --token TOKEN (see: python -m chuantou_server token)"))
    print(f"on this machine: {local_url(scheme(settings), settings['host'], port)}")
    print(f"log: {svc.log_file}")
    if args.autostart:
        service.install_autostart_or_warn(svc, MODULE, worker_args(args))
    return 0


def refuse_if_running(args, command: str) -> str | None:
    """None if no relay runs with this config; else the "already running" line when it uses every
    option given, or OptionsNotApplied naming those it does not use and how to apply them."""
    return startcheck.refuse_if_running(
        files(args), MODULE, getattr(args, "config", None), command, given_options(args),
        lambda pid, worker: f"chuantou server is already running (pid {pid}, port {worker.get('port')})",
        RUN_OPTION_DEFAULTS)


def cmd_stop(args) -> int:
    return service.stop_command(files(args), args.keep_autostart)


def local_address(host: str) -> str:
    """The address a command on this machine reaches a relay listening on ``host`` at: loopback
    of its family for a wildcard, the address itself otherwise (::1 answers on ::1 only)."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


def local_url(scheme_name: str, host: str, port: int) -> str:
    return f"{scheme_name}://{host_for_url(local_address(host))}:{port}"


def fetch_status(worker: dict, token: str | None, timeout: float = 3.0) -> dict:
    """Ask the running relay itself, over loopback, with the saved token."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    base = local_url("https" if worker.get("tls") else "http", worker.get("host", "127.0.0.1"), worker["port"])
    request = urllib.request.Request(base + "/api/status", headers=headers)
    context = None
    if worker.get("tls"):  # our own relay on loopback: the certificate names its public host, not 127.0.0.1
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}),  # loopback: never via http_proxy
                                         urllib.request.HTTPSHandler(context=context))
    with opener.open(request, timeout=timeout) as resp:
        return json.load(resp)


def cmd_status(args) -> int:
    svc = files(args)
    worker = service.running_worker(svc)
    supervisor = service.read_json(svc.supervisor_file) if service.supervisor_pid(svc) else None
    if worker is None:
        if supervisor:
            print(f"chuantou server is not running; its supervisor (pid {supervisor['pid']}) is restarting it",
                  file=sys.stderr)
        else:
            print("chuantou server is not running (start it with: python -m chuantou_server start)", file=sys.stderr)
        return 1
    try:
        settings = resolve_settings(args)
        status = fetch_status(worker, settings["adminToken"])
    except (OSError, ValueError) as exc:
        print(f"chuantou server pid {worker['pid']} is running but does not answer on port {worker['port']}: {exc}",
              file=sys.stderr)
        return 1
    print(f"chuantou server is running (pid {worker['pid']})")
    print(f"  port:       {status['port']}")
    print(f"  uptime:     {service.format_duration(status['uptime'])}")
    print(f"  clients:    {status['clients']}")
    print(f"  sessions:   {status['sessions']}")
    if supervisor:
        print(f"  supervisor: pid {supervisor['pid']}, restarts {supervisor['restarts']}")
    else:
        print("  supervisor: none (running in the foreground)")
    print(f"  log:        {svc.log_file}")
    return 0


def cmd_logs(args) -> int:
    return service.logs_command(files(args), args.lines, args.follow)


def cmd_token(args) -> int:
    settings = resolve_settings(args)
    path = config_path(args)
    if args.admin and args.action != "list":
        return admin_token_command(args, settings, path)
    if args.action == "show":
        if settings["noAuth"]:
            print(f"this relay is configured as open (noAuth in {path}); remove that to require a token")
            return 0
        if not settings["token"]:
            ensure_token(args, settings, settings["port"])
            return 0
        print(settings["token"])
        print(f"clients connect with: python -m chuantou_client start --server {scheme(settings)}://<this host's address>:"
              f"{settings['port']} --token {settings['token']}")
        return 0
    saved = load_file_settings(path)
    if args.action == "list":
        if settings["adminToken"]:
            print(f"admin token      {auth.fingerprint(settings['adminToken'])}")
        if settings["token"]:
            print(f"relay token      {auth.fingerprint(settings['token'])}")
        for token in settings["extraTokens"]:
            print(f"extra token      {auth.fingerprint(token)}")
        for client_id, token in settings["clientTokens"].items():
            print(f"client {client_id:<10}{auth.fingerprint(token)}")
        return 0
    if args.action == "add":
        new = auth.generate_token()
        if args.client_id:
            saved.setdefault("clientTokens", {})[args.client_id] = new
        else:
            saved.setdefault("extraTokens", []).append(new)
        config.save(path, saved)
        print(new)
        scope = f"only client ID {args.client_id} may use it" if args.client_id else "any client ID may use it"
        print(f"saved in {path} ({scope}); the client connects with: python -m chuantou_client start "
              f"--server {scheme(settings)}://<this host's address>:{settings['port']} --token {new}"
              + (f" --client-id {args.client_id}" if args.client_id else ""))
    else:
        if args.client_id:
            found = saved.get("clientTokens", {}).pop(args.client_id, None)
        elif args.fingerprint:
            extras = saved.get("extraTokens", [])
            kept = [t for t in extras if auth.fingerprint(t) != args.fingerprint]
            found = len(kept) != len(extras)
            saved["extraTokens"] = kept
        else:
            raise config.ConfigError("say which token to remove: --client-id ID or --fingerprint FP")
        if not found:
            raise config.ConfigError("no such token (see: python -m chuantou_server token list)")
        config.save(path, saved)
        print(f"token removed from {path}")
    if service.running_worker(files(args)):
        print("restart the relay to apply: python -m chuantou_server stop && python -m chuantou_server start")
    return 0


def admin_token_command(args, settings: dict, path: Path) -> int:
    """token --admin: show (making it if missing), add (replace) or remove the admin page's token."""
    if args.action == "show":
        if settings["adminToken"]:
            print(settings["adminToken"])
            print(f"log in on http://127.0.0.1:{settings['port']}/ with it (or send 'Authorization: Bearer <it>')")
        else:
            ensure_admin_token(args, settings, settings["port"])
        return 0
    saved = load_file_settings(path)
    if args.action == "add":
        saved["adminToken"] = auth.generate_token()
        config.save(path, saved)
        print(saved["adminToken"])
        print(f"saved in {path} as the admin token (the old one no longer works once the relay restarts)")
    else:
        raise config.ConfigError("the admin token cannot be removed, only replaced: token add --admin")
    if service.running_worker(files(args)):
        print("restart the relay to apply: python -m chuantou_server stop && python -m chuantou_server start")
    return 0


def cmd_supervise(args) -> int:
    worker = [a for a in args.worker_args if a != "--"]
    return service.supervise(service.files_for_worker("server", worker), MODULE, worker)


COMMANDS = {
    None: run_foreground,
    "start": cmd_start,
    "stop": cmd_stop,
    "status": cmd_status,
    "logs": cmd_logs,
    "token": cmd_token,
    "_supervise": cmd_supervise,
}


def main(argv=None) -> int:
    return service.run_command(COMMANDS, build_parser().parse_args(argv))
