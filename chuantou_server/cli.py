"""Command line of the relay: run in the foreground, or start/stop/status/logs a background
service under a supervisor, with an optional saved config file."""

from __future__ import annotations

import argparse
import json
import ssl
import sys
import threading
import urllib.request
from pathlib import Path

from common import __version__, auth, config, service
from common.cli_shell import Program, add_supervise_command, local_opener, run_command
from common.errors import ChuantouError
from common.startcheck import config_restored_on_failure

from .app import ServerApp, config_problems, default_config_path, load_file_settings, local_url
from .app import local_address  # noqa: F401 (part of this module's API: tests and status use it)
from .cluster_view import status_lines
from .settings import DATA_NODE_POLICIES
from .startopts import RUN_OPTION_DEFAULTS, given_options

MODULE = "chuantou_server"
EXAMPLES = """examples:
  python -m chuantou_server                      run in the foreground on port 8200
  python -m chuantou_server start --autostart    run in the background, also at boot
  python -m chuantou_server status
  python -m chuantou_server logs -f
  python -m chuantou_server check-config         validate server.json without starting
  python -m chuantou_server stop
  sudo python -m chuantou_server install-service  run at boot as a systemd system service
"""


PROGRAM = Program(
    role="server", module=MODULE,
    describe_running=lambda pid, worker: f"chuantou server is already running (pid {pid}, port {worker.get('port')})",
    given_options=given_options, option_defaults=RUN_OPTION_DEFAULTS,
    worker_options=("host", "port", "heartbeat_timeout", "config", "log_level", "tls_cert", "tls_key",
                    "cluster", "node_id", "advertise", "redirect_margin", "data_node"),
    path_options=frozenset({"config", "tls_cert", "tls_key"}), worker_flags=("no_auth", "tls_only"),
)
files = PROGRAM.files


def _add_run_options(parser: argparse.ArgumentParser, inherit: bool) -> None:
    # In subcommands the defaults are SUPPRESS, so options given before the subcommand survive.
    default = argparse.SUPPRESS if inherit else None
    parser.add_argument("--host", default=default, help="address to listen on (default 0.0.0.0)")
    parser.add_argument("--port", type=int, default=default, help="TCP and UDP port (default 8200)")
    parser.add_argument("--heartbeat-timeout", type=float, default=default,
                        help="seconds of silence before a client is dropped (default 25)")
    parser.add_argument("--config", default=default, metavar="FILE",
                        help=f"config file (default {default_config_path()}, if it exists)")
    parser.add_argument("--log-level", choices=config.LOG_LEVELS, default=default)
    parser.add_argument("--token", default=default, help="token clients must prove, 16+ characters (default: the "
                        "saved one, generated on first start). While this process runs, other local users can read "
                        "it in /proc/PID/cmdline: prefer the saved config (python -m chuantou_server token)")
    parser.add_argument("--no-auth", action="store_true", default=default,
                        help="run an open relay: anyone who reaches the port may register (not recommended)")
    parser.add_argument("--tls-cert", default=default, metavar="PEM", help="serve TLS (wss://) on the same port "
                        "with this certificate chain")
    parser.add_argument("--tls-key", default=default, metavar="PEM", help="the certificate's private key")
    parser.add_argument("--tls-only", action="store_true", default=default, help="refuse plain connections")
    parser.add_argument("--probe-port", type=int, default=default, metavar="PORT",
                        help="a second UDP port that answers NAT probes, so clients can tell whether their NAT "
                             "allows a direct path (default: none)")
    parser.add_argument("--metrics-token", default=default, metavar="TOKEN",
                        help="a token (16+ characters) that may read /metrics from anywhere, as 'Authorization: "
                        "Bearer TOKEN'; saved in the config file (metricsToken). Loopback and the admin token "
                        "may read it anyway")
    parser.add_argument("--cluster", default=default, metavar="REDIS_URL", help="be a node of a relay cluster "
                        "sharing this Redis: redis://HOST:6379/0 for one Redis (or Sentinel/a proxy in front of "
                        "it), redis+cluster://HOST:PORT for any node of a Redis Cluster (rediss:// and "
                        "rediss+cluster:// with TLS); needs pip install chuantou[cluster]")
    parser.add_argument("--node-id", default=default, metavar="NAME", help="this node's name in the cluster "
                        "(default: host name and port)")
    parser.add_argument("--advertise", default=default, metavar="URL", help="where clients reach this node, "
                        "e.g. ws://relay1.example.com:8200 (default: from --host and --port)")
    parser.add_argument("--redirect-margin", type=int, default=default, metavar="N", help="with --cluster: "
                        "answer a registering client with a redirect to the least loaded live node when this "
                        "node has at least N more clients than it (default 0: never redirect)")
    parser.add_argument("--data-node", choices=DATA_NODE_POLICIES, default=default,
                        help="where a session between clients on two nodes is pumped: b (B's node, the default) "
                             "or least-loaded (the live node with the fewest sessions)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m chuantou_server", description="chuantou relay server.", epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"chuantou {__version__}")
    _add_run_options(parser, inherit=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    PROGRAM.add_start_command(sub, "python -m chuantou_server start --port 8200 --autostart", _add_run_options)
    stop = PROGRAM.add_stop_command(sub)

    status = sub.add_parser("status", help="is it running; port, uptime, clients, sessions",
                            epilog="example: python -m chuantou_server status")

    logs = PROGRAM.add_logs_command(sub, "python -m chuantou_server logs -f -n 100")

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
        PROGRAM.add_config_option(command)
    PROGRAM.add_check_config_command(sub)
    PROGRAM.add_service_commands(sub, _add_run_options)
    add_supervise_command(sub)
    return parser


def config_path(args) -> Path:
    return Path(args.config) if getattr(args, "config", None) else default_config_path()


def make_app(args, path: Path | None = None) -> ServerApp:
    """The relay with the command line's options over its config file, or over ``path``
    (made if missing), nothing started yet."""
    get = lambda name: getattr(args, name, None)  # noqa: E731
    overrides = {"host": get("host"), "port": get("port"), "heartbeatTimeout": get("heartbeat_timeout"),
                 "logLevel": get("log_level"), "token": get("token"), "tlsCert": get("tls_cert"),
                 "tlsKey": get("tls_key"), "noAuth": get("no_auth"), "tlsOnly": get("tls_only"),
                 "metricsToken": get("metrics_token"),
                 "cluster": get("cluster"), "nodeId": get("node_id"), "advertise": get("advertise"),
                 "redirectMargin": get("redirect_margin"), "dataNode": get("data_node"),
                 "probePort": get("probe_port")}
    return ServerApp(path or config_path(args), overrides, config_given=path is None and get("config") is not None)


# --- commands -------------------------------------------------------------------------------

def run_foreground(args) -> int:
    return PROGRAM.run_foreground(args, make_app, announce)


def announce(app: ServerApp, _stop: threading.Event) -> None:
    port = app.worker_facts()["port"]
    print(f"chuantou relay listening on {app.settings['host']}:{port}; "
          f"clients connect with --server {app.scheme}://<this host>:{port}", flush=True)


def cmd_start(args) -> int:
    return PROGRAM.start(args, lambda svc: launch(args, svc))


def launch(args, svc: service.ServiceFiles) -> dict:
    app = make_app(args)  # fail here, in the user's terminal, on a bad config
    settings = app.settings
    with config_restored_on_failure(app.config_path):  # a --token of a relay that did not start is not kept
        app.ensure_token(settings["port"])
        worker = PROGRAM.start_background(svc, args)
    port = worker.get("port")
    print(f"chuantou server started (pid {service.supervisor_pid(svc)}), listening on port {port}")
    print(f"clients connect with: python -m chuantou_client start --server {app.scheme}://<this host's address>:"
          f"{port}" + ("" if settings["noAuth"] else " --token TOKEN (see: python -m chuantou_server token)"))
    print(f"on this machine: {local_url(app.scheme, settings['host'], port)}")
    return worker


def prepare_service_config(args, path: Path) -> None:
    """install-service: the service's config with its tokens, made now so root sees them once."""
    app = make_app(args, path)
    app.ensure_token(app.settings["port"])
    print(f"config: {path}")


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
    with local_opener(urllib.request.HTTPSHandler(context=context)).open(request, timeout=timeout) as resp:
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
        status = fetch_status(worker, make_app(args).settings["adminToken"])
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
    if isinstance(status.get("cluster"), dict):  # a node of a cluster: its view of the others
        print("\n".join(status_lines(status["cluster"])))
    return 0


def cmd_token(args) -> int:
    app = make_app(args)
    settings, path = app.settings, app.config_path
    if args.admin and args.action != "list":
        return admin_token_command(args, app)
    if args.action == "show":
        if settings["noAuth"]:
            print(f"this relay is configured as open (noAuth in {path}); remove that to require a token")
            return 0
        if not settings["token"]:
            app.ensure_token(settings["port"])
            return 0
        print(settings["token"])
        print(f"clients connect with: python -m chuantou_client start --server {app.scheme}://<this host's address>:"
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
              f"--server {app.scheme}://<this host's address>:{settings['port']} --token {new}"
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
            raise ChuantouError("say which token to remove: --client-id ID or --fingerprint FP")
        if not found:
            raise ChuantouError("no such token (see: python -m chuantou_server token list)")
        config.save(path, saved)
        print(f"token removed from {path}")
    if service.running_worker(files(args)):
        print("restart the relay to apply: python -m chuantou_server stop && python -m chuantou_server start")
    return 0


def admin_token_command(args, app: ServerApp) -> int:
    """token --admin: show (making it if missing), add (replace) or remove the admin page's token."""
    settings, path = app.settings, app.config_path
    if args.action == "show":
        if settings["adminToken"]:
            print(settings["adminToken"])
            print(f"log in on http://127.0.0.1:{settings['port']}/ with it (or send 'Authorization: Bearer <it>')")
        else:
            app.ensure_admin_token(settings["port"])
        return 0
    saved = load_file_settings(path)
    if args.action == "add":
        saved["adminToken"] = auth.generate_token()
        config.save(path, saved)
        print(saved["adminToken"])
        print(f"saved in {path} as the admin token (the old one no longer works once the relay restarts)")
    else:
        raise ChuantouError("the admin token cannot be removed, only replaced: token add --admin")
    if service.running_worker(files(args)):
        print("restart the relay to apply: python -m chuantou_server stop && python -m chuantou_server start")
    return 0


COMMANDS = {
    None: run_foreground,
    "start": cmd_start,
    "stop": PROGRAM.stop,
    "status": cmd_status,
    "logs": PROGRAM.logs,
    "token": cmd_token,
    "install-service": lambda args: PROGRAM.install_service(args, prepare_service_config),
    "uninstall-service": PROGRAM.uninstall_service,
    "check-config": lambda args: PROGRAM.check_config(config_path(args), bool(getattr(args, "config", None)),
                                                      config_problems),
    "_supervise": PROGRAM.supervise,
}


def main(argv=None) -> int:
    return run_command(COMMANDS, build_parser().parse_args(argv))
