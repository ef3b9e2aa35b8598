"""The relay's registry of online clients: client ID -> its live control connection, and which
credential each ID belongs to.

An ID registered with a credential (a token's fingerprint) stays reserved for that credential
while it is online and for ``reservation_time`` seconds after it goes offline, so another token
cannot take it during a network blip. Offline reservations are capped per credential (the
oldest goes first), so one token holder cannot grow the table without bound.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from common import protocol as p
from common.limits import LimitLog, source_key

if TYPE_CHECKING:
    from .signaling import ControlConnection

log = logging.getLogger("chuantou.server")

DEFAULT_RESERVATION_TIME = 24 * 3600.0
DEFAULT_MAX_RESERVED_PER_CREDENTIAL = 4096

# why a claim was refused
ONLINE_ELSEWHERE = "online_elsewhere"  # live with another credential
RESERVED = "reserved"  # offline, but still reserved for another credential
IN_USE = "in_use"  # live with the same credential, and the claim asked not to take over


@dataclass(frozen=True)
class Claim:
    replaced: ControlConnection | None = None  # the connection the claim replaced, if any
    refused: str | None = None  # ONLINE_ELSEWHERE, RESERVED, IN_USE, or None: granted


class ClientRegistry:
    def __init__(self, reservation_time: float = DEFAULT_RESERVATION_TIME,
                 max_reserved_per_credential: int = DEFAULT_MAX_RESERVED_PER_CREDENTIAL):
        self.reservation_time = reservation_time
        self.max_reserved_per_credential = max_reserved_per_credential
        self.limit_log = LimitLog(log)
        self._lock = threading.Lock()
        self._clients: dict[str, ControlConnection] = {}
        self._owner: dict[str, str] = {}  # client ID -> credential it is bound to (online or reserved)
        # credential -> {client ID: monotonic time it went offline}, oldest first
        self._offline: dict[str, collections.OrderedDict[str, float]] = {}
        self._sources: collections.Counter = collections.Counter()  # source key -> live clients from there

    def claim(self, client_id: str, conn: ControlConnection, takeover: bool = True) -> Claim:
        """Make ``conn`` the connection for ``client_id`` unless the ID belongs to another
        credential, or is live and ``takeover`` is False. A granted claim returns the live
        connection it replaced (same credential), which the caller closes."""
        with self._lock:
            old = self._clients.get(client_id)
            refused = self._refusal(client_id, old, conn.credential, takeover)
            if refused is not None:
                return Claim(refused=refused)
            self._clients[client_id] = conn
            self._bind(client_id, conn.credential)
            self._count_source(conn, +1)
            if old is not None and old is not conn:
                self._count_source(old, -1)
            return Claim(replaced=old if old is not conn else None)

    def refusal(self, client_id: str, credential: str | None, takeover: bool = True) -> str | None:
        """Why ``claim`` would refuse now, without claiming (a cluster node asks before it takes
        the ID cluster-wide, which may drop the ID's connection on another node)."""
        with self._lock:
            return self._refusal(client_id, self._clients.get(client_id), credential, takeover)

    def _refusal(self, client_id: str, old: ControlConnection | None, credential: str | None,
                 takeover: bool) -> str | None:
        if old is not None and old.credential != credential:
            return ONLINE_ELSEWHERE
        if old is None and self._reserved_for_another(client_id, credential):
            return RESERVED
        if old is not None and not takeover:
            return IN_USE
        return None

    def describe(self, client_id: str, refused: str) -> tuple[str, str]:
        """The message and code a registration refused for ``refused`` is told."""
        if refused == IN_USE:
            return (f"client ID '{client_id}' is in use by another live connection with the same token, and "
                    f"this registration asked not to replace it; if both run on purpose, give one another "
                    f"--client-id", p.ID_IN_USE)
        if refused == RESERVED:
            seconds = self.reservation_time
            held = f"{seconds / 3600:g} h" if seconds >= 3600 else f"{seconds:g} s"
            return (f"client ID '{client_id}' belongs to another credential: it stays reserved for the token "
                    f"that registered it for {held} after it goes offline; choose another --client-id", p.ID_TAKEN)
        return (f"client ID '{client_id}' is online with a different credential; choose another --client-id",
                p.ID_TAKEN)

    def unregister(self, client_id: str, conn: ControlConnection) -> bool:
        """Remove ``conn`` only if it is still the one registered (a replaced one is not); its
        ID stays reserved for its credential."""
        with self._lock:
            if self._clients.get(client_id) is not conn:
                return False
            del self._clients[client_id]
            self._count_source(conn, -1)
            if conn.credential is not None and self.reservation_time > 0:
                self._reserve(client_id, conn.credential)
            else:
                self._owner.pop(client_id, None)
            return True

    def reserved_for(self, client_id: str) -> str | None:
        """The credential an ID is bound to now (online or reserved), or None."""
        with self._lock:
            if client_id in self._clients:
                return self._owner.get(client_id)
            return self._owner.get(client_id) if self._reservation_left(client_id) > 0 else None

    def has_source(self, key: str) -> bool:
        """Is a registered client connected from this source key (see ``common.limits.source_key``)?"""
        return self._sources.get(key, 0) > 0  # a dict read: safe without the lock

    def _count_source(self, conn, delta: int) -> None:
        remote = getattr(conn, "remote", None)
        if not remote:
            return
        key = source_key(remote[0])
        self._sources[key] += delta
        if self._sources[key] <= 0:
            del self._sources[key]

    # --- reservations (callers hold the lock) ----------------------------------------------------

    def _reservation_left(self, client_id: str) -> float:
        credential = self._owner.get(client_id)
        offline = self._offline.get(credential) if credential else None
        offline_since = offline.get(client_id) if offline is not None else None
        if offline_since is None:
            return 0.0
        return self.reservation_time - (time.monotonic() - offline_since)

    def _reserved_for_another(self, client_id: str, credential: str | None) -> bool:
        owner = self._owner.get(client_id)
        if owner is None or owner == credential:
            return False
        if self._reservation_left(client_id) > 0:
            return True
        self._forget(client_id)  # expired: the ID is free again
        return False

    def _bind(self, client_id: str, credential: str | None) -> None:
        owner = self._owner.get(client_id)
        offline = self._offline.get(owner) if owner is not None else None
        if offline is not None:
            offline.pop(client_id, None)
        if credential is None:
            self._owner.pop(client_id, None)
        else:
            self._owner[client_id] = credential

    def _reserve(self, client_id: str, credential: str) -> None:
        now = time.monotonic()
        offline = self._offline.setdefault(credential, collections.OrderedDict())
        offline.pop(client_id, None)
        offline[client_id] = now
        while offline and now - next(iter(offline.values())) >= self.reservation_time:
            self._forget(next(iter(offline)))  # expired ones first, oldest at the front
        if len(offline) > self.max_reserved_per_credential:
            oldest = next(iter(offline))
            self._forget(oldest)
            self.limit_log.bit("reserved_ids", credential,
                               "credential %s holds more than %d offline client IDs; the reservation of the "
                               "oldest, %s, was dropped (raise maxReservedIdsPerToken to keep more)",
                               credential, self.max_reserved_per_credential, oldest)

    def _forget(self, client_id: str) -> None:
        credential = self._owner.pop(client_id, None)
        if credential is None:
            return
        offline = self._offline.get(credential)
        if offline is not None:
            offline.pop(client_id, None)
            if not offline:
                del self._offline[credential]

    # --- reading -----------------------------------------------------------------------------------

    def get(self, client_id: str) -> ControlConnection | None:
        with self._lock:
            return self._clients.get(client_id)

    def ids(self) -> list[str]:
        with self._lock:
            return sorted(self._clients)

    def connections(self) -> list:
        with self._lock:
            return list(self._clients.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._clients)
