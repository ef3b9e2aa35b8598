"""The target side (B) of a warm session (A's side: warm.py).

A warm session is offered with ``connect_request.warm``; B checks, joins and seals it as any
other (target.py), so A's key is proven and the pin and --allow-from passed, but B does not
connect to its service yet: it writes ``WARM_READY`` into the sealed stream, gives back its
pending-setup slot (the session is set up; it now counts, at the relay, like any open one) and
waits for A's ``WARM_GO``. Only then, with its rules checked once more (they may have changed
while the session waited), does it connect to the service; the user's bytes follow the go frame.

A session A never uses ends after ``HOLD_MAX`` (A recycles its own well before), and B holds at
most ``MAX_HELD`` at once, so a peer that asks for warm sessions in bulk cannot park B's threads
beyond that. Both frames travel sealed: the relay can neither forge a go nor see one.
"""

from __future__ import annotations

import logging
import threading
import time

from common import identity as ident
from common import protocol as p
from common.errors import ChuantouError
from common.frames import WARM_GO, WARM_READY
from common.net import recv_exact, reset_connection, shutdown_quietly

from .sealing import SealedStream

log = logging.getLogger("chuantou.client")

HOLD_MAX = 90.0  # seconds B holds an unused warm session (A recycles its own at warm.LIFETIME, 60 s)
MAX_HELD = 256  # warm sessions B holds at once, over all requesters
REJECT_GRACE = 5.0  # how long a refused warm session waits for the relay to close it


class WarmHolds:
    """The sealed streams B holds waiting for a go frame, so that stop() and a lost control
    channel can wake their threads (they have no Pipe in the session book yet)."""

    def __init__(self, limit: int = MAX_HELD):
        self.limit = limit
        self._lock = threading.Lock()
        self._held: set = set()

    def __len__(self) -> int:
        with self._lock:
            return len(self._held)

    def add(self, stream) -> bool:
        with self._lock:
            if len(self._held) >= self.limit:
                return False
            self._held.add(stream)
            return True

    def discard(self, stream) -> None:
        with self._lock:
            self._held.discard(stream)

    def abort_all(self) -> int:
        with self._lock:
            held = list(self._held)
        for stream in held:
            shutdown_quietly(stream)  # wakes the thread waiting for the go frame
        return len(held)


def await_go(client, msg: p.ConnectOffer, stream, service: tuple[str, int], slot) -> bool:
    """Hold the sealed warm session ``stream`` until A's go frame: True to connect to the service
    now; False when it ended unused or was refused (then the stream is closed)."""
    holds: WarmHolds = client.warm_holds
    if not holds.add(stream):
        log.warning("warm session from %s refused: this client holds %d warm sessions already",
                    msg.fromClientId, holds.limit)
        _refuse(client, msg, stream, "the target client holds too many warm sessions")
        return False
    try:
        try:
            stream.sendall(WARM_READY)
            slot.release()  # sealed and waiting: no longer a setup in progress (max_pending_connects)
            frame = recv_exact(stream, len(WARM_GO), time.monotonic() + HOLD_MAX)
        except TimeoutError:
            log.info("warm session %s... from %s unused for %g s: closed", msg.sessionId[:8], msg.fromClientId,
                     HOLD_MAX)
            reset_connection(stream)
            return False
        except (OSError, ChuantouError) as exc:  # A recycled it, the relay closed it, or we stop
            log.debug("warm session %s... from %s ended unused: %s", msg.sessionId[:8], msg.fromClientId, exc)
            reset_connection(stream)
            return False
    finally:
        holds.discard(stream)
    if frame != WARM_GO:
        log.warning("warm session %s... from %s: A sent %r, not the go frame; closed", msg.sessionId[:8],
                    msg.fromClientId, frame)
        reset_connection(stream)
        return False
    stream.settimeout(None)
    refusal = _refusal_now(client, msg, stream, service)
    if refusal is not None:
        _refuse(client, msg, stream, refusal)
        return False
    return True


def _refusal_now(client, msg: p.ConnectOffer, stream, service: tuple[str, int]) -> str | None:
    """This client's rules as they are now (export policy, --allow-from against the proven key):
    what A is told if they refuse the session (the detail goes to our log)."""
    refusal = client.export.refusal(*service)
    if refusal is not None:
        log.warning("warm session from %s to %s:%d refused at its go: %s", msg.fromClientId, service[0],
                    service[1], refusal)
        return "the target is not allowed by the target client"
    # (an unsealed session, allowed when it was set up, has no peer key: over wss its channel's
    # certificate is the relay's)
    der = stream.peer_certificate() if isinstance(stream, SealedStream) else None
    if der is not None:
        refusal = client.sealing.allow_from.refusal(msg.fromClientId, ident.certificate_fingerprint(der))
        if refusal is not None:
            log.warning("warm session from %s refused at its go: %s", msg.fromClientId, refusal)
            return "the target client does not accept sessions from this client"
    return None


def _refuse(client, msg: p.ConnectOffer, stream, reason: str) -> None:
    """Tell the relay why, and let it close the session (A then hears that reason, not a bare
    reset that raced it), within a bound; then reset our end. What A sent meanwhile is dropped."""
    try:
        client.control.send(p.RejectSession(sessionId=msg.sessionId, reason=reason))
    except ChuantouError as exc:
        log.info("could not tell the relay reject_session: %s", exc)
    deadline = time.monotonic() + REJECT_GRACE
    try:
        while (remaining := deadline - time.monotonic()) > 0:
            stream.settimeout(remaining)
            if not stream.recv(65536):
                break
    except (OSError, ChuantouError):
        pass
    reset_connection(stream)
