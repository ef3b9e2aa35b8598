"""The commands that drive a running client through its local API (status, proxy, clients,
login-link): the API secret is read from the state directory and sent as ``X-Chuantou-Key``."""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from common import service
from common.bandwidth import format_bandwidth
from common.cli_shell import LOCAL_OPENER
from common.errors import ChuantouError

from . import apiauth
from .listen import DEFAULT_LOCAL_HOST, listen_address

START_HINT = "start one with: python -m chuantou_client start --server ws://RELAY-HOST:8200"


def files(args) -> service.ServiceFiles:
    return service.ServiceFiles.for_role("client", getattr(args, "config", None))


class NoClientRunning(ChuantouError):
    pass


def secret_file(args, port: int) -> Path:
    """The API secret of the client on ``port``: the one of --config's client, or of whichever
    running client of this user announced that port (``--admin-port`` alone)."""
    own = files(args)
    worker = service.running_worker(own)
    if worker is None or worker.get("adminPort") != port:
        for record in sorted(own.state_dir.glob("client*.worker.json")):
            info = service.read_json(record)
            if info and info.get("adminPort") == port and service.pid_alive(info.get("pid")):
                return apiauth.secret_path(own.state_dir, record.name[:-len(".worker.json")])
    return apiauth.secret_path(own.state_dir, own.name)


def api(args, method: str, path: str, body: dict | None = None) -> dict:
    """Call the running client's local API with its secret; raise ChuantouError with its error message."""
    port = getattr(args, "admin_port", None)
    if port is None:
        worker = service.running_worker(files(args))
        if worker is None:
            raise NoClientRunning(f"no chuantou client is running; {START_HINT}")
        port = worker["adminPort"]
    headers, secret_problem = {}, None
    try:
        headers[apiauth.HEADER] = apiauth.read_secret(secret_file(args, port))
    except apiauth.SecretError as exc:  # ask anyway: is a client there at all? Its 401 gets this reason
        secret_problem = exc
    data = json.dumps(body).encode() if body is not None else None
    if data:
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method, headers=headers)
    try:
        with LOCAL_OPENER.open(request, timeout=15) as resp:
            return json.load(resp)
    except urllib.error.HTTPError as exc:
        if exc.code == 401 and secret_problem is not None:
            raise secret_problem from None
        try:
            message = json.load(exc).get("error") or str(exc)
        except ValueError:
            message = str(exc)
        raise ChuantouError(message) from None
    except (urllib.error.URLError, OSError) as exc:
        raise NoClientRunning(f"no chuantou client answers on 127.0.0.1:{port} ({getattr(exc, 'reason', exc)}); "
                              f"{START_HINT}") from None


def cmd_status(args) -> int:
    try:
        status = api(args, "GET", "/api/status")
    except NoClientRunning as exc:
        print(str(exc).replace("no chuantou client is running", "chuantou client is not running"), file=sys.stderr)
        return 1
    supervisor = service.read_json(files(args).supervisor_file) if service.supervisor_pid(files(args)) else None
    state = status["state"]
    if state == "reconnecting" and status.get("nextAttemptAt"):
        state += f" (next attempt in {max(0.0, status['nextAttemptAt'] - time.time()):.0f} s)"
    if status.get("lastError") and status["state"] != "connected":
        state += f": {status['lastError']}"
    print(f"chuantou client is running (pid {status['pid']})")
    print(f"  client ID:  {status['clientId']}")
    if status.get("fingerprint"):
        print(f"  key:        {status['fingerprint']}  (peers compare this to pin it)")
    print(f"  relay:      {status['serverUrl']}")
    print(f"  state:      {state}")
    print(f"  uptime:     {service.format_duration(time.time() - status['startedAt'])}")
    print(f"  proxies:    {len(status['proxies'])}, active sessions {status['activeSessions']}")
    direct = status.get("direct")
    if direct:
        nat = direct["nat"]
        seen = f" (the relay sees {nat['seenAs']})" if nat.get("seenAs") else ""
        filtering = f", {nat['filtering']}" if nat.get("filtering") else ""  # an older client's answer has none
        print(f"  NAT:        {nat['mapping']}{filtering}{seen}")
        print(f"  Path:       {direct['path']} (TCP and UDP; direct attempts wait at most {direct['deadline']:g} s)")
    for failed in status.get("failedProxies", []):
        print(f"  not running: proxy on port {failed['localPort']}: {failed['error']}")
    if supervisor:
        print(f"  supervisor: pid {supervisor['pid']}, restarts {supervisor['restarts']}")
    print(f"  page:       {status['adminUrl']}")
    print(f"  config:     {status['configPath']}")
    print(f"  log:        {files(args).log_file}")
    return 0


def cmd_proxy(args) -> int:
    if args.proxy_command == "create":
        reply = api(args, "POST", "/api/proxies", {
            "localPort": args.local_port, "targetClient": args.target_client,
            "targetPort": args.target_port, "protocol": args.protocol, "targetHost": args.target_host,
            "localHost": args.local_host, "targetFingerprint": args.target_fingerprint,
            "bandwidth": args.bandwidth,
            "allowUnsealed": bool(args.allow_unsealed),
            "warm": args.warm,
        })
        print(reply["message"])
        print(f"use it at: {reply['address']}")
        if reply.get("warning"):
            print(f"warning: {reply['warning']}", file=sys.stderr)
    elif args.proxy_command == "delete":
        print(api(args, "DELETE", f"/api/proxies/{args.local_port}")["message"])
    else:
        proxies = api(args, "GET", "/api/proxies")["proxies"]
        if not proxies:
            print("no proxies; create one with: python -m chuantou_client proxy create --local-port 9090 "
                  "--target-client ID --target-port 8080")
            return 0
        connections = api(args, "GET", "/api/connections")["connections"]
        rows: list[tuple[str, ...]] = [("LOCAL", "TARGET", "PROTOCOL", "SEALED", "LIMIT", "ACTIVE", "WARM", "SENT",
                                        "RECEIVED", "PATHS")]
        for x in proxies:
            rows.append((listen_address(x.get("localHost") or DEFAULT_LOCAL_HOST, x["localPort"]),
                         f"{x['targetClientId']}:{x['targetPort']}", x["protocol"], sealed_label(x),
                         format_bandwidth(x.get("bandwidth")), str(x["activeConnections"]), warm_label(x),
                         format_bytes(x["bytesSent"]), format_bytes(x["bytesReceived"]),
                         path_summary(connections, x["localPort"])))
        print_table(rows)
        if any(x.get("sealed") == "unsealed allowed" for x in proxies):
            print("* sealed end to end, except with a target that cannot seal (an older chuantou): then unsealed, "
                  "as --allow-unsealed allows")
        if connections:
            print()
            print_table(connection_rows(connections))
        for x in proxies:
            if x.get("lastError"):
                when = service.format_duration(time.time() - x["lastErrorAt"])
                print(f"{listen_address(x.get('localHost') or DEFAULT_LOCAL_HOST, x['localPort'])}: last failure {when} ago: {x['lastError']}")
    return 0


def warm_label(proxy: dict) -> str:
    """`proxy list`'s WARM column: warm sessions ready of those wanted (not users' connections)."""
    if "warm" not in proxy:
        return "-"  # an older client: none
    if not proxy["warm"] or "ready" not in proxy.get("warmState", ""):
        return "off"  # none asked for, or not on this client's path (warmState says why)
    return f"{proxy.get('warmReady', 0)}/{proxy['warm']}"


def print_table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


def path_summary(connections: list[dict], local_port: int) -> str:
    """`proxy list`'s PATHS column: how many of the proxy's running sessions go direct, how many
    through the relay ("-": none running)."""
    paths = [c.get("path", "?") for c in connections if c.get("side") == "A" and c.get("localPort") == local_port]
    if not paths:
        return "-"
    return ", ".join(f"{paths.count(path)} {path}" for path in dict.fromkeys(sorted(paths)))


def connection_rows(connections: list[dict]) -> list[tuple[str, ...]]:
    """The sessions running through this client (as A and as B), each with its path. Bytes: a TCP
    session's through the relay, a UDP flow's on the direct path (a relayed one counts per proxy)."""
    rows: list[tuple[str, ...]] = [("SESSION", "SIDE", "PEER", "PROTOCOL", "PATH", "SENT", "RECEIVED")]
    for c in connections:
        side = f"A from :{c['localPort']}" if c.get("side") == "A" and c.get("localPort") else f"B to :{c.get('port')}"
        if "bytesSent" in c:
            sent, received = format_bytes(c["bytesSent"]), format_bytes(c["bytesReceived"])
        elif "directBytesSent" in c:
            sent, received = format_bytes(c["directBytesSent"]), format_bytes(c["directBytesReceived"])
        else:
            sent = received = "-"
        rows.append((str(c.get("shortId") or c["id"][:8]), side, str(c.get("peer") or "?"), str(c.get("protocol")),
                     str(c.get("path", "?")), sent, received))
    return rows


def sealed_label(proxy: dict) -> str:
    """`proxy list`'s SEALED column: "yes" (end to end, always), or "yes*" when a target that
    cannot seal is reached unsealed (--allow-unsealed); older clients' answers say nothing."""
    sealed = proxy.get("sealed")
    if sealed == "unsealed allowed":
        return "yes*"  # explained under the table
    return "yes" if sealed in (True, "sealed") else "?"


def cmd_clients(args) -> int:
    status = api(args, "GET", "/api/status")
    clients = api(args, "GET", "/api/clients")["clients"]
    for client_id in clients:
        print(client_id + ("  (this client)" if client_id == status["clientId"] else ""))
    return 0


def cmd_login_link(args) -> int:
    print(api(args, "POST", "/api/login-link")["url"])
    return 0


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
