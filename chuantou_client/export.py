"""Export control on the target (B): which ports, on which hosts, other clients may reach
through this client. Plain data; the target side asks ``refusal()`` before connecting."""

from __future__ import annotations

from common.errors import ChuantouError

LOCALHOST = "127.0.0.1"


def parse_ports(spec: str) -> list[tuple[int, int]]:
    """``"22,3000-3999"`` -> [(22, 22), (3000, 3999)]; ``"none"`` -> []."""
    spec = spec.strip()
    if spec.lower() == "none":
        return []
    ranges = []
    for part in spec.split(","):
        part = part.strip()
        low, sep, high = part.partition("-")
        try:
            lo = int(low)
            hi = int(high) if sep else lo
        except ValueError:
            raise ChuantouError(f"--allow {spec!r}: {part!r} is not a port or a range like 3000-3999") from None
        if not (1 <= lo <= hi <= 65535):
            raise ChuantouError(f"--allow {spec!r}: {part!r} is outside 1-65535 or reversed")
        ranges.append((lo, hi))
    return ranges


def format_ports(ranges: list[tuple[int, int]]) -> str:
    return ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in ranges) or "none"


class ExportPolicy:
    def __init__(self, allow: str | None = None, allow_hosts=(), default_host: str = LOCALHOST):
        self.ranges = None if allow is None else parse_ports(allow)  # None: every port
        self.default_host = default_host
        self.hosts = {default_host, *allow_hosts}

    def refusal(self, host: str, port: int) -> str | None:
        """Why a session to ``host:port`` is refused, or None if it is allowed."""
        if host not in self.hosts:
            return (f"host {host} is not allowed on this client (it forwards to "
                    f"{', '.join(sorted(self.hosts))}; add --allow-host {host} to allow it)")
        if self.ranges is not None and not any(lo <= port <= hi for lo, hi in self.ranges):
            return f"port {port} is not allowed on this client (it allows {format_ports(self.ranges)})"
        return None

    def describe(self) -> str:
        ports = "every port" if self.ranges is None else f"ports {format_ports(self.ranges)}"
        if self.ranges == []:
            return "exposes nothing to other clients (--allow none)"
        return (f"exposes {ports} on {', '.join(sorted(self.hosts))} to other clients of the relay"
                + ("; narrow it with --allow 22,8080 (or --allow none)" if self.ranges is None else ""))
