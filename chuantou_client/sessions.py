"""The client's session book: one record per session running through this client, as A (from
one of its proxies) or as B (to a local port), and what is remembered after a session ends.

A session is tracked with ``with book.track(session_id, side, ...) as record:`` for as long as
its thread serves it; the handle that moves its data (a Pipe, or a UDP flow: anything with
``abort()``) is attached once it exists. The relay's ``session_closed`` may arrive at any time:
before the session is tracked, while it runs, or after it ended here. So the book keeps a
bounded memory of closing reasons and of the proxies whose sessions ended before the relay
said why, so that reason still reaches the proxy's last failure.

Nothing here touches a socket; the book only calls ``abort()`` on handles.
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

from common.memtrim import Trimmer

REMEMBERED_REASONS = 256  # closing reasons kept for sessions that may not be tracked yet (or any more)
REMEMBERED_OWNERS = 1024  # proxies of ended sessions, for a reason the relay sends late


@dataclass
class SessionRecord:
    """One session as this client sees it. ``owner`` is the Proxy that asked for it (side A)."""

    id: str
    side: str  # "A" (from a proxy here) or "B" (to a service here)
    peer: str | None
    port: int | None  # the port on B
    protocol: str | None  # "tcp" or "udp"
    local_port: int | None = None  # the proxy's port (side A)
    owner: Any = None
    started_at: float = field(default_factory=time.time)
    handle: Any = None  # Pipe / UDP flow, attached once the data path is up
    reason: str | None = None  # why the relay closed it, once it did
    sealed: bool = True  # end to end (sealing.py, udpseal.py); False: a peer that cannot seal, allowed
    path: str = "relay"  # a TCP session's: "direct" once it runs on its own connection (directtcp.py)

    @property
    def byte_counts(self) -> tuple[int, int] | None:
        """(received, sent) by this client, or None for a handle that does not count (UDP flows
        count per proxy). A's Pipe is (user, relay), B's is (relay, local service)."""
        sent = getattr(self.handle, "sent", None)
        if sent is None:
            return None
        return (sent[1], sent[0]) if self.side == "A" else (sent[0], sent[1])

    def connection_info(self) -> dict:
        """What the admin page and ``connections()`` show of this session."""
        info: dict = {"id": self.id, "shortId": self.id[:8], "side": self.side, "peer": self.peer,
                      "port": self.port, "protocol": self.protocol, "startedAt": self.started_at,
                      "sealed": self.sealed}
        # a UDP flow's path is its own to say (direct.py); a TCP session's is chosen before it runs
        info["path"] = getattr(self.handle, "path", "relay") if self.protocol == "udp" else self.path
        direct = getattr(self.handle, "direct_counts", None)
        if direct is not None:  # what went direct (the relay sees none of it; it is told, see direct.py)
            info["directBytesSent"], info["directBytesReceived"] = direct
        if self.side == "A":
            info["localPort"] = self.local_port
        counts = self.byte_counts
        if counts is not None:
            info["bytesReceived"], info["bytesSent"] = counts
            if self.protocol == "tcp" and self.path == "direct":  # every byte of it went direct
                info["directBytesReceived"], info["directBytesSent"] = counts
        return info


class SessionBook:
    """Every session of one client, thread-safe. ``len(book)`` counts the running ones."""

    def __init__(self, reasons: int = REMEMBERED_REASONS, owners: int = REMEMBERED_OWNERS):
        self._records: dict[str, SessionRecord] = {}
        self._reasons: collections.OrderedDict[str, str] = collections.OrderedDict()
        self._ended_owners: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self._max_reasons = reasons
        self._max_owners = owners
        self._done = [0, 0]  # received, sent: by ended sessions as B and by closed proxies
        self._lock = threading.Lock()
        self._reason_came = threading.Condition(self._lock)
        self.trimmer = Trimmer()  # the heartbeat loop ticks it

    # --- the life of one session ------------------------------------------------------------

    @contextlib.contextmanager
    def track(self, session_id: str, side: str, *, peer: str | None, port: int | None,
              protocol: str | None, local_port: int | None = None, owner: Any = None,
              handle: Any = None) -> Iterator[SessionRecord]:
        """Hold a record of the session while the ``with`` block serves it; on leaving, the
        session is forgotten and its bytes (side B) are added to the totals."""
        record = SessionRecord(session_id, side, peer, port, protocol, local_port, owner)
        with self._lock:
            self._records[session_id] = record
            live = len(self._records)
        self.trimmer.opened(live)
        try:
            if handle is not None:
                self.attach(record, handle)
            yield record
        finally:
            self._untrack(record)

    def attach(self, record: SessionRecord, handle: Any) -> None:
        """The session's data path is up; abort it at once if the relay already closed it."""
        with self._lock:
            record.handle = handle
            closed = record.id in self._reasons
        if closed:
            handle.abort()

    def _untrack(self, record: SessionRecord) -> None:
        with self._lock:
            if self._records.get(record.id) is record:
                del self._records[record.id]
            counts = record.byte_counts
            if counts is not None and record.side == "B":  # A's bytes stay with its proxy
                self._done[0] += counts[0]
                self._done[1] += counts[1]
            if record.owner is not None and record.id not in self._reasons:
                _remember(self._ended_owners, record.id, record.owner, self._max_owners)
            live = len(self._records)
        self.trimmer.note(live)  # after a mass close, give the freed memory back

    def closed(self, session_id: str, reason: str) -> tuple[Any, Any]:
        """The relay closed the session: remember why. Returns (handle to abort, owner to tell),
        either None; the owner is returned once."""
        with self._lock:
            _remember(self._reasons, session_id, reason, self._max_reasons)
            self._reason_came.notify_all()
            record = self._records.get(session_id)
            owner = self._ended_owners.pop(session_id, None)
            if record is None:
                return None, owner
            record.reason = reason
            owner, record.owner = record.owner or owner, None
            return record.handle, owner

    # --- what the client asks ---------------------------------------------------------------

    def get(self, session_id: str) -> SessionRecord | None:
        with self._lock:
            return self._records.get(session_id)

    def close_reason(self, session_id: str) -> str | None:
        """Why the relay closed the session, if it did (and that is still remembered)."""
        with self._lock:
            return self._reasons.get(session_id)

    def wait_close_reason(self, session_id: str, timeout: float) -> str | None:
        """``close_reason``, waiting up to ``timeout`` for the relay's word to arrive."""
        with self._lock:
            self._reason_came.wait_for(lambda: session_id in self._reasons, timeout)
            return self._reasons.get(session_id)

    def records(self) -> list[SessionRecord]:
        """The sessions whose data path is up (one still joining its data channel is not listed)."""
        with self._lock:
            return [r for r in self._records.values() if r.handle is not None]

    def __len__(self) -> int:
        return len(self.records())

    def abort_all(self, tcp_only: bool = False) -> int:
        """Abort every running session (with ``tcp_only``, only TCP ones the relay carries: a
        direct one does not need it); returns how many."""
        handles = [r.handle for r in self.records()
                   if not tcp_only or (r.protocol != "udp" and r.path != "direct")]
        for handle in handles:
            handle.abort()
        return len(handles)

    # --- byte totals ------------------------------------------------------------------------

    def add_bytes(self, received: int, sent: int) -> None:
        """Count bytes that moved outside the book's records (a closed proxy's)."""
        with self._lock:
            self._done[0] += received
            self._done[1] += sent

    def byte_totals(self) -> tuple[int, int]:
        """(received, sent) by ended sessions and closed proxies, plus running sessions as B
        (running sessions as A count in their proxy's figures)."""
        with self._lock:
            received, sent = self._done
            for record in self._records.values():
                counts = record.byte_counts
                if counts is not None and record.side == "B":
                    received, sent = received + counts[0], sent + counts[1]
        return received, sent


def _remember(memory: collections.OrderedDict, key: str, value: Any, limit: int) -> None:
    memory[key] = value
    memory.move_to_end(key)
    while len(memory) > limit:
        memory.popitem(last=False)
