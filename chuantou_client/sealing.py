"""Sealed TCP sessions: TLS 1.3 between A and B *inside* the data channel the relay joined, so
the relay pumps ciphertext it can neither read nor change undetected.

Construction: A is the TLS client, B the TLS server; each presents the self-signed certificate
of its long-term key (common.identity), and each checks the key the other proved (TLS 1.3's
CertificateVerify signs the handshake with it) against its pin (known_clients), never against
what the relay said. Certificate chains mean nothing here; only the keys do.

OpenSSL on a server that asks for a client certificate insists on a chain to a trusted anchor
(the ``ssl`` module has no verify callback). So A first sends its certificate in a short
preamble, and B makes that certificate the only anchor of the handshake's context. That adds
no trust: the preamble only lets OpenSSL finish, and after the handshake B checks the key A
*proved* against its pin, exactly as A does with B's.

    A -> B   b"CTS1" | u16 length | A's certificate (DER)      then the TLS 1.3 handshake

Once two clients sealed a session in full, the next ones resume it (resumption.py): B's ticket,
offered by A only while the key it was issued under is pinned, skips the signatures; a resumed
session carries the key proven in that full handshake and passes the same checks, and must
besides be the key pinned now (``_check_resumed``).

Afterwards every byte is an AEAD record: a flipped, dropped, replayed or reordered byte fails
authentication and a stream that ends without close_notify is a truncation; both reset the
connection with a logged reason (``SealedStream``), so nothing altered or shortened is
delivered. Half-close passes through as close_notify then FIN (common.tls.TlsStream).
"""

from __future__ import annotations

import logging
import ssl
import struct
import threading
import time

from common import identity as ident
from common.errors import ChuantouError
from common.net import recv_exact, reset_connection
from common.tls import PreparedClient, TlsStream

from .known_clients import AllowFrom, KeyRefused, KnownClients, forget_key_command
from .resumption import PeerContext, ServerContexts, TicketStore
from .sealedstream import READ_DISCARD, SealedStream

log = logging.getLogger("chuantou.client")

PREAMBLE_MAGIC = b"CTS1"
PREAMBLE = struct.Struct("!4sH")
MAX_CERTIFICATE = 4096  # an Ed25519 self-signed certificate is ~400 bytes
REFUSAL_WAIT = 2.0  # B waits this long for the relay to close a session it refused


class SealError(ChuantouError):
    """A sealed session could not be set up; ``peer_reason`` is what the other side may be told."""

    def __init__(self, message: str, peer_reason: str | None = None, refused_here: bool = False):
        super().__init__(message)
        self.peer_reason = peer_reason or "the sealed session could not be set up"
        self.refused_here = refused_here  # this side refused the peer's key (else: the handshake failed)


# --- the two handshakes -----------------------------------------------------------------------------

def client_context(identity: ident.Identity) -> ssl.SSLContext:
    """A's context: presents A's certificate; B's is checked by key after the handshake."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the chain means nothing; the proven key is checked below
    identity.load_into(context)
    return context


def server_context(identity: ident.Identity, peer_certificate: bytes) -> ssl.SSLContext:
    """B's context for one peer: requires a client certificate, with the one A announced as the
    only anchor (see the module docstring: it lets OpenSSL finish; the pin decides). It issues
    no tickets unless a PeerContext says so (resumption.py)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.num_tickets = 0
    context.verify_mode = ssl.CERT_REQUIRED
    identity.load_into(context)
    try:
        context.load_verify_locations(cadata=peer_certificate)
    except ssl.SSLError as exc:
        raise SealError(f"the peer's certificate is unusable: {exc}") from None
    return context


def seal_as_a(sock, identity: ident.Identity, expected_fp: str | None, deadline: float, *,
              context: ssl.SSLContext | None = None, verify=None, on_proven=None,
              label: str = "sealed session", session: ssl.SSLSession | None = None, pin: str | None = None,
              prepared: PreparedClient | None = None) -> SealedStream:
    """Seal the joined data channel ``sock`` as A and return the stream. B's proven key must be
    ``expected_fp`` if given, and pass ``verify(proven_fp)`` (which raises) if given; then
    ``on_proven(proven_fp)`` is called (to record it). ``session``: a ticket of B's to offer
    (``prepared``: a connection of ``context`` made with it ahead), issued under the key ``pin``:
    a resumed session must prove exactly that key. On failure ``sock`` is reset and SealError
    raised."""
    try:
        der = identity.certificate_der
        stream = SealedStream(sock, context or client_context(identity), False, session=session,
                              prepared=prepared)
        stream.run_handshake(deadline, prefix=PREAMBLE.pack(PREAMBLE_MAGIC, len(der)) + der)
        stream.label = label
        proven = _check_proven(stream, expected_fp, verify)
        _check_resumed(stream, proven, pin)
        if on_proven is not None:
            on_proven(proven)
        stream.settimeout(None)
        return stream
    except BaseException as exc:
        reset_connection(sock)
        raise _as_seal_error(exc, "B") from None


def seal_as_b(sock, identity: ident.Identity, expected_fp: str | None, deadline: float, *,
              contexts: ServerContexts | None = None, peer: str = "", pin: str | None = None, verify=None,
              on_proven=None, on_failure=None, label: str = "sealed session",
              certificate: bytes | None = None) -> SealedStream:
    """Seal the joined data channel ``sock`` as B; A's proven key is checked as in seal_as_a.
    ``contexts``: the per-peer contexts by ``peer`` (the ID the relay named) whose tickets let A
    resume; ``pin``: the key pinned for ``peer`` now, the only one a resumed session may carry.
    ``on_failure(error)`` may tell the relay why (a reject_session); then B waits for the relay
    to close the channel, so that reason, not a bare reset, is what reaches A. ``certificate``:
    the preamble's, when the caller already read it (directtcp.py waits for it)."""
    entry: PeerContext | None = None
    try:
        if certificate is None:
            certificate = read_preamble(sock, deadline)
        announced = ident.certificate_fingerprint(certificate)
        _check_key(announced, expected_fp, verify)  # refuse early, before any handshake work
        issued = False
        if contexts is not None:
            entry = contexts.get(peer, certificate, pin)
            stream, issued = entry.new_stream(sock, SealedStream)
        else:
            stream = SealedStream(sock, server_context(identity, certificate), True)
        stream.run_handshake(deadline)
        if entry is not None:
            entry.finished(stream.resumed, issued)
        stream.label = label
        proven = _check_proven(stream, expected_fp, verify)
        _check_resumed(stream, proven, pin)
        if on_proven is not None:
            on_proven(proven)
        if entry is not None:
            entry.pinned(proven)
        stream.settimeout(None)
        return stream
    except BaseException as exc:
        error = _as_seal_error(exc, "A")
        if contexts is not None and entry is not None and certificate is not None and \
                isinstance(error, SealError) and error.refused_here:
            contexts.drop(peer, certificate)  # a refused peer keeps no ticket it could use
        if on_failure is not None and isinstance(error, SealError):
            on_failure(error)
            _wait_for_close(sock, REFUSAL_WAIT)
        reset_connection(sock)
        raise error from None


def _wait_for_close(sock, timeout: float) -> None:
    """Read (and drop) until the relay closes the channel or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    try:
        while (remaining := deadline - time.monotonic()) > 0:
            sock.settimeout(remaining)
            if not sock.recv(READ_DISCARD):
                return
    except OSError:
        return


def read_preamble(sock, deadline: float) -> bytes:
    magic, size = PREAMBLE.unpack(recv_exact(sock, PREAMBLE.size, deadline))
    if magic != PREAMBLE_MAGIC:
        raise SealError("the peer did not open a sealed session (is it an older chuantou without sealing?)",
                        "the target client expected a sealed session")
    if not 0 < size <= MAX_CERTIFICATE:
        raise SealError(f"the peer announced a certificate of {size} bytes (at most {MAX_CERTIFICATE})")
    return recv_exact(sock, size, deadline)


def _check_proven(stream: TlsStream, expected_fp: str | None, verify) -> str:
    der = stream.peer_certificate()
    if der is None:
        raise SealError("the peer presented no certificate")
    proven = ident.certificate_fingerprint(der)
    _check_key(proven, expected_fp, verify)
    return proven


def _check_resumed(stream: TlsStream, proven: str, pin: str | None) -> None:
    """A resumed session carries the key proven in the full handshake it resumes: accepted only
    as the key pinned now (a ticket is offered and honoured only then; this makes sure of it)."""
    if stream.resumed and not ident.same_fingerprint(pin, proven):
        raise KeyRefused(f"the peer resumed a session of the key {proven}, which is not the key pinned now "
                         f"({pin or 'none'})")


def _check_key(proven: str, expected_fp: str | None, verify) -> None:
    if expected_fp is not None and not ident.same_fingerprint(expected_fp, proven):
        raise KeyRefused(f"the peer proved the key {proven}, not the expected {expected_fp}")
    if verify is not None:
        verify(proven)


def _as_seal_error(exc: BaseException, other: str) -> BaseException:
    if isinstance(exc, SealError):
        return exc
    if isinstance(exc, KeyRefused):
        return SealError(str(exc), "the peer's key was refused (see that client's log)", refused_here=True)
    if isinstance(exc, ident.IdentityError):
        return SealError(f"sealing failed: {exc}")
    if isinstance(exc, ssl.SSLError):
        return SealError(f"sealed handshake with {other} failed: {exc.reason or exc}")
    if isinstance(exc, (OSError, ValueError, struct.error)):
        return SealError(f"sealed handshake with {other} failed: {exc}")
    return exc


# --- what a client uses -------------------------------------------------------------------------------

class Sealing:
    """One client's sealing: its identity, its pins and who may reach it."""

    def __init__(self, identity: ident.Identity, known: KnownClients | None = None, allow_from=(),
                 timeout: float = 10.0):
        self.identity = identity
        self.known = known if known is not None else KnownClients(None)
        self.timeout = timeout
        self._client_context = client_context(identity)
        self._server_contexts = ServerContexts(lambda certificate: server_context(identity, certificate))
        self.tickets = TicketStore()  # A: B's tickets (resumption.py), in memory only
        self.allow_from = allow_from
        self._counts_lock = threading.Lock()
        self.handshakes = {"full": 0, "resumed": 0}  # sealed TCP handshakes done, as A or B

    @property
    def allow_from(self) -> AllowFrom:
        return self._allow_from

    @allow_from.setter
    def allow_from(self, value) -> None:
        """Who may reach us; a change drops every resumable session, so none escapes the new list."""
        self._allow_from = value if isinstance(value, AllowFrom) else AllowFrom(value)
        self._server_contexts.clear()
        self.tickets.clear()

    @property
    def fingerprint(self) -> str:
        return self.identity.fingerprint

    def seal_a(self, sock, peer: str, pinned: str | None, session_id: str, hint: str | None = None,
               deadline: float | None = None, expected: str | None = None) -> SealedStream:
        """A's side of session ``session_id`` to ``peer`` (the ID this proxy targets);
        ``expected``: a fingerprint B must prove besides passing its pin (see hinted_key).
        A ticket from an earlier session with ``peer`` is offered when the key it was issued
        under is the one pinned now (``pinned``, the proxy's, else known_clients')."""
        deadline = deadline if deadline is not None else time.monotonic() + self.timeout
        pin = pinned or self.known.get(peer)
        offered, prepared = self.tickets.offer(peer, pin)
        stream = seal_as_a(sock, self.identity, expected, deadline, context=self._client_context,
                           verify=lambda proven: self.known.verify(peer, proven, pinned),
                           on_proven=lambda proven: self._accept(peer, proven, hint),
                           label=f"sealed session {session_id[:8]}... to {peer}", session=offered, pin=pin,
                           prepared=prepared)
        if offered is not None and not stream.resumed:
            self.tickets.discard(peer)  # B no longer takes it (it restarted, or renewed its context)
        self._count(stream)
        proven = ident.certificate_fingerprint(stream.peer_certificate() or b"")
        stream.after_first_read(lambda: self._after_setup(stream, peer, proven))
        return stream

    def _after_setup(self, stream: SealedStream, peer: str, proven: str) -> None:
        """A, once the session's first data went on: keep B's ticket (B sends one in a full
        handshake, before its first data), and prepare the next session's connection with it."""
        try:
            if not stream.resumed:
                session = stream.session()
                if session is None or not session.has_ticket:
                    return  # B sent none (it gives one only to a peer that may lack one)
                self.tickets.keep(peer, proven, session)
            self.tickets.prepare(peer, self._client_context)
        except (ssl.SSLError, ValueError) as exc:  # only the next session's speed is at stake
            log.debug("sealed session to %s: no ticket kept or connection prepared: %s", peer, exc)

    def seal_b(self, sock, peer: str, session_id: str, hint: str | None = None, on_failure=None,
               deadline: float | None = None, certificate: bytes | None = None,
               expected: str | None = None) -> SealedStream:
        """B's side of session ``session_id`` from ``peer`` (the ID the relay named); ``expected``
        as in seal_a. A may resume with a ticket of the context B keeps for it while the key
        pinned for ``peer`` stays the same."""
        def verify(proven: str) -> None:
            self.known.verify(peer, proven)
            refusal = self.allow_from.refusal(peer, proven)
            if refusal is not None:
                raise SealError(refusal, "the target client does not accept sessions from this client",
                                refused_here=True)

        deadline = deadline if deadline is not None else time.monotonic() + self.timeout
        stream = seal_as_b(sock, self.identity, expected, deadline, contexts=self._server_contexts, peer=peer,
                           pin=self.known.get(peer), verify=verify, on_failure=on_failure,
                           on_proven=lambda proven: self._accept(peer, proven, hint),
                           label=f"sealed session {session_id[:8]}... from {peer}", certificate=certificate)
        self._count(stream)
        return stream

    def _count(self, stream: SealedStream) -> None:
        with self._counts_lock:
            self.handshakes["resumed" if stream.resumed else "full"] += 1

    def seal_udp(self, send, mailbox, session_id: str, role: str, peer: str, pinned: str | None = None,
                 hint: str | None = None, meanwhile=None):
        """The keys of UDP session ``session_id`` with ``peer`` (udpseal.py): our session_keys goes
        out by ``send``, the peer's comes from ``mailbox``; its key is held to the pin (and, on B,
        to --allow-from) as in a TCP session. ``meanwhile()`` runs while the peer's half travels
        (the UDP registration: the two round trips overlap). Raises SealError."""
        from .udpseal import SealedUdp, SealStats, UdpHandshake  # udpseal imports this module

        def verify(proven: str) -> None:
            self.known.verify(peer, proven, pinned)
            refusal = self.allow_from.refusal(peer, proven) if role == "B" else None
            if refusal is not None:
                raise SealError(refusal, "the target client does not accept sessions from this client",
                                refused_here=True)

        handshake = UdpHandshake(self.identity, session_id, role)
        send(handshake.offer())
        if meanwhile is not None:
            meanwhile()
        answer = mailbox.wait(session_id, self.timeout)
        if answer is None:
            raise SealError(f"no session_keys from {peer} within {self.timeout:g} s (the session ended, or the "
                            f"peer does not seal UDP)")
        stats = SealStats()
        direction = "to" if role == "A" else "from"
        label = f"sealed UDP session {session_id[:8]}... {direction} {peer}"
        proven, sealer, opener = handshake.finish(answer, verify, stats, label)
        self._accept(peer, proven, hint)
        return SealedUdp(proven, sealer, opener, stats)

    def unsealed_refusal(self, peer: str, hint: str | None, allow_unsealed: bool) -> str | None:
        """Why a session with ``peer`` may not run unsealed, or None. A peer seals when it
        registered a key (``hint``, from the relay); one without (an older chuantou) is refused
        unless --allow-unsealed, and even then not if its key is pinned here: a peer that
        sealed before and now "cannot" is what a relay stripping the key would look like."""
        if ident.decode_public_key(hint) is not None:
            return None
        if not allow_unsealed:
            return (f"client '{peer}' does not support sealed sessions (it registered without a key: an older "
                    f"chuantou?), and an unsealed session is one the relay can read and alter; refusing. Upgrade "
                    f"it, or accept unsealed sessions with --allow-unsealed (for this client, or per proxy: "
                    f"proxy create ... --allow-unsealed)")
        pinned = self.known.get(peer)
        if pinned is not None:
            return (f"the relay says client '{peer}' does not support sealed sessions, but its key {pinned} is "
                    f"pinned here from an earlier sealed session; refusing to drop to an unsealed session (if it "
                    f"really runs an older chuantou now: {forget_key_command(peer)})")
        return None

    def early_refusal(self, peer: str | None, hint: str | None) -> str | None:
        """Refuse before any work (connecting to the service) a peer that --allow-from cannot
        admit even by the relay's own account; the proven key is checked again when sealing."""
        if not self.allow_from:
            return None
        spki = ident.decode_public_key(hint)
        claimed = ident.fingerprint_of_spki(spki) if spki else None
        if peer in self.allow_from.ids or claimed in self.allow_from.fingerprints:
            return None
        return f"client '{peer}' is not in --allow-from ({self.allow_from.describe()})"

    def _accept(self, peer: str, proven: str, hint: str | None) -> None:
        _note_hint(peer, hint, proven)
        self.known.record(peer, proven)


def hinted_key(hint: str | None) -> str | None:
    """The fingerprint of the key the relay named for a peer. A direct connection must prove it
    (as well as pass the pin): over the relay only the peer the relay authenticated can be at
    the other end, so a first session may pin what it proves; at a direct address anyone may
    answer, and without this a stranger there would get its own key pinned as the peer's."""
    spki = ident.decode_public_key(hint)
    return ident.fingerprint_of_spki(spki) if spki is not None else None


def _note_hint(peer: str, hint: str | None, proven: str) -> None:
    """The relay's word on the key is only a hint; when it differs from the proof, say so."""
    spki = ident.decode_public_key(hint)
    if spki is not None and ident.fingerprint_of_spki(spki) != proven:
        log.warning("the relay named a different key for %s (%s) than the one it proved (%s); "
                    "the proven key was checked against the pin", peer, ident.fingerprint_of_spki(spki), proven)
