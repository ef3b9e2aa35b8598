"""The relay's HTTP side on its own port: a status page and the JSON API under /api/.

Until the relay has a token, only requests from loopback are answered; reach it from
elsewhere through an SSH tunnel (``ssh -L 8200:127.0.0.1:8200 relay-host``).
"""

from __future__ import annotations

import ipaddress
import json

from common import __version__

from .httpd import Request


def is_loopback(addr: tuple) -> bool:
    try:
        return ipaddress.ip_address(addr[0]).is_loopback
    except ValueError:
        return False


def handle(server, request: Request, peer: tuple) -> tuple[int, str, str]:
    """Return (status, content type, body) for a plain HTTP request on the relay port."""
    if request.path == "/" and request.method in ("GET", "HEAD") and not is_loopback(peer):
        return 200, "text/plain; charset=utf-8", f"chuantou relay {__version__}\n"
    if not is_loopback(peer):
        return 403, "text/plain; charset=utf-8", (
            "the admin pages answer only on this machine; from elsewhere use an SSH tunnel: "
            f"ssh -L {server.port}:127.0.0.1:{server.port} <relay host>\n")
    if request.path == "/api/status" and request.method == "GET":
        return _json(200, server.status())
    if request.path == "/" and request.method in ("GET", "HEAD"):
        return 200, "text/plain; charset=utf-8", (
            f"chuantou relay {__version__}: {len(server.registry)} clients, {len(server.sessions)} sessions\n")
    return 404, "text/plain; charset=utf-8", "not found\n"


def _json(status: int, data) -> tuple[int, str, str]:
    return status, "application/json", json.dumps(data)
