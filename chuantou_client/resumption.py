"""Resuming a sealed session: two clients that sealed one session in full skip the signatures
in the next ones (TLS 1.3 resumption, RFC 8446 section 2.2), holding every one to the same pin.

A full sealed handshake costs each side an Ed25519 signature and the check of the other's, and B
a certificate chain check: most of a session's setup CPU. After one, B (the TLS server) sends A
a session ticket: the session, A's proven certificate included, encrypted under a key of B's
handshake context for that peer, which is made in memory and never leaves it. A keeps the ticket
in memory only (``TicketStore``), under the peer's ID and the fingerprint B proved, and offers it
on its next session to that peer while that fingerprint is still the peer's pin. The resumed
handshake is ``psk_dhe_ke`` (OpenSSL's only mode unless told otherwise): a fresh X25519 exchange
each time, so each session still has keys of its own and forward secrecy, and each side proves
it holds the secret of the full handshake in which both proved their keys. The peer certificate
a resumed session carries is the one proven then; it goes through every check a full
handshake's does (pin, --target-fingerprint, --allow-from, the relay-named key of a direct
connection) and must besides be the key pinned *now* (sealing._check_resumed).

What a relay can do with this: it sees the ticket in A's ClientHello, opaque to it, and cannot
resume without the secret behind it. A ticket that reaches any context but the one that issued
it (another client, B after a restart, B's context for another peer or key) cannot be decrypted
there: the handshake is a full one, whose key is checked as always.

A ticket stops being offered or accepted when the pin it was issued under changes: A offers one
only to the fingerprint pinned now, and B makes a new context (new ticket key) when a peer's pin
is no longer the one its context saw, so ``forget-key`` on either side makes the next session
full. A change of --allow-from drops every context and ticket (Sealing.allow_from). B renews a
peer's context at least every CONTEXT_MAX_AGE, so no ticket outlives that.
"""

from __future__ import annotations

import collections
import hashlib
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Callable

from common import identity as ident
from common.tls import PreparedClient

TICKET_CACHE = 256  # A: peers whose ticket is kept (one each), least recently used first out
CONTEXT_CACHE = 64  # B: per-peer handshake contexts kept (one per peer ID and certificate)
CONTEXT_MAX_AGE = 3600.0  # B renews a peer's context (and so its ticket key) this often, at least


@dataclass
class _Ticket:
    fingerprint: str  # the key B proved in the full handshake the ticket resumes
    session: ssl.SSLSession
    kept: float  # time.monotonic() when it came
    prepared: PreparedClient | None = None  # the next session's connection, its ClientHello made


class TicketStore:
    """A's tickets, one per peer ID, in memory only."""

    def __init__(self, size: int = TICKET_CACHE):
        self.size = size
        self._lock = threading.Lock()
        self._tickets: collections.OrderedDict[str, _Ticket] = collections.OrderedDict()

    def offer(self, peer: str, pin: str | None) -> tuple[ssl.SSLSession | None, PreparedClient | None]:
        """The ticket to offer in a session to ``peer``, only one issued by the key pinned now,
        and the connection prepared with it if there is one (each is used once)."""
        with self._lock:
            ticket = self._tickets.get(peer)
            if ticket is None:
                return None, None
            if pin is None or not ident.same_fingerprint(ticket.fingerprint, pin) or \
                    time.monotonic() - ticket.kept > CONTEXT_MAX_AGE:
                del self._tickets[peer]  # its pin was forgotten or changed (or B renewed its context)
                return None, None
            self._tickets.move_to_end(peer)
            prepared, ticket.prepared = ticket.prepared, None
            return ticket.session, prepared

    def prepare(self, peer: str, context: ssl.SSLContext) -> None:
        """Make the next session's connection to ``peer`` now, off that session's setup."""
        with self._lock:
            ticket = self._tickets.get(peer)
            if ticket is None or ticket.prepared is not None:
                return
        prepared = PreparedClient(context, ticket.session)
        with self._lock:
            if self._tickets.get(peer) is ticket and ticket.prepared is None:
                ticket.prepared = prepared

    def keep(self, peer: str, fingerprint: str, session: ssl.SSLSession) -> None:
        with self._lock:
            self._tickets[peer] = _Ticket(fingerprint, session, time.monotonic())
            self._tickets.move_to_end(peer)
            while len(self._tickets) > self.size:
                self._tickets.popitem(last=False)

    def discard(self, peer: str) -> None:
        with self._lock:
            self._tickets.pop(peer, None)

    def clear(self) -> None:
        with self._lock:
            self._tickets.clear()

    def __len__(self) -> int:
        return len(self._tickets)


class PeerContext:
    """B's handshake context for one peer ID and certificate, and when it issues tickets.

    A ticket is issued in a session only when the peer may lack one (the first session, or a
    full handshake since the last ticket: it restarted, or lost it): issuing costs B about as
    much as a resumed handshake saves (the session and certificate serialized and encrypted),
    and A may offer one ticket in many sessions. ``ssl`` sets the count per context only, and a
    connection takes it when made, so the count is set and the connection made under a lock."""

    def __init__(self, context: ssl.SSLContext, pin: str | None):
        self.context = context
        self.pin = pin  # the peer's pin when this context was made, or recorded by its first session
        self.made = time.monotonic()
        self._ticket_due = True
        self._lock = threading.Lock()

    def pinned(self, fingerprint: str) -> None:
        """The peer's key was recorded as its pin (its first session): tickets stay good."""
        self.pin = fingerprint

    def usable(self, pin: str | None) -> bool:
        return self.pin == pin and time.monotonic() - self.made < CONTEXT_MAX_AGE

    def new_stream(self, sock, stream_class):
        """(a server-side ``stream_class`` over ``sock``, whether it issues a ticket)."""
        with self._lock:
            issues = self._ticket_due
            self._ticket_due = False
            self.context.num_tickets = 1 if issues else 0
            return stream_class(sock, self.context, True), issues

    def finished(self, resumed: bool, issued: bool) -> None:
        """After a handshake: a full one that issued no ticket means the peer has none of ours."""
        if not resumed and not issued:
            self._ticket_due = True


class ServerContexts:
    """B's PeerContexts by (peer ID, certificate): a context costs more to make than a handshake,
    and its ticket key must serve only that peer and key. Bounded, least recently used first out."""

    def __init__(self, make: Callable[[bytes], ssl.SSLContext], size: int = CONTEXT_CACHE):
        self._make = make
        self.size = size
        self._lock = threading.Lock()
        self._entries: collections.OrderedDict[tuple[str, bytes], PeerContext] = collections.OrderedDict()

    def get(self, peer: str, certificate: bytes, pin: str | None) -> PeerContext:
        """The context for ``peer`` presenting ``certificate``, made anew when the peer's pin
        is no longer ``pin`` as its context saw it (tickets of the old one then fail)."""
        key = (peer, hashlib.sha256(certificate).digest())
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry.usable(pin):
                self._entries.move_to_end(key)
                return entry
        entry = PeerContext(self._make(certificate), pin)
        with self._lock:
            self._entries[key] = entry
            self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
        return entry

    def drop(self, peer: str, certificate: bytes) -> None:
        """Forget a peer's context (its tickets with it): after a refusal, say."""
        with self._lock:
            self._entries.pop((peer, hashlib.sha256(certificate).digest()), None)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
