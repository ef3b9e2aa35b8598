"""Where a proxy listens on this machine: the ``--local-host`` address (like the bind_address of
``ssh -L bind_address:port:host:hostport``), how it is written, and the warning when it is not
loopback. Plain functions, no sockets."""

from __future__ import annotations

import ipaddress

from common.errors import ChuantouError

DEFAULT_LOCAL_HOST = "127.0.0.1"
LOCAL_HOST_HELP = "an IP address of this machine, e.g. 127.0.0.1, ::1, 0.0.0.0 (all IPv4) or :: (all)"


def parse_local_host(value) -> str:
    """The canonical form of a listen address: an IPv4 or IPv6 literal (``[::1]`` too) or
    ``localhost``; ChuantouError naming the value otherwise. Names other than localhost are
    refused because a name can resolve to an address of another machine, or to several."""
    if not isinstance(value, str) or not value.strip():
        raise ChuantouError(f"local host {value!r} is not an address; use {LOCAL_HOST_HELP}")
    text = value.strip()
    if text.lower() == "localhost":
        return DEFAULT_LOCAL_HOST
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise ChuantouError(f"local host {value!r} is not an IP address; use {LOCAL_HOST_HELP}") from None


def is_valid_local_host(value) -> bool:
    try:
        parse_local_host(value)
    except ChuantouError:
        return False
    return True


def is_loopback(host: str) -> bool:
    return ipaddress.ip_address(host).is_loopback


def is_all_interfaces(host: str) -> bool:
    return ipaddress.ip_address(host).is_unspecified


def listen_address(host: str, port: int) -> str:
    """How users reach the proxy: ``localhost:9090`` for the default, ``[::1]:9090`` for IPv6."""
    if host == DEFAULT_LOCAL_HOST:
        return f"localhost:{port}"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def use_address(host: str, port: int) -> str:
    """The address to give users: on all interfaces, localhost or any of this machine's addresses."""
    if is_all_interfaces(host):
        return f"localhost:{port} or <this machine's address>:{port}"
    return listen_address(host, port)


def exposure_warning(host: str, port: int, target: str) -> str | None:
    """None on loopback; otherwise the sentence that tells the user who else can use the tunnel."""
    if is_loopback(host):
        return None
    where = "any network of this machine" if is_all_interfaces(host) else f"the network of {host}"
    return (f"proxy on {listen_address(host, port)} is not on loopback: anyone on {where} can use it to reach "
            f"{target} with no password; use --local-host 127.0.0.1 to keep it to this machine")
