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
    GET  /api/sessions                   sessions with bytes and rates each way, and their path
    GET  /api/traffic                    throughput, one sample a second for five minutes
    GET  /api/cluster                    a cluster node: the nodes with load and state, each client's node
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
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from common import __version__, pages
from common.pages import Response

from . import direct_claims, metrics
from .httpd import Request

if TYPE_CHECKING:
    from .server import Server

COOKIE_PREFIX = "chuantou_admin_"  # + the port: relays on one host keep apart
STATIC = Path(__file__).with_name("static")


def handle(server: Server, request: Request, peer: tuple) -> Response:
    """The answer to a plain HTTP request on the relay port."""
    try:
        return _answer(server, request, peer)
    except pages.HttpError as exc:
        return exc.response()


def _answer(server: Server, request: Request, peer: tuple) -> Response:
    _refuse(request)
    method, path = request.method, request.path
    if path.startswith("/static/") and method in ("GET", "HEAD"):
        return _static(path[len("/static/"):])
    if path in OPERATIONS_PATHS:
        if method not in ("GET", "HEAD"):
            return pages.text(405, f"{method} is not allowed on {path}\n")
        return _healthz(server) if path == "/healthz" else _metrics(server, request, peer)
    if path != "/" and path not in ("/login", "/logout") and not path.startswith("/api/"):
        return NOT_FOUND
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
        return NOT_FOUND
    if access != ALLOWED:
        return pages.error(401, "this relay's admin API needs its admin token: send 'Authorization: Bearer "
                                "<admin token>' or log in on the page (show the admin token with: "
                                "python -m chuantou_server token --admin)")
    view, args = pages.find_route(ROUTES, method, path)
    return view(server, *args)


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


class _MethodRefused(pages.HttpError):
    def response(self) -> Response:  # a plain-text answer, as before there was an API
        return pages.text(self.status, f"{self}\n")


def _refuse(request: Request) -> None:
    """Raise if this request may not be served at all: a method no page takes, or a POST from a
    page of another origin. (Any Host is answered: a relay has many names, and its page needs its
    admin token or a login cookie, which a page on another site does not have.)"""
    if request.method not in ("GET", "HEAD", "POST"):
        raise _MethodRefused(405, f"{request.method} is not allowed here")
    if request.method == "POST":
        host = request.header("host")
        pages.check_origin(request.header("origin"), {host} if host else ())


def _disabled(path: str) -> Response:
    if path.startswith("/api/") or path in ("/login", "/logout"):
        return pages.error(403, " ".join(DISABLED.split()))
    return pages.text(403, DISABLED)


def _too_many_failures() -> Response:
    return pages.error(429, "too many failed logins from your address: wait a minute, then use the admin "
                            "token (python -m chuantou_server token --admin)", {"Retry-After": "60"})


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


def _login(server: Server, request: Request, peer: tuple) -> Response:
    given = _bearer(request)
    if given is None:
        return pages.error(401, "send the admin token as 'Authorization: Bearer <admin token>'")
    result = _token_matches(server, given, peer)
    if result == LIMITED:
        return _too_many_failures()
    if result == DENIED:
        return pages.error(401, "wrong admin token")
    session_id = server.admin_sessions.create()
    return pages.json_response(200, {"message": "logged in"},
                               {"Set-Cookie": _cookie(server, session_id, server.admin_sessions.max_age())})


def _logout(server: Server, request: Request) -> Response:
    for value in _session_ids(server, request):
        server.admin_sessions.revoke(value)
    return pages.json_response(200, {"message": "logged out"}, {"Set-Cookie": _cookie(server, "", max_age=0)})


# --- operations: health and metrics --------------------------------------------------------

OPERATIONS_PATHS = ("/healthz", "/metrics")


def _healthz(server: Server) -> Response:
    """No detail either way: anyone may ask, so the answer must tell a stranger nothing."""
    if metrics.healthy(server):
        return pages.text(200, "ok\n")
    return pages.text(503, "unavailable\n")


def _metrics(server: Server, request: Request, peer: tuple) -> Response:
    session = any(server.admin_sessions.check(value) for value in _session_ids(server, request))
    access = metrics.access(server, peer, _bearer(request), session)
    if access == metrics.LIMITED:
        return _too_many_failures()
    if access != metrics.ALLOWED:
        return pages.text(401, "this relay's metrics need a credential: send 'Authorization: Bearer <metrics token>' "
                           "(metricsToken in the relay's config) or the admin token, or scrape from this host\n")
    content_type, body = server.metrics.exposition(request.header("accept"))
    return Response(200, content_type, body)


# --- responses ----------------------------------------------------------------------------------

NOT_FOUND = pages.text(404, "not found\n")


def _static(name: str) -> Response:
    return pages.static(STATIC, name) or NOT_FOUND


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


def status(server: Server) -> Response:
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
    return pages.json_response(200, data)


def clients(server: Server) -> Response:
    sessions = server.sessions.all()
    out = []
    node = server.cluster.node_id if server.cluster is not None else None
    for conn in server.registry.connections():
        cid = conn.client_id
        mine = [s for s in sessions if s.involves(cid)]
        sent, received = server.traffic.client_bytes(cid, mine)
        direct_sent, direct_received = server.traffic.client_direct(cid, mine)
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
            "directBytesSent": direct_sent,  # as this client reports it (unchecked)
            "directBytesReceived": direct_received,
        })
        if node is not None:  # a cluster node: where this client is
            out[-1]["node"] = node
    out.sort(key=lambda c: c["id"])
    return pages.json_response(200, {"clients": out})


SEALED_LABEL = "sealed (end to end)"
UNSEALED_LABEL = "not sealed"


def sessions(server: Server) -> Response:
    out = []
    cluster = server.cluster
    for s in sorted(server.sessions.all(), key=lambda s: s.created_at):
        rate_ab, rate_ba = server.traffic.session_rate(s.id)
        direct_ab, direct_ba = direct_claims.direct_bytes(s)
        out.append({
            "id": s.id,
            "shortId": s.id[:8],
            "a": s.client_a,
            "b": s.client_b,
            "port": s.port,
            "protocol": s.protocol,
            "startedAt": s.created_at,
            "state": "direct" if s.direct_held else "relaying" if s.joined else "joining",
            "sealed": s.sealed,  # both sides registered keys: sealed end to end, unreadable here
            "sealing": SEALED_LABEL if s.sealed else UNSEALED_LABEL,
            # asked for ahead of its user: held idle until A's sealed go frame, which the relay cannot see
            "warm": s.warm,
            "bytesAToB": s.bytes_a_to_b,
            "bytesBToA": s.bytes_b_to_a,
            "rateAToB": rate_ab,
            "rateBToA": rate_ba,
            # as the clients report it (unchecked): "direct", else "relay"; and by which sides
            "path": direct_claims.path(s),
            "pathReportedBy": direct_claims.reported_by(s),
            "directAToB": direct_ab,
            "directBToA": direct_ba,
        })
        if cluster is not None:  # where it is pumped, and where A and B are
            out[-1].update(cluster.placement(s))
    return pages.json_response(200, {"sessions": out})


def traffic(server: Server) -> Response:
    return pages.json_response(200, {
        "interval": server.traffic.interval,
        "totalBytes": server.traffic.total_bytes()[0],
        "samples": server.traffic.history.history(),  # [unix time, bytes/s]
    })


def cluster(server: Server) -> Response:
    if server.cluster is None:
        return pages.error(404, "this relay is not a node of a cluster (start it with --cluster redis://HOST:6379/0)")
    return pages.json_response(200, server.cluster.api_view())


def disconnect_client(server: Server, client_id: str) -> Response:
    conn = server.registry.get(client_id)
    if conn is None:
        return pages.error(404, f"client {client_id!r} is not online")
    server.drop_client(conn, "disconnected by admin")
    return pages.json_response(200, {"message": f"client {client_id} disconnected (it reconnects on its own unless stopped)"})


def close_session(server: Server, session_id: str) -> Response:
    session_id = session_id.lower()
    found = [s for s in server.sessions.all()
             if s.id == session_id or (len(session_id) >= 6 and s.id.startswith(session_id))]
    if len(found) != 1:
        problem = "matches several sessions" if found else "is not an open session"
        return pages.error(404, f"session {session_id!r} {problem}")
    server.close_session(found[0], "closed by admin")
    return pages.json_response(200, {"message": f"session {found[0].id[:8]} closed"})


ROUTES = [  # views take the relay, then the path's groups
    pages.Route("GET", r"/api/status", status),
    pages.Route("GET", r"/api/clients", clients),
    pages.Route("GET", r"/api/sessions", sessions),
    pages.Route("GET", r"/api/traffic", traffic),
    pages.Route("GET", r"/api/cluster", cluster),
    pages.Route("POST", r"/api/clients/([^/]+)/disconnect", disconnect_client),
    pages.Route("POST", r"/api/sessions/([0-9a-fA-F]+)/close", close_session),
]
