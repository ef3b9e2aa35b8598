"""The client's start options in the canonical form common/startcheck.py compares: what the
user gave to ``start`` and what the running client uses."""

from __future__ import annotations

import os
from typing import Any, Callable

from common.auth import fingerprint
from common.tls import normalize_fingerprint

from .export import format_ports, parse_ports
from .known_clients import parse_allow_from


def canonical_allow(spec: str | None) -> str | None:
    return None if spec is None else format_ports(parse_ports(spec))


def canonical_hosts(hosts) -> list[str]:
    return sorted(set(hosts or ()))


def given_options(args) -> dict:
    """The run options typed on this command line (``--admin-port 0``, "any port", is no wish)."""
    get: Callable[[str], Any] = lambda name: getattr(args, name, None)  # noqa: E731
    given = {
        "--server": get("server"),
        "--server-order": get("server_order"),
        "--client-id": get("client_id"),
        "--admin-port": get("admin_port") or None,
        "--log-level": get("log_level"),
        "--token": fingerprint(get("token")) if get("token") else None,
        "--allow": canonical_allow(get("allow")),
        "--allow-host": canonical_hosts(get("allow_hosts")) if get("allow_hosts") else None,
        "--ca": os.path.abspath(get("ca")) if get("ca") else None,
        "--tls-fingerprint": normalize_fingerprint(get("tls_fingerprint")) if get("tls_fingerprint") else None,
        "--tls-insecure": True if get("tls_insecure") else None,
        "--allow-from": sorted(parse_allow_from(get("allow_from"))) if get("allow_from") else None,
        "--path": get("path"),
        "--direct-deadline": float(get("direct_deadline")) if get("direct_deadline") is not None else None,
        "--allow-unsealed": True if get("allow_unsealed") else None,
        "--pool-count": get("pool_count"),
    }
    return {flag: value for flag, value in given.items() if value is not None}


def running_options(app, log_level: str, token: str | None) -> dict:
    """What the client in ``app`` runs with, for its worker record."""
    settings = app.settings
    return {
        "--server": app.server_url,
        "--server-order": settings["serverOrder"],
        "--client-id": app.client.client_id,
        "--admin-port": app.admin.port,
        "--log-level": log_level,
        "--token": fingerprint(token) if token else None,
        "--allow": canonical_allow(settings["allow"]),
        "--allow-host": canonical_hosts(settings["allowHosts"]),
        "--ca": os.path.abspath(settings["ca"]) if settings["ca"] else None,
        "--tls-fingerprint": normalize_fingerprint(settings["tlsFingerprint"]) if settings["tlsFingerprint"] else None,
        "--tls-insecure": bool(settings["tlsInsecure"]),
        "--allow-from": sorted(settings["allowFrom"]),
        "--path": settings["path"],
        "--direct-deadline": float(settings["directDeadline"]),
        "--allow-unsealed": bool(settings["allowUnsealed"]),
        "--pool-count": settings["poolCount"],
    }


RUN_OPTION_DEFAULTS = {"--server-order": "in-order", "--allow": "every port on 127.0.0.1", "--allow-host": "none", "--ca": "the system's CAs",
                       "--tls-fingerprint": "none", "--token": "none", "--allow-from": "any peer that passes its pin"}
