"""The relay's start options in the canonical form common/startcheck.py compares: what the
user gave to ``start`` and what the running relay uses."""

from __future__ import annotations

import os
from typing import Any, Callable

from common.auth import fingerprint


def _path(value: str | None) -> str | None:
    return os.path.abspath(value) if value else None


def given_options(args) -> dict:
    """The run options typed on this command line."""
    get: Callable[[str], Any] = lambda name: getattr(args, name, None)  # noqa: E731
    metrics_token: str | None = get("metrics_token")
    given = {
        "--host": get("host"),
        "--port": get("port"),
        "--heartbeat-timeout": float(get("heartbeat_timeout")) if get("heartbeat_timeout") is not None else None,
        "--log-level": get("log_level"),
        "--token": fingerprint(get("token")) if get("token") else None,
        "--no-auth": True if get("no_auth") else None,
        "--tls-cert": _path(get("tls_cert")),
        "--tls-key": _path(get("tls_key")),
        "--tls-only": True if get("tls_only") else None,
        "--metrics-token": fingerprint(metrics_token) if metrics_token else None,
        "--probe-port": get("probe_port"),
    }
    return {flag: value for flag, value in given.items() if value is not None}


def running_options(settings: dict, port: int) -> dict:
    """What a relay started from ``settings`` (listening on ``port``) runs with, for its worker record."""
    return {
        "--host": settings["host"],
        "--port": port,
        "--heartbeat-timeout": float(settings["heartbeatTimeout"]),
        "--log-level": settings["logLevel"],
        "--token": None if settings["noAuth"] or not settings["token"] else fingerprint(settings["token"]),
        "--no-auth": bool(settings["noAuth"]),
        "--tls-cert": _path(settings["tlsCert"]),
        "--tls-key": _path(settings["tlsKey"]),
        "--tls-only": bool(settings["tlsOnly"]),
        "--metrics-token": fingerprint(settings["metricsToken"]) if settings["metricsToken"] else None,
        "--probe-port": settings["probePort"],
    }


RUN_OPTION_DEFAULTS = {"--token": "none", "--metrics-token": "none (loopback and the admin token only)",
                       "--tls-cert": "none (plain ws://)", "--tls-key": "none",
                       "--probe-port": "none"}
