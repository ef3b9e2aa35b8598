"""The cluster store's URL (``--cluster``, ``cluster`` in server.json): one Redis, or a Redis Cluster.

- ``redis://[:PASSWORD@]HOST:6379/0``, ``rediss://`` (TLS), ``unix:///path/redis.sock``: one
  Redis, or whatever speaks as one in front of several (Sentinel-managed with a floating
  address, a proxy); the redis package's own URL.
- ``redis+cluster://[:PASSWORD@]HOST:6379`` (``rediss+cluster://`` with TLS): any node of a Redis
  Cluster; the client learns the others and the slots from it. No database number: a Cluster
  has only database 0.
"""

from __future__ import annotations

from urllib.parse import urlsplit

CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}  # -> the scheme the redis package reads
STORE_SCHEMES = ("redis", "rediss", "unix", *CLUSTER_SCHEMES)
EXAMPLES = ("redis://HOST:6379/0 (one Redis, or Sentinel/a proxy in front of it) or redis+cluster://HOST:6379 "
            "(any node of a Redis Cluster; rediss+cluster:// with TLS)")


def _shown(url: str) -> str:
    """The URL for a message, its password (if any) hidden."""
    scheme, sep, rest = url.partition("://")
    user, at, host = rest.rpartition("@")
    if at and ":" in user:
        user = user.partition(":")[0] + ":***"
    return f"{scheme}{sep}{user}{at}{host}"


def url_problem(given: object) -> str | None:
    """Why ``given`` is not a store URL, with the fix; None when it is one."""
    if not isinstance(given, str):
        return f"the cluster URL must be a string such as {EXAMPLES}"
    url = _shown(given)
    scheme, sep, _ = given.partition("://")
    try:
        parts = urlsplit(given)
        parts.port  # raises for a port that is no number, or out of range
    except ValueError as exc:
        return f"the cluster URL {url!r} is not valid ({exc}); it must look like {EXAMPLES}"
    if not sep or scheme not in STORE_SCHEMES:
        hint = " (for a Redis Cluster write redis+cluster://)" if scheme in ("cluster", "redis-cluster") else ""
        return f"the cluster URL must look like {EXAMPLES}, not {url!r}{hint}"
    if scheme == "unix":
        return None if parts.path else f"the cluster URL {url!r} names no socket: unix:///path/to/redis.sock"
    if scheme in CLUSTER_SCHEMES and not parts.hostname:
        return f"the cluster URL {url!r} names no host: e.g. {scheme}://HOST:6379"
    if scheme in CLUSTER_SCHEMES and parts.path.strip("/") not in ("", "0"):
        return (f"the Redis Cluster URL {url!r} names database {parts.path.strip('/')!r}, but a Redis Cluster has "
                f"only database 0: write {_shown(f'{scheme}://{parts.netloc}')}")
    return None


def split(url: str) -> tuple[bool, str]:
    """(whether it names a Redis Cluster, the URL the redis package reads)."""
    scheme, _, rest = url.partition("://")
    return scheme in CLUSTER_SCHEMES, f"{CLUSTER_SCHEMES.get(scheme, scheme)}://{rest}"
