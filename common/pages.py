"""The admin pages' shared HTTP plumbing: their static files, the one response shape and the one
place that gives a response its headers, the route table, JSON errors, and the Host and Origin checks.

The relay's page (chuantou_server/admin.py, answered on the relay port through httpd.py) and the
client's local API (chuantou_client/admin.py, on http.server) both build ``Response`` values and
route through ``find_route``; only the writing differs (``encode`` for a raw socket, ``send`` for a
``BaseHTTPRequestHandler``), and both take the headers from ``Response.header_items``.

Each page's own files live in its package's ``static/`` folder; the shared look and helpers in
``common/static/``. Only plain names of those kinds are served, so no path leaves the folders.

This and ``common/static/`` are application shell rather than wire format; they live in ``common``
because both programs' pages use them and the layout has no other shared package.
"""

from __future__ import annotations

import http
import json
import re
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Iterable, Mapping, NamedTuple
from urllib.parse import unquote, urlsplit

SHARED = Path(__file__).with_name("static")
NAME = re.compile(r"[a-z0-9][a-z0-9_.-]*\.(html|css|js|svg)")
TEXT = "text/plain; charset=utf-8"
JSON = "application/json"
CONTENT_TYPES = {
    "html": "text/html; charset=utf-8",
    "css": "text/css; charset=utf-8",
    "js": "text/javascript; charset=utf-8",
    "svg": "image/svg+xml",
}
EVERY_RESPONSE = {  # nothing is cached, and a browser takes each body for the type it is sent as
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
}
PAGE_HEADERS = {  # a page loads nothing from anywhere else and may not be framed
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; "
                               "form-action 'self'",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}
_NO_HEADERS: Mapping[str, str] = MappingProxyType({})


# --- responses ----------------------------------------------------------------------------------

class Response(NamedTuple):
    """What a view answers. A tuple, so ``status, content_type, body, headers = response`` works."""

    status: int
    content_type: str
    body: bytes | str
    headers: Mapping[str, str] = _NO_HEADERS  # the response's own, on top of EVERY_RESPONSE

    def body_bytes(self) -> bytes:
        return self.body.encode() if isinstance(self.body, str) else self.body

    def header_items(self) -> list[tuple[str, str]]:
        """Every header of this response: the one place they are put together."""
        headers = {"Content-Type": self.content_type, "Content-Length": str(len(self.body_bytes())),
                   **EVERY_RESPONSE}
        headers.update(self.headers)
        return list(headers.items())


def text(status: int, message: str, headers: Mapping[str, str] | None = None) -> Response:
    return Response(status, TEXT, message, headers or _NO_HEADERS)


def json_response(status: int, data: Any, headers: Mapping[str, str] | None = None) -> Response:
    return Response(status, JSON, json.dumps(data), headers or _NO_HEADERS)


def error(status: int, message: str, headers: Mapping[str, str] | None = None) -> Response:
    """A JSON error, as both APIs answer them: {"error": message}."""
    return json_response(status, {"error": message}, headers)


def redirect(location: str, headers: Mapping[str, str] | None = None) -> Response:
    return Response(303, TEXT, b"", {"Location": location, **(headers or {})})


class HttpError(Exception):
    """Raised by a view or a check; answered as ``error(status, message)``."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None):
        self.status = status
        self.headers = headers
        super().__init__(message)

    def response(self) -> Response:
        return error(self.status, str(self), self.headers)


def static(package_static: Path, name: str) -> Response | None:
    """``name`` from the package's folder or the shared one (a page with PAGE_HEADERS), or None."""
    if not NAME.fullmatch(name):
        return None
    for folder in (package_static, SHARED):
        path = folder / name
        if path.is_file():
            kind = name.rsplit(".", 1)[1]
            return Response(200, CONTENT_TYPES[kind], path.read_bytes(), PAGE_HEADERS if kind == "html" else _NO_HEADERS)
    return None


def encode(response: Response, include_body: bool = True) -> bytes:
    """The whole HTTP/1.1 answer for a raw socket; the connection closes after it."""
    try:
        reason = http.HTTPStatus(response.status).phrase
    except ValueError:
        reason = "Error"
    lines = [f"HTTP/1.1 {response.status} {reason}", *(f"{k}: {v}" for k, v in response.header_items()),
             "Connection: close"]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head + response.body_bytes() if include_body else head


def send(handler: BaseHTTPRequestHandler, response: Response) -> None:
    """Answer through http.server (which adds its Server and Date headers); no body for HEAD."""
    handler.send_response(response.status)
    for name, value in response.header_items():
        handler.send_header(name, value)
    handler.end_headers()
    if handler.command != "HEAD":
        handler.wfile.write(response.body_bytes())


# --- routes -------------------------------------------------------------------------------------

class Route(NamedTuple):
    """One API endpoint: a method, a path pattern whose groups become the view's arguments, a view."""

    method: str
    pattern: str
    view: Callable[..., Any]


def find_route(routes: Iterable[Route], method: str, path: str) -> tuple[Callable[..., Any], list[str]]:
    """The view for ``method path`` and its (unquoted) path arguments; HttpError 405 or 404 if none."""
    known_path = False
    for route in routes:
        match = re.fullmatch(route.pattern, path)
        if match is None:
            continue
        if route.method == method:
            return route.view, [unquote(group) for group in match.groups()]
        known_path = True
    if known_path:
        raise HttpError(405, f"{method} is not allowed on {path}")
    raise HttpError(404, f"no such endpoint: {path}")


# --- who may ask --------------------------------------------------------------------------------

def check_host(host: str, allowed: Iterable[str], use: str) -> None:
    """Refuse a Host this server does not answer to: a page on another site that renamed itself to
    this address (DNS rebinding) names its own host here. ``use``: the address to use instead."""
    if host not in allowed:
        raise HttpError(403, f"requests for host {host!r} are refused; use {use}")


def check_origin(origin: str | None, hosts: Iterable[str], schemes: tuple[str, ...] = ("http", "https")) -> None:
    """Refuse a request a page of another origin sent (no Origin: not sent by a browser page)."""
    if not origin:
        return
    try:
        parts = urlsplit(origin)
    except ValueError:  # not even a URL
        parts = urlsplit("")
    if parts.scheme not in schemes or parts.netloc not in hosts:
        raise HttpError(403, f"cross-origin request from {origin} refused")
