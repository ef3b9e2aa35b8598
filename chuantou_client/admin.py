"""The running client's admin page and local JSON API on 127.0.0.1:8201 (the CLI uses the API).

Endpoints::

    GET    /                        the admin page; GET /static/<file>: its CSS and JavaScript
    GET    /api/status              client ID, relay URL, connection state, proxies
    GET    /api/proxies             {"proxies": [...]}
    POST   /api/proxies             {"localPort", "targetClient", "targetPort", "protocol", "targetHost",
                                     "localHost"}
    DELETE /api/proxies/<localPort>
    GET    /api/clients             {"clients": [...]} online on the relay
    GET    /api/connections         {"connections": [...]} sessions through this client, as A and as B
    GET    /api/traffic             {"samples": [[unix time, received/s, sent/s], ...]} for five minutes
    POST   /api/login-link          {"url": a fresh one-time login link for a browser}
    GET    /login?key=<code>        a one-time code buys a session cookie, then on to /
    POST   /logout                  ends that session
    GET    /metrics                 Prometheus metrics (proxies, sessions, bytes; see metrics.py)
    GET    /healthz                 200 while registered with the relay, 503 otherwise; no detail

Every request but the login page, the static files and /healthz needs the client's API secret (header
X-Chuantou-Key, read by the CLI from the state directory) or a login session's cookie; see
apiauth.py. A browser page on another site must not be able to drive it: requests with a Host
other than this address are refused (DNS rebinding), and state-changing requests need a JSON
body and, if they carry an Origin, this origin.
"""

from __future__ import annotations

import errno
import http.server
import json
import logging
import socket
import threading
import urllib.parse
from pathlib import Path

from common import pages
from common.errors import ChuantouError, PortInUseError
from common.threads import ThreadGroup
from common.traffic import SAMPLE_INTERVAL, RateHistory

from . import apiauth, metrics
from .listen import use_address

log = logging.getLogger("chuantou.client")

MAX_BODY = 64 * 1024
REQUEST_TIMEOUT = 10.0
STATIC = Path(__file__).with_name("static")
TEXT = "text/plain; charset=utf-8"


ApiError = pages.HttpError  # answered as {"error": message}


class _HttpServer(http.server.ThreadingHTTPServer):
    """ThreadingHTTPServer whose request threads are named and joined by our ThreadGroup."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, handler, admin: "AdminServer"):
        self.admin = admin
        self.threads = admin.threads
        super().__init__(address, handler)

    def process_request(self, request, client_address):
        try:
            self.threads.spawn(f"api-{client_address[1]}", self.process_request_thread, request, client_address)
        except RuntimeError:
            self.shutdown_request(request)


class AdminServer:
    def __init__(self, app, host: str = "127.0.0.1", port: int = 8201, secret_path: Path | None = None,
                 auth: apiauth.ApiAuth | None = None):
        """``secret_path``: the API secret's file, made on the first start; or ``auth`` directly."""
        self.app = app
        self.host = host
        self.port = port
        self.secret_path = secret_path
        self.auth = auth
        self.threads = ThreadGroup("chuantou-admin")
        self._httpd: _HttpServer | None = None
        self._stopping = threading.Event()
        client = getattr(app, "client", None)
        self.traffic = RateHistory(client.byte_totals if client is not None else lambda: (0, 0))
        self.metrics = metrics.ClientMetrics(app)  # this API's own Prometheus registry

    def start(self) -> "AdminServer":
        if self.auth is None:
            if self.secret_path is None:
                raise ChuantouError("the local API needs a file for its secret (secret_path)")
            try:
                self.auth = apiauth.ApiAuth(apiauth.load_or_create_secret(self.secret_path))
            except OSError as exc:
                raise ChuantouError(f"cannot keep the local API's secret in {self.secret_path}: "
                                    f"{exc.strerror or exc}") from None
        try:
            self._httpd = _HttpServer((self.host, self.port), ApiHandler, self)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ChuantouError(f"admin port {self.port} is already in use (is another client running?); "
                                    f"choose another with --admin-port") from None
            raise ChuantouError(f"cannot serve the local API on {self.host}:{self.port}: {exc.strerror or exc}") from None
        self.port = self._httpd.server_address[1]
        self._stopping.clear()
        self.threads.spawn("http", self._httpd.serve_forever, 0.25)
        self.threads.spawn("traffic", self.traffic.run, self._stopping)
        return self

    def stop(self) -> None:
        if self._httpd is None:
            return
        self._stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self.threads.join_all(timeout=5.0)
        self._httpd = None

    def login_link(self) -> str:
        """A one-time link that logs a browser in (it works once, for a quarter of an hour)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        assert self.auth is not None  # start() made it
        return f"http://{host}:{self.port}/login?key={self.auth.new_code()}"

    @property
    def listening_socket(self):
        return self._httpd.socket if self._httpd is not None else None

    @property
    def allowed_hosts(self) -> set[str]:
        return {f"127.0.0.1:{self.port}", f"localhost:{self.port}", f"[::1]:{self.port}", f"{self.host}:{self.port}"}


class ApiHandler(http.server.BaseHTTPRequestHandler):
    server_version = "chuantou"
    timeout = REQUEST_TIMEOUT
    protocol_version = "HTTP/1.1"
    server: _HttpServer

    # --- plumbing ---------------------------------------------------------------------------

    def log_message(self, fmt, *args):  # keep the API quiet in the client's log
        log.debug("api: " + fmt, *args)

    @property
    def app(self):
        return self.server.admin.app

    @property
    def server_ref(self) -> AdminServer:
        return self.server.admin

    def _dispatch(self, method: str) -> None:
        try:
            self._send(self._answer(method))
        except ApiError as exc:
            self._send(exc.response())
        except (ConnectionError, socket.timeout):
            self.close_connection = True

    def _answer(self, method: str) -> pages.Response:
        self._check_host()
        path, _, query = self.path.partition("?")
        if method == "GET" and path.startswith("/static/"):
            return self._static(path[len("/static/"):])
        if method == "GET" and path == "/login":
            return self._login(query)
        if method == "POST" and path == "/logout":
            self._check_origin()
            return self._logout()
        if method == "GET" and path == "/healthz":  # no credential, so no detail
            healthy = metrics.healthy(self.app)
            return pages.text(200, "ok\n") if healthy else pages.text(503, "unavailable\n")
        allowed = self._authenticated()
        if method == "GET" and path == "/":
            return self._static("index.html" if allowed else "login.html")
        if not allowed and (path.startswith("/api/") or path == "/metrics"):
            raise ApiError(401, f"this client's local API needs its secret: {apiauth.FIX}")
        if method == "GET" and path == "/metrics":
            content_type, body = self.server_ref.metrics.exposition(self.headers.get("Accept", ""))
            return pages.Response(200, content_type, body)
        view, args = pages.find_route(ROUTES, method, path)
        if method != "GET":
            self._check_origin()
        status, payload = view(self, *args)
        return pages.json_response(status, payload)

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def _check_host(self) -> None:
        pages.check_host(self.headers.get("Host", ""), self.server_ref.allowed_hosts,
                         f"http://127.0.0.1:{self.server_ref.port}/")

    # --- who is asking -------------------------------------------------------------------

    def _session_ids(self) -> list[str]:
        return apiauth.cookie_values(self.server_ref.port, self.headers.get("Cookie", ""))

    def _authenticated(self) -> bool:
        auth = self.server_ref.auth
        assert auth is not None  # start() made it before serving
        given = self.headers.get(apiauth.HEADER)
        if given is not None:
            return auth.key_matches(given)
        return auth.session_valid(self._session_ids())

    def _login(self, query: str) -> pages.Response:
        """GET /login?key=<one-time code>: a session cookie, then the page."""
        if self.command == "HEAD" or "prefetch" in self.headers.get("Sec-Purpose", self.headers.get("Purpose", "")):
            raise ApiError(405, "open the login link in the browser")  # a prefetch must not use the code up
        auth = self.server_ref.auth
        assert auth is not None  # start() made it before serving
        codes = urllib.parse.parse_qs(query).get("key", [])
        session_id = next(filter(None, (auth.redeem(code) for code in codes[:1])), None)
        if session_id is None:
            if auth.session_valid(self._session_ids()):  # a reload of a used link: already logged in
                return pages.redirect("/")
            return pages.text(401, "this login link is used up, expired or wrong; get a fresh one with\n"
                                   "    python -m chuantou_client login-link\n"
                                   "(run it as the user who started the client)\n")
        cookie = apiauth.cookie_header(self.server_ref.port, session_id, auth.sessions.max_age())
        return pages.redirect("/", {"Set-Cookie": cookie})

    def _logout(self) -> pages.Response:
        assert self.server_ref.auth is not None  # start() made it before serving
        self.server_ref.auth.log_out(self._session_ids())
        return pages.json_response(200, {"message": "logged out"},
                                   {"Set-Cookie": apiauth.cookie_header(self.server_ref.port, "", 0)})

    def _check_origin(self) -> None:
        pages.check_origin(self.headers.get("Origin"), self.server_ref.allowed_hosts, schemes=("http",))

    def _read_json(self) -> dict:
        if "application/json" not in self.headers.get("Content-Type", ""):
            raise ApiError(415, "send the request body as JSON (Content-Type: application/json)")
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            raise ApiError(400, "bad Content-Length") from None
        if not 0 < length <= MAX_BODY:
            raise ApiError(400 if length <= 0 else 413, f"request body must be 1-{MAX_BODY} bytes")
        try:
            data = json.loads(self.rfile.read(length))
        except ValueError:
            raise ApiError(400, "request body is not valid JSON") from None
        if not isinstance(data, dict):
            raise ApiError(400, "request body must be a JSON object")
        return data

    def _static(self, name: str) -> pages.Response:
        found = pages.static(STATIC, name)
        if found is None:
            raise ApiError(404, f"no such file: {name}")
        return found

    def _send(self, response: pages.Response) -> None:
        pages.send(self, response)

    # --- endpoints --------------------------------------------------------------------------

    def get_status(self):
        return 200, self.app.status()

    def get_proxies(self):
        return 200, {"proxies": self.app.proxies()}

    def post_proxy(self):
        data = self._read_json()
        try:
            local_port = _port(data, "localPort")
            target_port = _port(data, "targetPort")
            target = data.get("targetClient")
            protocol = data.get("protocol", "both")
            proxy = self.app.create_proxy(local_port, target, target_port, protocol, data.get("targetHost"),
                                          local_host=data.get("localHost"),
                                          target_fingerprint=data.get("targetFingerprint"),
                                          bandwidth=data.get("bandwidth"),
                                          allow_unsealed=data.get("allowUnsealed") is True,
                                          warm=data.get("warm"))
        except PortInUseError as exc:
            raise ApiError(409, str(exc)) from None
        except ChuantouError as exc:
            raise ApiError(400, str(exc)) from None
        return 201, {"proxy": proxy.info(), "message": f"proxy created: {proxy.description}",
                     "address": use_address(proxy.local_host, proxy.local_port),
                     "warning": proxy.exposure_warning}

    def delete_proxy(self, port: str):
        description = self.app.delete_proxy(int(port))
        if description is None:
            raise ApiError(404, f"no proxy on local port {port}")
        return 200, {"message": f"proxy deleted: {description}"}

    def get_clients(self):
        try:
            return 200, {"clients": self.app.list_clients()}
        except ChuantouError as exc:
            raise ApiError(503, str(exc)) from None

    def get_connections(self):
        return 200, {"connections": self.app.client.connections()}

    def post_login_link(self):
        return 200, {"url": self.server_ref.login_link()}

    def get_traffic(self):
        received, sent = self.app.client.byte_totals()
        return 200, {"interval": SAMPLE_INTERVAL, "bytesReceived": received, "bytesSent": sent,
                     "samples": self.server_ref.traffic.history()}


def _port(data: dict, key: str) -> int:
    value = data.get(key)
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 65535:
        raise ChuantouError(f"{key} must be a port number 1-65535, not {value!r}")
    return value


ROUTES = [  # views take the request's handler, then the path's groups, and return (status, JSON payload)
    pages.Route("GET", r"/api/status", ApiHandler.get_status),
    pages.Route("GET", r"/api/proxies", ApiHandler.get_proxies),
    pages.Route("POST", r"/api/proxies", ApiHandler.post_proxy),
    pages.Route("DELETE", r"/api/proxies/(\d{1,5})", ApiHandler.delete_proxy),
    pages.Route("GET", r"/api/clients", ApiHandler.get_clients),
    pages.Route("GET", r"/api/connections", ApiHandler.get_connections),
    pages.Route("GET", r"/api/traffic", ApiHandler.get_traffic),
    pages.Route("POST", r"/api/login-link", ApiHandler.post_login_link),
]
