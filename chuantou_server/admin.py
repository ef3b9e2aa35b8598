"""The relay's admin page and JSON API, served on the relay's own port.

Routes::

    GET  /                               the page (the login form while not logged in)
    GET  /static/<file>                  its CSS and JavaScript
    POST /login                          admin token in "Authorization: Bearer"; sets a session cookie
    POST /logout                         ends that session
    GET  /healthz                        200 while the relay serves, 503 when stopping or out of descriptors
    GET  /metrics                        Prometheus metrics (metrics.py says who may scrape)
    GET  /api/status                     version, uptime, port, threads, sockets, memory, totals
    GET  /api/clients                    online clients with their sessions and bytes
    GET  /api/sessions                   sessions with bytes and rates each way
    GET  /api/traffic                    throughput, one sample a second for five minutes
    POST /api/clients/<id>/disconnect    take a client offline (it will reconnect on its own)
    POST /api/sessions/<id>/close        close a session (full id or a unique prefix)

Access needs the admin token (``server.config.admin_token``), which is not a registration
token: a client's token never opens this page. Without an admin token the page and API are
off (403 naming the fix); /healthz needs no credential and /metrics its own rule (metrics.py).
Every page and API request needs ``Authorization: Bearer <admin
token>`` or the cookie of a login session (random, kept on the relay, expiring; see
admin_sessions.py).
Failed tokens are limited per source. A POST whose Origin is not this page's own is refused.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import os
import re
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable
from urllib.parse import unquote, urlsplit

from common import __version__, pages

from . import metrics
from .httpd import Request

if TYPE_CHECKING:
    from .server import Server

COOKIE_PREFIX = "chuantou_admin_"  # + the port: relays on one host keep apart
STATIC = Path(__file__).with_name("static")
TEXT = "text/plain; charset=utf-8"


def handle(server: Server, request: Request, peer: tuple) -> tuple:
    """Return (status, content type, body[, headers]) for a plain HTTP request on the relay port."""
    refused = _refusal(request)
    if refused is not None:
        return refused
    method, path = request.method, request.path
    if path.startswith("/static/") and method in ("GET", "HEAD"):
        return _static(path[len("/static/"):])
    if path in OPERATIONS_PATHS:
        if method not in ("GET", "HEAD"):
            return 405, TEXT, f"{method} is not allowed on {path}\n"
        return _healthz(server) if path == "/healthz" else _metrics(server, request, peer)
    if path != "/" and path not in ("/login", "/logout") and not path.startswith("/api/"):
        return 404, TEXT, "not found\n"
    if server.config.admin_token is None:
        return _disabled(path)
    if path == "/login" and method == "POST":
        return _login(server, request, peer)
    if path == "/logout" and method == "POST":
        return _logout(server, request)
    access = _access(server, request, peer)
    if access == LIMITED:
        return _too_many_failures()
    if path == "/" and method in ("GET", "HEAD"):
        return _static("index.html" if access == ALLOWED else "login.html")
    if not path.startswith("/api/"):
        return 404, TEXT, "not found\n"
    if access != ALLOWED:
        return _json(401, {"error": "this relay's admin API needs its admin token: send 'Authorization: Bearer "
                                    "<admin token>' or log in on the page (show the admin token with: "
                                    "python -m chuantou_server token --admin)"})
    for route_method, pattern, view in ROUTES:
        match = re.fullmatch(pattern, path)
        if match and route_method == method:
            return view(server, *(unquote(g) for g in match.groups()))
    if any(re.fullmatch(pattern, path) for _, pattern, _ in ROUTES):
        return _json(405, {"error": f"{method} is not allowed on {path}"})
    return _json(404, {"error": f"no such endpoint: {path}"})


# --- access -------------------------------------------------------------------------------------

ALLOWED, DENIED, LIMITED = "allowed", "denied", "limited"
DISABLED = ("the admin page and API of this relay are off: it has no admin token. Make one with\n"
            "    python -m chuantou_server token --admin\n"
            "(saved as adminToken in the relay's config file, mode 0600) and restart the relay.\n")


def is_loopback(addr: tuple) -> bool:
    try:
        return ipaddress.ip_address(addr[0]).is_loopback
    except ValueError:
        return False


def _refusal(request: Request):
    """A 403/405 response if this request may not be served at all, else None."""
    if request.method not in ("GET", "HEAD", "POST"):
        return 405, TEXT, f"{request.method} is not allowed here\n"
    host = request.header("host")
    if request.method == "POST":
        origin = request.header("origin")
        if origin and (not host or urlsplit(origin).netloc != host):
            return _json(403, {"error": f"cross-origin request from {origin} refused"})
    return None


def _disabled(path: str) -> tuple:
    if path.startswith("/api/") or path in ("/login", "/logout"):
        return _json(403, {"error": " ".join(DISABLED.split())})
    return 403, TEXT, DISABLED


def _too_many_failures() -> tuple:
    return _json(429, {"error": "too many failed logins from your address: wait a minute, then use the admin "
                                "token (python -m chuantou_server token --admin)"}, {"Retry-After": "60"})


def cookie_name(server: Server) -> str:
    return f"{COOKIE_PREFIX}{server.port}"


def _cookie(server: Server, value: str, max_age: int) -> str:
    # No Domain: the cookie stays with this host. Cookies ignore ports, hence the port in the name.
    return f"{cookie_name(server)}={value}; Path=/; Max-Age={max_age}; HttpOnly; SameSite=Strict"


def _session_ids(server: Server, request: Request) -> list[str]:
    """Every value sent under this relay's cookie name (a page on another port may add one)."""
    found = []
    for part in request.header("cookie").split(";"):
        name, _, value = part.strip().partition("=")
        if name == cookie_name(server) and value:
            found.append(value)
    return found


def _bearer(request: Request) -> str | None:
    scheme, _, value = request.header("authorization").partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def _token_matches(server: Server, given: str, peer: tuple) -> str:
    """ALLOWED, DENIED (and counted against the source) or LIMITED (too many failures: not checked)."""
    failures = server.admin_login_failures
    if failures.blocked(peer[0]):
        return LIMITED
    admin_token = server.config.admin_token
    assert admin_token is not None  # handle() answers _disabled before any token is checked
    if hmac.compare_digest(given.encode("utf-8", "replace"), admin_token.encode()):
        return ALLOWED
    failures.failed(peer[0])
    return DENIED


def _access(server: Server, request: Request, peer: tuple) -> str:
    bearer = _bearer(request)
    if bearer is not None:
        return _token_matches(server, bearer, peer)
    if any(server.admin_sessions.check(value) for value in _session_ids(server, request)):
        return ALLOWED
    return DENIED


def _login(server: Server, request: Request, peer: tuple):
    given = _bearer(request)
    if given is None:
        return _json(401, {"error": "send the admin token as 'Authorization: Bearer <admin token>'"})
    result = _token_matches(server, given, peer)
    if result == LIMITED:
        return _too_many_failures()
    if result == DENIED:
        return _json(401, {"error": "wrong admin token"})
    session_id = server.admin_sessions.create()
    return _json(200, {"message": "logged in"},
                 {"Set-Cookie": _cookie(server, session_id, server.admin_sessions.max_age())})


def _logout(server: Server, request: Request):
    for value in _session_ids(server, request):
        server.admin_sessions.revoke(value)
    return _json(200, {"message": "logged out"}, {"Set-Cookie": _cookie(server, "", max_age=0)})


# --- operations: health and metrics --------------------------------------------------------

OPERATIONS_PATHS = ("/healthz", "/metrics")


def _healthz(server: Server) -> tuple:
    """No detail either way: anyone may ask, so the answer must tell a stranger nothing."""
    if metrics.healthy(server):
        return 200, TEXT, "ok\n"
    return 503, TEXT, "unavailable\n"


def _metrics(server: Server, request: Request, peer: tuple) -> tuple:
    session = any(server.admin_sessions.check(value) for value in _session_ids(server, request))
    access = metrics.access(server, peer, _bearer(request), session)
    if access == metrics.LIMITED:
        return _too_many_failures()
    if access != metrics.ALLOWED:
        return 401, TEXT, ("this relay's metrics need a credential: send 'Authorization: Bearer <metrics token>' "
                           "(metricsToken in the relay's config) or the admin token, or scrape from this host\n")
    content_type, body = server.metrics.exposition(request.header("accept"))
    return 200, content_type, body


# --- responses ----------------------------------------------------------------------------------

def _json(status: int, data, headers: dict | None = None) -> tuple:
    return status, "application/json", json.dumps(data), headers or {}


def _static(name: str) -> tuple:
    found = pages.static_file(STATIC, name)
    if found is None:
        return 404, TEXT, "not found\n"
    content_type, body, headers = found
    return 200, content_type, body, headers


# --- figures ------------------------------------------------------------------------------------

def _wall_clock(monotonic_time: float) -> float:
    return time.time() - (time.monotonic() - monotonic_time)


def _open_sockets() -> int | None:
    """Sockets among this process's open file descriptors (Linux), or None where unknown."""
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return None
    count = 0
    for name in names:
        try:
            count += os.readlink(f"/proc/self/fd/{name}").startswith("socket:")
        except OSError:  # closed meanwhile
            pass
    return count


def _open_files() -> int | None:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return None


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource  # peak, not current, where /proc is missing
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    except (ImportError, OSError):
        return None


def status(server: Server) -> tuple:
    data = server.status()
    data.update({
        "version": __version__,
        "host": server.config.host,
        "startedAt": server.started_at,
        "processThreads": threading.active_count(),
        "openSockets": _open_sockets(),
        "openFiles": _open_files(),
        "rssBytes": _rss_bytes(),
        "heartbeatTimeout": server.config.heartbeat_timeout,
        "tokenRequired": server.config.token is not None,
        "adminLogin": server.config.admin_token is not None,
        "openRelay": not server.auth_required,
        "totalBytes": server.traffic.total_bytes()[0],
        "bytesPerSecond": server.traffic.history.current()[0],
    })
    return _json(200, data)


def clients(server: Server) -> tuple:
    sessions = server.sessions.all()
    out = []
    for conn in server.registry.connections():
        cid = conn.client_id
        mine = [s for s in sessions if s.involves(cid)]
        sent, received = server.traffic.client_bytes(cid, mine)
        rate_sent = rate_received = 0.0
        for s in mine:
            a_to_b, b_to_a = server.traffic.session_rate(s.id)
            if s.client_a == cid:
                rate_sent, rate_received = rate_sent + a_to_b, rate_received + b_to_a
            if s.client_b == cid:
                rate_sent, rate_received = rate_sent + b_to_a, rate_received + a_to_b
        out.append({
            "id": cid,
            "remote": f"{conn.remote[0]}:{conn.remote[1]}",
            "connectedAt": conn.connected_at,
            "lastSeen": _wall_clock(conn.last_seen),
            "sessions": len(mine),
            "bytesSent": sent,
            "bytesReceived": received,
            "rateSent": rate_sent,
            "rateReceived": rate_received,
        })
    out.sort(key=lambda c: c["id"])
    return _json(200, {"clients": out})


SEALED_LABEL = "sealed (end to end)"
UNSEALED_LABEL = "not sealed"


def sessions(server: Server) -> tuple:
    out = []
    for s in sorted(server.sessions.all(), key=lambda s: s.created_at):
        rate_ab, rate_ba = server.traffic.session_rate(s.id)
        out.append({
            "id": s.id,
            "shortId": s.id[:8],
            "a": s.client_a,
            "b": s.client_b,
            "port": s.port,
            "protocol": s.protocol,
            "startedAt": s.created_at,
            "state": "relaying" if s.joined else "joining",
            "sealed": s.sealed,  # both sides registered keys: sealed end to end, unreadable here
            "sealing": SEALED_LABEL if s.sealed else UNSEALED_LABEL,
            "bytesAToB": s.bytes_a_to_b,
            "bytesBToA": s.bytes_b_to_a,
            "rateAToB": rate_ab,
            "rateBToA": rate_ba,
        })
    return _json(200, {"sessions": out})


def traffic(server: Server) -> tuple:
    return _json(200, {
        "interval": server.traffic.interval,
        "totalBytes": server.traffic.total_bytes()[0],
        "samples": server.traffic.history.history(),  # [unix time, bytes/s]
    })


def disconnect_client(server: Server, client_id: str) -> tuple:
    conn = server.registry.get(client_id)
    if conn is None:
        return _json(404, {"error": f"client {client_id!r} is not online"})
    server.drop_client(conn, "disconnected by admin")
    return _json(200, {"message": f"client {client_id} disconnected (it reconnects on its own unless stopped)"})


def close_session(server: Server, session_id: str) -> tuple:
    session_id = session_id.lower()
    found = [s for s in server.sessions.all()
             if s.id == session_id or (len(session_id) >= 6 and s.id.startswith(session_id))]
    if len(found) != 1:
        problem = "matches several sessions" if found else "is not an open session"
        return _json(404, {"error": f"session {session_id!r} {problem}"})
    server.close_session(found[0], "closed by admin")
    return _json(200, {"message": f"session {found[0].id[:8]} closed"})


ROUTES: list[tuple[str, str, Callable[..., tuple]]] = [
    ("GET", r"/api/status", status),
    ("GET", r"/api/clients", clients),
    ("GET", r"/api/sessions", sessions),
    ("GET", r"/api/traffic", traffic),
    ("POST", r"/api/clients/([^/]+)/disconnect", disconnect_client),
    ("POST", r"/api/sessions/([0-9a-fA-F]+)/close", close_session),
]
