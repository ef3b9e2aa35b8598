"""Sealed UDP sessions: per-session keys that A and B agree over the control channel, and every
datagram sealed with an AEAD and a counter, so the relay can neither read, forge nor replay one.

Key exchange. Each side makes an ephemeral X25519 key for the session and sends a
``session_keys`` message {sessionId, ephemeral, publicKey, signature}; the relay passes it to
the session's other side unchanged. The signature is Ed25519, by the side's long-term key,
over ``transcript(role, session id, ephemeral)``; the receiver checks the signer's key against
its pin exactly as a sealed TCP session does (known_clients, --target-fingerprint,
--allow-from), then verifies the signature. A relay that substitutes its own ephemeral cannot
sign it; one that replays an old message names another session or role. Then

    shared = X25519(own ephemeral, peer's ephemeral)
    keys   = HKDF-SHA256(shared, salt = eph_A || eph_B, info = INFO || session id, 64 bytes)
             -> key A->B (first 32), key B->A (last 32)

Datagrams. ``counter (8 bytes, big-endian) || ChaCha20-Poly1305(key, nonce = 0000 || counter,
part || payload, aad = session id)``: 25 bytes more than the payload. ``part`` (inside the AEAD,
so authenticated) is WHOLE, or FIRST/SECOND for a datagram too big for one sealed datagram
(IPv4 carries at most 65,507 bytes): such a datagram goes as two halves under consecutive
counters and is delivered once both arrived, in one piece, or not at all (as IP fragments
are). So datagrams up to 64 KiB still pass whole. The receiver opens each, then keeps
a sliding window of the last ``REPLAY_WINDOW`` counters: a datagram that fails authentication
(forged, altered, truncated) or that it has seen or that is older than the window (replayed)
is dropped and counted in ``SealStats``. The counter's top byte is 0, so a sealed datagram
never looks like one of the relay's control datagrams (those start with 0xfd).

Only the ``cryptography`` package's primitives are used; nothing here is hand-made crypto.
"""

from __future__ import annotations

import base64
import binascii
import collections
import itertools
import logging
import struct
import threading
import time

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, x25519
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from common import identity as ident
from common import protocol as p

from .known_clients import KeyRefused
from .sealing import SealError

log = logging.getLogger("chuantou.client")

TRANSCRIPT_LABEL = b"chuantou sealed udp v1 session_keys"
INFO = b"chuantou sealed udp v1 keys"
COUNTER = struct.Struct("!Q")
TAG_BYTES = 16
OVERHEAD = COUNTER.size + 1 + TAG_BYTES  # 25 bytes per datagram
MAX_UDP_PAYLOAD = 65507  # the largest UDP payload IPv4 carries (IPv6 on loopback: a little more)
MAX_IN_ONE = MAX_UDP_PAYLOAD - OVERHEAD  # larger payloads go in two halves
MAX_SEALED_PAYLOAD = 65535  # the largest user datagram a sealed session passes
WHOLE, FIRST, SECOND = b"\x00", b"\x01", b"\x02"
REPLAY_WINDOW = 1024
MAX_COUNTER = 2 ** 64 - 1
MAILBOX_SIZE = 256  # session_keys held for sessions nobody waits on yet (it may come before the offer)


def transcript(role: str, session_id: str, ephemeral: bytes) -> bytes:
    """What ``role`` ("A" or "B") signs: binds its ephemeral key to this session and side."""
    return b"\0".join((TRANSCRIPT_LABEL, role.encode(), session_id.encode(), ephemeral))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str, what: str, size: int | None = None) -> bytes:
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise SealError(f"the peer's {what} is not base64") from None
    if size is not None and len(data) != size:
        raise SealError(f"the peer's {what} has {len(data)} bytes, not {size}")
    return data


class SealStats:
    """Datagrams a sealed session dropped: failed authentication (forged, altered, cut) or replayed
    (seen already, or older than the window), and too big to seal. Counters only grow."""

    def __init__(self):
        self.rejected = 0
        self.replayed = 0
        self.too_big = 0
        self.opened = 0
        self.sealed = 0

    def as_dict(self) -> dict:
        return {"rejected": self.rejected, "replayed": self.replayed, "tooBig": self.too_big,
                "opened": self.opened, "sealed": self.sealed}

    def add(self, other: "SealStats") -> None:
        self.rejected += other.rejected
        self.replayed += other.replayed
        self.too_big += other.too_big
        self.opened += other.opened
        self.sealed += other.sealed


class ReplayWindow:
    """The highest counter seen and a bitmap of the ``size`` below it (as IPsec and WireGuard keep)."""

    def __init__(self, size: int = REPLAY_WINDOW):
        self.size = size
        self._mask = (1 << size) - 1  # made once: a 1,024-bit integer per datagram is not free
        self.highest = -1
        self.bitmap = 0  # bit i: counter highest - i was seen

    def fresh(self, counter: int) -> bool:
        """Whether ``counter`` may be accepted (not seen, not too old); nothing is recorded."""
        if counter > self.highest:
            return True
        offset = self.highest - counter
        return offset < self.size and not (self.bitmap >> offset) & 1

    def mark(self, counter: int) -> None:
        """Record ``counter`` (only once its datagram proved authentic)."""
        if counter > self.highest:
            shift = counter - self.highest
            self.bitmap = ((self.bitmap << shift) | 1) & self._mask if shift < self.size else 1
            self.highest = counter
        else:
            self.bitmap |= 1 << (self.highest - counter)


class DatagramSealer:
    """Seals one direction's datagrams; safe to call from several threads (the counter is atomic)."""

    def __init__(self, key: bytes, session_id: str, stats: SealStats):
        self._aead = ChaCha20Poly1305(key)
        self._aad = session_id.encode()
        self._counter = itertools.count()
        self._pair_lock = threading.Lock()
        self.stats = stats

    def seal(self, payload: bytes) -> list[bytes]:
        """The sealed datagram(s) to send for ``payload``: one, two halves of one too big for a
        single datagram, or none (counted) for one over MAX_SEALED_PAYLOAD."""
        if len(payload) <= MAX_IN_ONE:
            return [self._seal_part(WHOLE, payload)]
        if len(payload) > MAX_SEALED_PAYLOAD:
            self.stats.too_big += 1
            return []
        half = len(payload) // 2
        with self._pair_lock:  # the halves need consecutive counters
            return [self._seal_part(FIRST, payload[:half]), self._seal_part(SECOND, payload[half:])]

    def _seal_part(self, part: bytes, payload: bytes) -> bytes:
        counter = next(self._counter)
        if counter > MAX_COUNTER:  # 2**64 datagrams: never in practice, but never reuse a nonce
            raise SealError("the sealed UDP session used up its counter")
        head = COUNTER.pack(counter)
        self.stats.sealed += 1
        return head + self._aead.encrypt(b"\0\0\0\0" + head, part + payload, self._aad)


class DatagramOpener:
    """Opens the other direction's datagrams; one thread (the flow's pump) calls ``open``."""

    def __init__(self, key: bytes, session_id: str, stats: SealStats, label: str):
        self._aead = ChaCha20Poly1305(key)
        self._aad = session_id.encode()
        self._window = ReplayWindow()
        self.stats = stats
        self.label = label
        self._warned = False
        self._first: tuple[int, bytes] | None = None  # (counter, first half) waiting for its second

    def open(self, datagram: bytes) -> bytes | None:
        """The payload, or None (dropped and counted) for a forged, altered or replayed datagram."""
        if len(datagram) < OVERHEAD:
            self._reject("too short to be sealed")
            return None
        head = datagram[:COUNTER.size]
        counter = COUNTER.unpack(head)[0]
        if not self._window.fresh(counter):
            self.stats.replayed += 1
            self._warn(f"datagram {counter} replayed (or older than the last {REPLAY_WINDOW})")
            return None
        try:
            plain = self._aead.decrypt(b"\0\0\0\0" + head, datagram[COUNTER.size:], self._aad)
        except InvalidTag:
            self._reject("failed authentication (forged or altered on the way)")
            return None
        self._window.mark(counter)
        self.stats.opened += 1
        part, payload = plain[:1], plain[1:]
        if part == WHOLE:
            return payload
        if part == FIRST:
            self._first = (counter, payload)
            return None
        first, self._first = self._first, None
        if part == SECOND and first is not None and first[0] == counter - 1:
            return first[1] + payload
        return None  # a half whose other half was lost: the datagram is lost, as an IP fragment's

    def _reject(self, why: str) -> None:
        self.stats.rejected += 1
        self._warn(f"a datagram {why}")

    def _warn(self, what: str) -> None:
        if not self._warned:  # once per session, the counters say how many
            self._warned = True
            log.warning("%s: %s; dropped (further drops are only counted)", self.label, what)


class UdpHandshake:
    """One side's half of the key exchange for one session."""

    def __init__(self, identity: ident.Identity, session_id: str, role: str):
        self.identity = identity
        self.session_id = session_id
        self.role = role
        self._ephemeral = x25519.X25519PrivateKey.generate()
        self.ephemeral = self._ephemeral.public_key().public_bytes(serialization.Encoding.Raw,
                                                                    serialization.PublicFormat.Raw)

    def offer(self) -> p.SessionKeys:
        signature = self.identity.key.sign(transcript(self.role, self.session_id, self.ephemeral))
        return p.SessionKeys(sessionId=self.session_id, ephemeral=_b64(self.ephemeral),
                             publicKey=self.identity.public_key_b64, signature=_b64(signature))

    def finish(self, msg: p.SessionKeys, verify, stats: SealStats, label: str
               ) -> tuple[str, DatagramSealer, DatagramOpener]:
        """Check the peer's half: its key by ``verify(proven_fp)`` (raises), its signature; then
        the (proven fingerprint, sealer for our direction, opener for theirs)."""
        peer_role = "B" if self.role == "A" else "A"
        spki = ident.decode_public_key(msg.publicKey)
        if spki is None:
            raise SealError("the peer's session_keys carries no usable key")
        key = serialization.load_der_public_key(spki)
        if not isinstance(key, ed25519.Ed25519PublicKey):
            raise SealError("the peer's key is not an Ed25519 key")
        proven = ident.fingerprint_of_spki(spki)
        try:
            verify(proven)  # the pin first: a wrong key is refused with the pin's message
        except KeyRefused as exc:
            raise SealError(str(exc), "the peer's key was refused (see that client's log)", refused_here=True) from None
        peer_ephemeral = _unb64(msg.ephemeral, "ephemeral key", 32)
        try:
            key.verify(_unb64(msg.signature, "signature", 64), transcript(peer_role, self.session_id, peer_ephemeral))
        except InvalidSignature:
            raise SealError(f"the session_keys for {self.session_id[:8]}... is not signed by the key it names "
                            f"({proven}): the relay or someone on the way altered it") from None
        shared = self._ephemeral.exchange(x25519.X25519PublicKey.from_public_bytes(peer_ephemeral))
        if shared == bytes(32):
            raise SealError("the peer's ephemeral key is degenerate")
        eph_a, eph_b = (self.ephemeral, peer_ephemeral) if self.role == "A" else (peer_ephemeral, self.ephemeral)
        keys = HKDF(algorithm=hashes.SHA256(), length=64, salt=eph_a + eph_b,
                    info=INFO + b"\0" + self.session_id.encode()).derive(shared)
        a_to_b, b_to_a = keys[:32], keys[32:]
        mine, theirs = (a_to_b, b_to_a) if self.role == "A" else (b_to_a, a_to_b)
        return (proven, DatagramSealer(mine, self.session_id, stats),
                DatagramOpener(theirs, self.session_id, stats, label))


class KeyMailbox:
    """session_keys messages by session ID. The control reader posts (it must not block); a flow
    waits for its session's. One may arrive before the flow exists (the relay tells A and B at
    about the same time), so a bounded number wait unclaimed, oldest dropped first."""

    def __init__(self, size: int = MAILBOX_SIZE):
        self.size = size
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._held: collections.OrderedDict[str, p.SessionKeys | None] = collections.OrderedDict()

    def post(self, msg: p.SessionKeys) -> None:
        with self._lock:
            if msg.sessionId in self._held and self._held[msg.sessionId] is not None:
                return  # the first one counts; a second is a relay playing games
            self._held[msg.sessionId] = msg
            while len(self._held) > self.size:
                self._held.popitem(last=False)
            self._arrived.notify_all()

    def cancel(self, session_id: str) -> None:
        """Wake a flow waiting on ``session_id`` with nothing (its session ended)."""
        with self._lock:
            self._held[session_id] = None
            while len(self._held) > self.size:
                self._held.popitem(last=False)
            self._arrived.notify_all()

    def wait(self, session_id: str, timeout: float) -> p.SessionKeys | None:
        """The peer's session_keys, or None when the session ended or ``timeout`` passed."""
        deadline = time.monotonic() + timeout
        with self._lock:
            try:
                while session_id not in self._held:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return None
                    self._arrived.wait(remaining)
                return self._held[session_id]
            finally:
                self._held.pop(session_id, None)


class SealedUdp:
    """The keys of one sealed UDP session on one side, once the exchange is done."""

    def __init__(self, peer_fp: str, sealer: DatagramSealer, opener: DatagramOpener, stats: SealStats):
        self.peer_fingerprint = peer_fp
        self.sealer = sealer
        self.opener = opener
        self.stats = stats
        # bound once: the pumps call these per datagram, one Python frame fewer each time
        self.seal = sealer.seal  # payload -> the sealed datagram(s) to send
        self.open = opener.open  # datagram -> payload, or None (dropped and counted)
