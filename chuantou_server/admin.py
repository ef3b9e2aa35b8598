"""The relay's admin page and JSON API, served on the relay's own port.

Routes::

    GET  /                               the page (the login form while not logged in)
    GET  /static/<file>                  its CSS and JavaScript
    POST /login                          token in "Authorization: Bearer"; sets an HttpOnly cookie
    POST /logout                         clears it
    GET  /api/status                     version, uptime, port, threads, sockets, memory, totals
    GET  /api/clients                    online clients with their sessions and bytes
    GET  /api/sessions                   sessions with bytes and rates each way
    GET  /api/traffic                    throughput, one sample a second for five minutes
    POST /api/clients/<id>/disconnect    take a client offline (it will reconnect on its own)
    POST /api/sessions/<id>/close        close a session (full id or a unique prefix)

Access: without a token (``server.token`` None) only loopback peers asking for a loopback
host name are answered; from elsewhere, use an SSH tunnel. With a token, every page and API
request needs ``Authorization: Bearer <token>`` or the login cookie. A POST whose Origin is
not this page's own is refused.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import os
import re
import threading
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit

from common import __version__, pages

from .httpd import Request

COOKIE_PREFIX = "chuantou_admin_"  # + the port: relays on one host keep apart
STATIC = Path(__file__).with_name("static")
TEXT = "text/plain; charset=utf-8"


def handle(server, request: Request, peer: tuple) -> tuple:
    """Return (status, content type, body[, headers]) for a plain HTTP request on the relay port."""
    token = getattr(server, "token", None)
    refused = _refusal(server, request, peer, token)
    if refused is not None:
        return refused
    method, path = request.method, request.path
    if path.startswith("/static/") and method in ("GET", "HEAD"):
        return _static(path[len("/static/"):])
    if path == "/login" and method == "POST":
        return _login(server, request, token)
    if path == "/logout" and method == "POST":
        return _json(200, {"message": "logged out"}, {"Set-Cookie": _cookie(server, "", max_age=0)})
    logged_in = token is None or _authenticated(server, request, token)
    if path == "/" and method in ("GET", "HEAD"):
        return _static("index.html" if logged_in else "login.html")
    if not path.startswith("/api/"):
        return 404, TEXT, "not found\n"
    if not logged_in:
        return _json(401, {"error": "this relay's admin API needs its token: send 'Authorization: Bearer <token>' "
                                    "or log in on the page"})
    for route_method, pattern, view in ROUTES:
        match = re.fullmatch(pattern, path)
        if match and route_method == method:
            return view(server, *(unquote(g) for g in match.groups()))
    if any(re.fullmatch(pattern, path) for _, pattern, _ in ROUTES):
        return _json(405, {"error": f"{method} is not allowed on {path}"})
    return _json(404, {"error": f"no such endpoint: {path}"})


# --- access -------------------------------------------------------------------------------------

def is_loopback(addr: tuple) -> bool:
    try:
        return ipaddress.ip_address(addr[0]).is_loopback
    except ValueError:
        return False


def _is_loopback_name(host: str) -> bool:
    try:
        name = urlsplit("//" + host).hostname
    except ValueError:
        return False
    if name == "localhost":
        return True
    try:
        return name is not None and ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _refusal(server, request: Request, peer: tuple, token: str | None):
    """A 403/405 response if this request may not be served at all, else None."""
    if request.method not in ("GET", "HEAD", "POST"):
        return 405, TEXT, f"{request.method} is not allowed here\n"
    host = request.header("host")
    if token is None:
        if not is_loopback(peer):
            return 403, TEXT, (
                "the admin page and API of this relay answer only on the relay's own machine, because it has "
                "no token. Reach them through an SSH tunnel:\n"
                f"    ssh -L 8200:127.0.0.1:{server.port} relay-host\n"
                "then open http://127.0.0.1:8200/ (or start the relay with a token).\n")
        if host and not _is_loopback_name(host):
            # A loopback peer asking for another name is a browser fooled by DNS rebinding.
            return 403, TEXT, (f"requests for host {host!r} are refused; "
                               f"open http://127.0.0.1:{server.port}/ on the relay's machine\n")
    if request.method == "POST":
        origin = request.header("origin")
        if origin and (not host or urlsplit(origin).netloc != host):
            return _json(403, {"error": f"cross-origin request from {origin} refused"})
    return None


def cookie_value(token: str) -> str:
    return hmac.new(token.encode(), b"chuantou-admin", hashlib.sha256).hexdigest()


def _cookie(server, value: str, max_age: int | None = None) -> str:
    extra = f"; Max-Age={max_age}" if max_age is not None else ""
    return f"{COOKIE_PREFIX}{server.port}={value}; Path=/; HttpOnly; SameSite=Strict{extra}"


def _bearer(request: Request) -> str | None:
    scheme, _, value = request.header("authorization").partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def _authenticated(server, request: Request, token: str) -> bool:
    bearer = _bearer(request)
    if bearer is not None:
        return hmac.compare_digest(bearer.encode(), token.encode())
    for part in request.header("cookie").split(";"):
        name, _, value = part.strip().partition("=")
        if name == f"{COOKIE_PREFIX}{server.port}":
            return hmac.compare_digest(value.encode(), cookie_value(token).encode())
    return False


def _login(server, request: Request, token: str | None):
    if token is None:
        return _json(400, {"error": "this relay has no token; its page is open on the relay's machine"})
    given = _bearer(request)
    if given is None or not hmac.compare_digest(given.encode(), token.encode()):
        return _json(401, {"error": "wrong token"})
    return _json(200, {"message": "logged in"}, {"Set-Cookie": _cookie(server, cookie_value(token))})


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


def status(server) -> tuple:
    data = server.status()
    data.update({
        "version": __version__,
        "host": server.host,
        "startedAt": server.started_at,
        "processThreads": threading.active_count(),
        "openSockets": _open_sockets(),
        "openFiles": _open_files(),
        "rssBytes": _rss_bytes(),
        "heartbeatTimeout": server.heartbeat_timeout,
        "tokenRequired": getattr(server, "token", None) is not None,
        "openRelay": not server.auth_required,
        "totalBytes": server.traffic.total_bytes()[0],
        "bytesPerSecond": server.traffic.history.current()[0],
    })
    return _json(200, data)


def clients(server) -> tuple:
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


def sessions(server) -> tuple:
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
            "bytesAToB": s.bytes_a_to_b,
            "bytesBToA": s.bytes_b_to_a,
            "rateAToB": rate_ab,
            "rateBToA": rate_ba,
        })
    return _json(200, {"sessions": out})


def traffic(server) -> tuple:
    return _json(200, {
        "interval": server.traffic.interval,
        "totalBytes": server.traffic.total_bytes()[0],
        "samples": server.traffic.history.history(),  # [unix time, bytes/s]
    })


def disconnect_client(server, client_id: str) -> tuple:
    conn = server.registry.get(client_id)
    if conn is None:
        return _json(404, {"error": f"client {client_id!r} is not online"})
    server.drop_client(conn, "disconnected by admin")
    return _json(200, {"message": f"client {client_id} disconnected (it reconnects on its own unless stopped)"})


def close_session(server, session_id: str) -> tuple:
    session_id = session_id.lower()
    found = [s for s in server.sessions.all()
             if s.id == session_id or (len(session_id) >= 6 and s.id.startswith(session_id))]
    if len(found) != 1:
        problem = "matches several sessions" if found else "is not an open session"
        return _json(404, {"error": f"session {session_id!r} {problem}"})
    server.close_session(found[0], "closed by admin")
    return _json(200, {"message": f"session {found[0].id[:8]} closed"})


ROUTES = [
    ("GET", r"/api/status", status),
    ("GET", r"/api/clients", clients),
    ("GET", r"/api/sessions", sessions),
    ("GET", r"/api/traffic", traffic),
    ("POST", r"/api/clients/([^/]+)/disconnect", disconnect_client),
    ("POST", r"/api/sessions/([0-9a-fA-F]+)/close", close_session),
]
