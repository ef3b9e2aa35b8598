"""Command line of the client: run it (foreground or background service), and drive the
running client through its local API (proxies, online clients)."""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

from common import __version__, config, service
from common.cli_shell import Program, add_supervise_command, run_command
from common.errors import ChuantouError
from common.startcheck import config_restored_on_failure
from common.supervisor import stop_background

from . import apiauth
from .apicmds import api, cmd_clients, cmd_login_link, cmd_proxy, cmd_status
from .app import ClientApp, config_problems, default_config_path
from .client import DEFAULT_SERVER_URL
from .known_clients import KnownClients, known_clients_path
from .relays import ORDERS
from .startopts import RUN_OPTION_DEFAULTS, given_options
from .warm import DEFAULT_WARM, MAX_WARM

MODULE = "chuantou_client"

EXAMPLES = """examples:
  CHUANTOU_TOKEN=... python -m chuantou_client start --server ws://relay.example.com:8200 --client-id laptop
  python -m chuantou_client login-link
  python -m chuantou_client proxy create --local-port 9090 --target-client office --target-port 8080
  python -m chuantou_client proxy create --local-host 0.0.0.0 --local-port 9090 --target-client office --target-port 22
  python -m chuantou_client proxy create --local-port 9091 --target-client office --target-port 80 --bandwidth 10MiB/s
  python -m chuantou_client proxy list
  python -m chuantou_client clients
  python -m chuantou_client check-config            validate the config file without starting
  python -m chuantou_client status
  python -m chuantou_client forget-key office
  python -m chuantou_client stop
  sudo python -m chuantou_client install-service --server ws://relay:8200
"""


PROGRAM = Program(
    role="client", module=MODULE,
    describe_running=lambda pid, worker: f"chuantou client is already running (pid {pid}, ID {worker.get('clientId')})",
    given_options=given_options, option_defaults=RUN_OPTION_DEFAULTS,
    # token, --allow and --allow-host are saved in the config file by make_app
    worker_options=("server", "client_id", "admin_port", "config", "log_level"),
    boot_facts=(("--server", "server"),),  # at boot $CHUANTOU_SERVER is not set: name the relay used now
)
files = PROGRAM.files


class _JoinUrls(argparse.Action):
    """A repeated --server adds to the list: one comma-separated string, as it is saved."""

    def __call__(self, parser, namespace, values, option_string=None):
        before = getattr(namespace, self.dest, None)
        setattr(namespace, self.dest, f"{before},{values}" if before else values)


def _add_run_options(parser: argparse.ArgumentParser, inherit: bool) -> None:
    default = argparse.SUPPRESS if inherit else None
    parser.add_argument("--server", default=default, metavar="URL", action=_JoinUrls,
                        help=f"relay URL, saved for next time; several (a cluster's nodes, tried in order): "
                             f"repeat it or separate with commas (default: $CHUANTOU_SERVER, the saved one, "
                             f"or {DEFAULT_SERVER_URL})")
    parser.add_argument("--server-order", choices=ORDERS, default=default, dest="server_order",
                        help="with several --server URLs: try them in-order (as given), or in a random order "
                             "chosen once per start, so many clients spread over a cluster's nodes (saved; "
                             "default in-order)")
    parser.add_argument("--client-id", default=default, metavar="ID",
                        help="this client's ID, saved (default: generated once and reused)")
    parser.add_argument("--admin-port", type=int, default=default, metavar="PORT",
                        help="port of the local API and page on 127.0.0.1 (default 8201)")
    parser.add_argument("--config", default=default, metavar="FILE",
                        help=f"config file (default {default_config_path()})")
    parser.add_argument("--log-level", choices=config.LOG_LEVELS, default=default)
    parser.add_argument("--token", default=default,
                        help="the relay's token (16+ characters), saved (default: $CHUANTOU_TOKEN or the saved one). "
                             "While this process runs, other local users can read it in /proc/PID/cmdline: "
                             "prefer $CHUANTOU_TOKEN or the saved config")
    parser.add_argument("--allow", default=default, metavar="PORTS",
                        help="ports other clients may reach on this machine, e.g. 22,3000-3999, or none (saved; "
                             "default: every port on 127.0.0.1)")
    parser.add_argument("--allow-host", action="append", dest="allow_hosts", default=default, metavar="HOST",
                        help="also let other clients reach this host of your network (repeatable, saved)")
    parser.add_argument("--ca", default=default, metavar="PEM", help="trust this CA for a wss:// relay (saved)")
    parser.add_argument("--tls-fingerprint", default=default, metavar="SHA256",
                        help="pin the wss:// relay's certificate by its SHA-256 fingerprint (saved)")
    parser.add_argument("--tls-insecure", action="store_true", default=default,
                        help="do not verify the relay's certificate (dangerous; saved)")
    parser.add_argument("--allow-from", action="append", dest="allow_from", default=default, metavar="ID|SHA256:...",
                        help="only these clients may reach this one: client IDs (held to the key pinned at their "
                             "first session) or key fingerprints (repeatable or comma-separated, saved)")
    parser.add_argument("--path", choices=("auto", "relay", "direct"), default=default,
                        help="TCP sessions and UDP flows: auto tries a direct path to the peer for up to "
                             "--direct-deadline and falls back to the relay; relay never tries; direct drops a "
                             "session that cannot go direct (saved; default auto)")
    parser.add_argument("--direct-deadline", type=float, default=default, metavar="SECONDS",
                        help="how long a new UDP flow waits for a direct path (saved; default 1)")
    parser.add_argument("--pool-count", type=int, dest="pool_count", default=default, metavar="N",
                        help="data channels kept open to the relay ahead of sessions, so a new session need not "
                             "open a connection first; 0-64, 0: none (saved; default 2)")
    parser.add_argument("--allow-unsealed", action="store_true", dest="allow_unsealed", default=default,
                        help="let sessions with peers that cannot seal (older chuantou clients, which register "
                             "no key) run unsealed, readable and alterable by the relay, instead of refusing them "
                             "(saved; per proxy: proxy create --allow-unsealed)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m chuantou_client", description="chuantou client: reach services on other machines "
        "through a chuantou relay.", epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"chuantou {__version__}")
    _add_run_options(parser, inherit=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    PROGRAM.add_start_command(sub, "python -m chuantou_client start --server ws://relay:8200 --autostart",
                              _add_run_options)
    stop = PROGRAM.add_stop_command(sub)

    sub.add_parser("status", help="connection state, ID, relay, proxies", epilog="example: python -m chuantou_client status")

    logs = PROGRAM.add_logs_command(sub, "python -m chuantou_client logs -f")

    proxy = sub.add_parser("proxy", help="create, list and delete proxies",
                           epilog="example: python -m chuantou_client proxy list")
    proxy_sub = proxy.add_subparsers(dest="proxy_command", metavar="ACTION", required=True)
    create = proxy_sub.add_parser(
        "create", help="listen on a local port that leads to a port on another client",
        epilog="example: python -m chuantou_client proxy create --local-port 9090 --target-client B --target-port 8080")
    create.add_argument("--local-port", type=int, required=True, help="port to listen on here")
    create.add_argument("--local-host", metavar="ADDR",
                        help="address to listen on, like ssh -L's bind_address (default 127.0.0.1; ::1 for IPv6, "
                             "0.0.0.0 or :: to let other machines use the proxy too)")
    create.add_argument("--target-client", required=True, metavar="ID", help="the client whose port to reach")
    create.add_argument("--target-port", type=int, required=True, help="port on the target client's machine")
    create.add_argument("--protocol", choices=("tcp", "udp", "both"), default="both", help="default both")
    create.add_argument("--target-host", metavar="HOST",
                        help="a host on the target's network (default its 127.0.0.1; it must --allow-host it)")
    create.add_argument("--target-fingerprint", metavar="SHA256:...",
                        help="the target's key as its `status` shows it: sessions refuse any other key, even the "
                             "first (default: trust the key of the first session and pin it)")
    create.add_argument("--bandwidth", metavar="RATE",
                        help="limit each direction to RATE bytes/s over all the proxy's connections: 512KiB/s, "
                             "10MiB/s, 1GiB/s or a plain number (default: no limit; UDP over it is dropped)")
    create.add_argument("--allow-unsealed", action="store_true",
                        help="if the target cannot seal (an older chuantou), reach it unsealed, readable and "
                             "alterable by the relay (default: refuse; saved with the proxy)")
    create.add_argument("--warm", type=int, metavar="N", default=None,
                        help=f"TCP sessions kept set up ahead of users (requested, joined and sealed; the target "
                             f"connects to its service only when a user comes), so a new connection starts at once: "
                             f"0-{MAX_WARM}, 0 for none (default {DEFAULT_WARM}; with --path relay only)")
    proxy_sub.add_parser("list", help="proxies with their connections and bytes",
                         epilog="example: python -m chuantou_client proxy list")
    delete = proxy_sub.add_parser("delete", help="close a proxy and forget it",
                                  epilog="example: python -m chuantou_client proxy delete --local-port 9090")
    delete.add_argument("--local-port", type=int, required=True)

    sub.add_parser("clients", help="clients online on the relay", epilog="example: python -m chuantou_client clients")
    forget = sub.add_parser("forget-key", help="forget the pinned key of a peer, accepting its next one",
                            epilog="example: python -m chuantou_client forget-key office")
    forget.add_argument("peer", metavar="ID", help="the peer's client ID")
    sub.add_parser("login-link", help="print a one-time link that logs a browser in to the page",
                   epilog="example: python -m chuantou_client login-link")

    add_supervise_command(sub)
    api_commands = (create, proxy_sub.choices["list"], delete, sub.choices["clients"], sub.choices["status"],
                    sub.choices["login-link"])
    for command in api_commands:
        command.add_argument("--admin-port", type=int, default=argparse.SUPPRESS, metavar="PORT",
                             help="talk to the client whose local API is on this port (default: the running one)")
    for command in (stop, logs, forget, *api_commands):
        PROGRAM.add_config_option(command)
    PROGRAM.add_check_config_command(sub)
    PROGRAM.add_service_commands(sub, _add_run_options)
    return parser


# --- running --------------------------------------------------------------------------------

def config_file(args) -> Path:
    return Path(args.config) if getattr(args, "config", None) else default_config_path()


def make_app(args, path: Path | None = None) -> ClientApp:
    """The client with the command line's options over its config file, or over ``path``
    (made if missing), saved, nothing started yet."""
    path = path or config_file(args)
    overrides = {"server": getattr(args, "server", None), "clientId": getattr(args, "client_id", None),
                 "adminPort": getattr(args, "admin_port", None), "token": getattr(args, "token", None),
                 "allow": getattr(args, "allow", None), "allowHosts": getattr(args, "allow_hosts", None),
                 "ca": os.path.abspath(args.ca) if getattr(args, "ca", None) else None, "tlsFingerprint": getattr(args, "tls_fingerprint", None),
                 "tlsInsecure": getattr(args, "tls_insecure", None), "logLevel": getattr(args, "log_level", None),
                 "allowFrom": getattr(args, "allow_from", None), "path": getattr(args, "path", None),
                 "directDeadline": getattr(args, "direct_deadline", None),
                 "allowUnsealed": getattr(args, "allow_unsealed", None),
                 "poolCount": getattr(args, "pool_count", None),
                 "serverOrder": getattr(args, "server_order", None)}
    service_files = files(args)
    return ClientApp(path, overrides, api_secret_path=apiauth.secret_path(service_files.state_dir, service_files.name))


def run_foreground(args) -> int:
    return PROGRAM.run_foreground(args, make_app, announce)


def announce(app: ClientApp, stop: threading.Event) -> None:
    print(f"client {app.client.client_id} -> {app.server_url}; page and API: "
          f"http://127.0.0.1:{app.admin.port}/; config: {app.config_path}", flush=True)
    print(foreground_login_line(app), flush=True)
    deadline = time.monotonic() + 5.0
    while not (app.client.connected or stop.is_set()) and time.monotonic() < deadline:
        stop.wait(0.1)  # SIGTERM sets `stop`: answer it now, not after this wait
    if app.client.control.state == "failed":  # refused before it ever registered: no retries
        print(f"error: {app.client.control.last_error}; not retrying",
              flush=True)
    elif not (app.client.connected or stop.is_set()):
        print(f"not registered yet ({app.client.control.last_error or 'connecting'}); "
              f"retrying in the background", flush=True)


def foreground_login_line(app) -> str:
    # Only to a terminal: under `start` this output goes to the log file, which others may read.
    if sys.stdout.isatty():
        return f"log in to the page (once) at: {app.admin.login_link()}"
    return "log in to the page with the link printed by: python -m chuantou_client login-link"


def prepare_service_config(args, path: Path) -> None:
    """install-service: the service's config with the relay, ID and token given, saved now."""
    app = make_app(args, path)
    print(f"config: {path} (client {app.client.client_id}, relay {app.server_url})")


def cmd_start(args) -> int:
    return PROGRAM.start(args, lambda svc: launch(args, svc))


def launch(args, svc: service.ServiceFiles) -> dict:
    with config_restored_on_failure(config_file(args)):  # options of a client that did not start are not kept
        app = make_app(args)  # validates the config and saves --server, --client-id, --token, in the user's terminal
        worker = PROGRAM.start_background(svc, args)
        print(f"chuantou client {worker.get('clientId')} started (pid {service.supervisor_pid(svc)}), "
              f"relay {worker.get('server')}")
        print(f"page and API: http://127.0.0.1:{worker.get('adminPort')}/")
        print(f"config: {worker.get('configPath')}")
        print(f"this client {app.client.export.describe()}")
        try:
            print(registration_outcome(args))
        except RegistrationFailed:  # as frp's client does: a wrong token at the first start is an error
            stop_background(svc)
            raise
        print(login_link_line(args))
    return worker


class RegistrationFailed(ChuantouError):
    """The relay refused the first registration (wrong token, ID taken, other version)."""


def registration_outcome(args, wait: float = 5.0) -> str:
    """One line on whether the freshly started client registered, waiting a few seconds;
    RegistrationFailed if the relay refused it."""
    deadline = time.monotonic() + wait
    status = {}
    while time.monotonic() < deadline:
        try:
            status = api(args, "GET", "/api/status")
        except ChuantouError:
            status = {}
        if status.get("state") in ("connected", "failed"):
            break
        time.sleep(0.1)  # polling another process's API, bounded by the deadline
    if status.get("state") == "connected":
        return f"registered with the relay as {status['clientId']}"
    if status.get("state") == "failed":
        raise RegistrationFailed(f"{status.get('lastError')}; the background "
                                 f"client is stopped")
    return f"warning: not registered ({status.get('lastError') or status.get('state', 'no answer')}); " \
           f"see: python -m chuantou_client status"


def login_link_line(args) -> str:
    try:
        return f"log in to the page (once) at: {api(args, 'POST', '/api/login-link')['url']}"
    except ChuantouError as exc:
        return f"warning: no login link for the page ({exc})"


def cmd_forget_key(args) -> int:
    """Edit known_clients directly: works whether the client runs or not (it rereads the file)."""
    path = known_clients_path(config_file(args))
    if KnownClients(path).forget(args.peer):
        print(f"forgot the key of {args.peer} (in {path}); its next session pins the key it proves")
    else:
        print(f"no key of {args.peer} is pinned in {path}")
    return 0


COMMANDS = {
    None: run_foreground,
    "start": cmd_start,
    "stop": PROGRAM.stop,
    "status": cmd_status,
    "logs": PROGRAM.logs,
    "proxy": cmd_proxy,
    "clients": cmd_clients,
    "login-link": cmd_login_link,
    "install-service": lambda args: PROGRAM.install_service(args, prepare_service_config),
    "check-config": lambda args: PROGRAM.check_config(config_file(args), bool(getattr(args, "config", None)),
                                                      config_problems),
    "uninstall-service": PROGRAM.uninstall_service,
    "forget-key": cmd_forget_key,
    "_supervise": PROGRAM.supervise,
}


def main(argv=None) -> int:
    return run_command(COMMANDS, build_parser().parse_args(argv))
