"""The relay's table of sessions: who is joined to whom, with which secrets, and since when.

A session is created when gateway A asks for target B. Each side then joins with its own
secret: a TCP data channel (``sock_a`` / ``sock_b``) or a registered UDP address
(``udp_a`` / ``udp_b``). The table only holds state; the relay and the UDP relay move bytes.
"""

from __future__ import annotations

import collections
import hmac
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from common.frames import ID_BYTES, SECRET_BYTES, JoinRequest, JoinStatus
from common.memtrim import Trimmer
from common.net import reset_connection

if TYPE_CHECKING:
    from common.pipe import Pipe


@dataclass(eq=False)
class Session:
    id: str
    client_a: str
    client_b: str
    port: int
    protocol: str  # "tcp" or "udp"
    secret_a: str = field(repr=False)
    secret_b: str = field(repr=False)
    created_at: float = field(default_factory=time.time)
    created_mono: float = field(default_factory=time.monotonic)
    sock_a: socket.socket | None = field(default=None, repr=False)
    sock_b: socket.socket | None = field(default=None, repr=False)
    pipe: Pipe | None = field(default=None, repr=False)
    udp_a: tuple | None = None
    udp_b: tuple | None = None
    udp_bytes: list = field(default_factory=lambda: [0, 0])  # a->b, b->a
    last_active: float = field(default_factory=time.monotonic)
    bytes_seen: int = 0  # TCP: bytes moved when the idle check last looked
    closed: bool = False
    # both sides registered a key, so they seal it end to end (the relay cannot check that they do:
    # it sees ciphertext either way; it knows only that both can)
    sealed: bool = False
    # asked for ahead of its user (a warm session): joined and sealed, idle until A's go frame, which the
    # relay cannot see (it is sealed); the admin page says "warm" so it is not read as a user's connection
    warm: bool = False
    join_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)  # see SessionTable.join_tcp
    # the direct path (UDP): each side's offer (candidates, path) once it sent path_candidates
    candidates: list = field(default_factory=lambda: [None, None], repr=False)
    punch_key: str = field(default_factory=lambda: secrets.token_hex(16), repr=False)
    # what each side reports of its direct path (direct_claims.py): [sent, received] per side, and the
    # path it says it took (None: no report yet); untrusted, bounded, shown as reported by clients
    claims: list = field(default_factory=lambda: [[0, 0], [0, 0]], repr=False)
    claimed_path: list = field(default_factory=lambda: [None, None], repr=False)
    # the direct path (TCP): the address each side's data channel came from, noted before JOINED
    # goes out, so that the offer the side sends next over its control channel finds it
    tcp_seen: list = field(default_factory=lambda: [None, None], repr=False)
    # a TCP session gone direct: its relay pipe ended, the relay keeps it for its clients' reports
    # until one says it ended (direct_claims.held_direct)
    direct_held: bool = False
    held_since: float = 0.0  # monotonic: when its relay pipe ended so

    @property
    def joined(self) -> bool:
        if self.protocol == "tcp":
            return self.pipe is not None
        return self.udp_a is not None and self.udp_b is not None

    @property
    def bytes_a_to_b(self) -> int:
        return self.pipe.sent[0] if self.pipe is not None else self.udp_bytes[0]

    @property
    def bytes_b_to_a(self) -> int:
        return self.pipe.sent[1] if self.pipe is not None else self.udp_bytes[1]

    def secret_for(self, side: str) -> str:
        return self.secret_a if side == "A" else self.secret_b

    def involves(self, client_id: str) -> bool:
        return client_id in (self.client_a, self.client_b)

    def close_sockets(self) -> None:
        """Called when the relay ends the session: a running pipe passes on how it ended (it
        resets both halves when aborted); a parked half is reset, since nothing finished."""
        if self.pipe is not None:
            self.pipe.abort()
            return
        reset_connection(self.sock_a)
        reset_connection(self.sock_b)


class SessionTable:
    def __init__(self):
        self._lock = threading.Lock()
        self._sessions: dict[str, Session] = {}
        self._opened_by: collections.Counter = collections.Counter()  # (client A, protocol) -> open sessions
        self._targeted: collections.Counter = collections.Counter()  # client B -> open sessions
        # Indexes, so that closing N sessions of one client costs O(N), not a scan of the table each:
        self._by_client: dict[str, dict[str, Session]] = {}  # client (A or B) -> its sessions
        self._unjoined_by: dict[str, dict[str, Session]] = {}  # client A -> sessions not joined yet (lazily)
        self.trimmer = Trimmer()  # the housekeeper ticks it

    def create(self, client_a: str, client_b: str, port: int, protocol: str) -> Session:
        session = Session(
            id=secrets.token_hex(ID_BYTES),
            client_a=client_a,
            client_b=client_b,
            port=port,
            protocol=protocol,
            secret_a=secrets.token_hex(SECRET_BYTES),
            secret_b=secrets.token_hex(SECRET_BYTES),
        )
        with self._lock:
            self._sessions[session.id] = session
            live = len(self._sessions)
            self._opened_by[client_a, protocol] += 1
            self._targeted[client_b] += 1
            for client_id in {client_a, client_b}:
                self._by_client.setdefault(client_id, {})[session.id] = session
            self._unjoined_by.setdefault(client_a, {})[session.id] = session
        self.trimmer.opened(live)
        return session

    def get(self, session_id: str) -> Session | None:
        with self._lock:
            return self._sessions.get(session_id)

    def remove(self, session: Session) -> bool:
        """Take the session out of the table; True if this call removed it."""
        with self._lock:
            if self._sessions.get(session.id) is not session:
                return False
            del self._sessions[session.id]
            session.closed = True
            _decrement(self._opened_by, (session.client_a, session.protocol))
            _decrement(self._targeted, session.client_b)
            for client_id in {session.client_a, session.client_b}:
                _discard(self._by_client, client_id, session.id)
            _discard(self._unjoined_by, session.client_a, session.id)
            live = len(self._sessions)
        self.trimmer.note(live)  # after a mass close, give the freed memory back
        return True

    def all(self) -> list[Session]:
        with self._lock:
            return list(self._sessions.values())

    def for_client(self, client_id: str) -> list[Session]:
        with self._lock:
            return list(self._by_client.get(client_id, {}).values())

    def unjoined_by(self, client_id: str) -> int:
        """How many sessions ``client_id`` asked for (as A) are still waiting for a side to join."""
        with self._lock:
            waiting = self._unjoined_by.get(client_id)
            if not waiting:
                return 0
            for session_id in [sid for sid, s in waiting.items() if s.joined]:  # each leaves once
                del waiting[session_id]
            if not waiting:
                del self._unjoined_by[client_id]
            return len(waiting)

    def targeting(self, client_id: str) -> int:
        """How many open sessions lead to ``client_id`` (as target B)."""
        with self._lock:
            return self._targeted[client_id]

    def opened_counts(self) -> dict[tuple[str, str], int]:
        """{(client A, protocol): open sessions it asked for} and {(client B, "to"): open sessions
        leading to it}, for every client with one (what a cluster node shares for the caps)."""
        with self._lock:
            counts = {key: count for key, count in self._opened_by.items() if count > 0}
            counts.update({(client, "to"): count for client, count in self._targeted.items() if count > 0})
            return counts

    def opened_by(self, client_id: str, protocol: str) -> int:
        """How many open sessions of ``protocol`` ``client_id`` asked for (as gateway A)."""
        with self._lock:
            return self._opened_by[client_id, protocol]

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)

    def join_tcp(self, join: JoinRequest, sock: socket.socket,
                 admit: Callable[[], None]) -> tuple[JoinStatus, Session | None, bool]:
        """Check a data channel's join and, if it may go ahead, ``admit()`` it (send JOINED, ready
        the socket) and attach ``sock`` as its side. Returns (status, session, both sides present).

        The check, ``admit()`` and the attach happen under the session's join lock, so of two
        channels racing for one side exactly one is told JOINED. ``admit()`` does I/O (one status
        byte into a fresh socket's empty send buffer), hence a lock per session and not the
        table's, which is taken only to attach against a concurrent close. If ``admit()`` raises,
        nothing is attached."""
        session = self.get(join.session_id)
        if session is None:
            return JoinStatus.UNKNOWN_SESSION, None, False
        with session.join_lock:
            status = _join_refusal(session, join, "tcp")
            if status is not None:
                return status, None, False
            session.tcp_seen[0 if join.side == "A" else 1] = _peer_address(sock)
            admit()
            with self._lock:
                if session.closed:  # closed since the check: the caller resets the channel
                    return JoinStatus.UNKNOWN_SESSION, None, False
                if join.side == "A":
                    session.sock_a = sock
                else:
                    session.sock_b = sock
                return JoinStatus.JOINED, session, session.sock_a is not None and session.sock_b is not None

    def expired(self, join_timeout: float, udp_idle_timeout: float,
                tcp_idle_timeout: float = 0.0) -> list[tuple[Session, str]]:
        """Sessions whose other half never came, and UDP sessions (and, if ``tcp_idle_timeout``
        is set, TCP sessions) idle too long, with the reason."""
        now = time.monotonic()
        out = []
        with self._lock:
            for s in self._sessions.values():
                if not s.joined:
                    if now - s.created_mono > join_timeout:
                        out.append((s, f"the other side did not join within {join_timeout:g} s"))
                elif s.protocol == "udp":
                    if now - s.last_active > udp_idle_timeout:
                        out.append((s, f"ended: idle for {udp_idle_timeout:g} s"))
                elif tcp_idle_timeout > 0 and not s.direct_held and _tcp_idle(s, now) > tcp_idle_timeout:
                    out.append((s, f"idle for {tcp_idle_timeout:g} s (tcpIdleTimeout)"))
        return out


    def unreported_direct(self, grace: float) -> list[Session]:
        """Sessions held as direct for ``grace`` seconds that no side reported direct: an older
        client's, which ends its direct sessions without telling the relay (nor reports them)."""
        now = time.monotonic()
        with self._lock:
            return [s for s in self._sessions.values()
                    if s.direct_held and now - s.held_since > grace and "direct" not in s.claimed_path]


def _join_refusal(session: Session, join: JoinRequest, protocol: str) -> JoinStatus | None:
    """Why ``join`` may not join ``session`` now, or None (the caller holds its join lock)."""
    if session.closed:
        return JoinStatus.UNKNOWN_SESSION
    if not hmac.compare_digest(session.secret_for(join.side), join.secret):
        return JoinStatus.BAD_SECRET
    if session.protocol != protocol:
        return JoinStatus.WRONG_PROTOCOL
    if protocol == "tcp" and (session.sock_a if join.side == "A" else session.sock_b) is not None:
        return JoinStatus.ALREADY_JOINED
    return None


def _peer_address(sock: socket.socket) -> tuple | None:
    try:
        return tuple(sock.getpeername()[:2])
    except OSError:  # gone already: the admit that follows fails too
        return None


def _tcp_idle(session: Session, now: float) -> float:
    """Seconds since the session last moved a byte (as far as the periodic checks saw)."""
    moved = session.bytes_a_to_b + session.bytes_b_to_a
    if moved != session.bytes_seen:
        session.bytes_seen = moved
        session.last_active = now
    return now - session.last_active


def _decrement(counter: collections.Counter, key) -> None:
    counter[key] -= 1
    if counter[key] <= 0:
        del counter[key]


def _discard(index: dict[str, dict], client_id: str, session_id: str) -> None:
    sessions = index.get(client_id)
    if sessions is not None:
        sessions.pop(session_id, None)
        if not sessions:
            del index[client_id]
