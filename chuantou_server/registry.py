"""The relay's registry of online clients: client ID -> its live control connection."""

from __future__ import annotations

import threading


class ClientRegistry:
    def __init__(self):
        self._lock = threading.Lock()
        self._clients: dict[str, object] = {}

    def claim(self, client_id: str, conn) -> object | None:
        """Make ``conn`` the connection for ``client_id`` and return the one it replaces, if any.

        A live connection registered with another credential is not replaced: it is returned
        unchanged and the caller refuses ``conn``.
        """
        with self._lock:
            old = self._clients.get(client_id)
            if old is not None and old.credential != conn.credential:
                return old
            self._clients[client_id] = conn
            return old if old is not conn else None

    def unregister(self, client_id: str, conn) -> bool:
        """Remove ``conn`` only if it is still the one registered (a replaced one is not)."""
        with self._lock:
            if self._clients.get(client_id) is conn:
                del self._clients[client_id]
                return True
            return False

    def get(self, client_id: str):
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
