"""Warm sessions (side A): frp's ``poolCount`` taken end to end, so that a user's connection
skips the whole set-up: the request, both joins and the sealed handshake.

For each TCP proxy, ``WarmPool(proxy, count)`` keeps up to ``count`` sessions to its target
requested (``connect_request.warm``), joined and sealed, B's key proven against the pin and A's
against B's --allow-from, with B holding them *without* a connection to its service
(warmtarget.py). When a user connects, the accept loop takes one, writes the sealed go frame
into it and hands it to the connection's thread, which pumps the user's bytes behind it; B
connects to its service when the go frame arrives. One named thread refills the pool.

The rules:
- only over the relay: while a direct path is to be tried (``path`` direct, or auto unless the
  last attempts to this target failed) the proxy sets up each session as before; UDP is unchanged;
- only with a relay that says it passes ``warm`` on (``FEATURE_WARM`` in register_response) to a
  target that said it understands it; an older relay or target would connect B's service at
  once, and B proves it holds the session by the sealed ``WARM_READY``, which the relay cannot
  forge; without it the session is dropped, never used;
- a warm session is recycled after ``LIFETIME`` seconds (B's changed rules then apply to the
  next), and dropped when the relay closes it, the target goes offline or the control channel
  is lost (the next registration refills the pool);
- a warm session found dead when taken (or whose go frame cannot be written) is dropped and the
  user's connection set up afresh, as without warm sessions; one that fails after its go frame
  went out fails the connection like a fresh one would (B refused it under its current rules).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import socket
import threading
import time
from dataclasses import dataclass

from common import protocol as p
from common.threads import Task
from common.errors import ChuantouError, RequestError
from common.frames import WARM_GO, WARM_READY
from common.net import close_quietly, recv_exact, reset_connection

from .earlyjoin import EarlyJoin
from .sealing import SealError
from .sessions import SessionRecord

log = logging.getLogger("chuantou.client")

DEFAULT_WARM = 1  # of the CLI and the saved config (a library caller asks: Client.create_proxy(warm=N))
MAX_WARM = 16
LIFETIME = 60.0  # seconds a warm session waits for a user before it is replaced (B holds one up to 90 s)
RETRY_DELAY = 1.0  # after a failed attempt; doubling up to RETRY_MAX
RETRY_MAX = 30.0
UNSUPPORTED_RETRY = 300.0  # the target (or relay) cannot hold warm sessions: ask again this much later
# a replacement is made this long after a take, not at once: its request, joins and handshake (CPU in
# A, the relay and B) would compete with the first bytes of the connection that took the session
REFILL_DELAY = 0.025
REGISTRATION_POLL = 0.05  # while the client is not registered, the filler looks this often
FIRST_BYTES = 16 * 1024  # of the user's bytes, at most, sent with the go frame


class WarmUnsupported(ChuantouError):
    """The relay or the target cannot hold warm sessions (an older chuantou)."""


def check_warm_count(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_WARM:
        raise ChuantouError(f"warm sessions {value!r} must be a whole number from 0 to {MAX_WARM} (0: none; "
                            f"--warm on proxy create)")
    return value


@dataclass
class WarmSession:
    """One session held ready, with the thread that will pump its user's connection: it waits for
    ``handoff`` (a user, or the end of the session), so a user's connection starts no thread."""

    reply: p.CreateSession
    stream: socket.socket  # the sealed stream (or, with a target allowed unsealed, the data channel)
    sealed: bool
    born: float  # time.monotonic()
    generation: int  # of the registration it was made in
    user: socket.socket | None = None
    sent_with_go: int = 0  # the user's first bytes, forwarded with the go frame
    handoff: threading.Event = dataclasses.field(default_factory=threading.Event)

    def give(self, user: socket.socket) -> None:
        self.user = user
        self.handoff.set()

    def end(self, clean: bool = False) -> None:
        """Close it unused (``clean``: close_notify and FIN, B lets it go quietly; else a reset)
        and let its thread go."""
        if clean:
            _end_unused(self.stream)
        else:
            reset_connection(self.stream)
        self.handoff.set()


class WarmPool:
    """Up to ``count`` warm sessions of one proxy (none for a UDP-only one); ``start()``/``stop()``."""

    def __init__(self, proxy, count: int, lifetime: float = LIFETIME):
        self.proxy = proxy
        self.client = proxy.client
        check_warm_count(count)
        self.count = count if proxy.protocol in ("tcp", "both") else 0
        self._lifetime = lifetime
        self._ready: collections.deque[WarmSession] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._generation = 0
        self._retry_at = 0.0  # monotonic; no attempt before
        self._delay = RETRY_DELAY
        self._taken_at = 0.0  # monotonic time of the last take
        self._inflight: tuple = (None, None)  # (pending request, socket) of the attempt running, for stop()
        self._thread: Task | None = None
        self.taken = 0  # user connections served by a warm session
        self.fallbacks = 0  # warm sessions found dead when taken (the user got a fresh set-up)
        self.problem: str | None = None  # why the pool is empty, if it is for a reason

    # --- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        if self.count > 0:
            self._thread = self.proxy.threads.spawn("warm", self._fill_loop)

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            pending, sock = self._inflight
            self._cond.notify_all()
        if pending is not None:
            pending.abandon()  # the attempt's wait ends with no reply
        if sock is not None:
            reset_connection(sock)
        self._close_ready()
        # (each session's holder thread ends with it; proxy.close() joins them with its group)
        if self._thread is not None:
            self._thread.join(timeout=self.client.request_timeout + 1.0)

    def registered(self) -> None:
        """A new registration: what the last one made is gone; fill again at once."""
        with self._cond:
            self._generation += 1
            self._retry_at = 0.0
            self._delay = RETRY_DELAY
            self._cond.notify_all()
        self._close_ready()

    def drop(self, why: str) -> None:
        """The control channel was lost (the relay closes every session of ours with it)."""
        with self._cond:
            self._generation += 1
        if self._close_ready():
            log.info("proxy %s: warm sessions dropped: %s", self.proxy.description, why)

    def closed(self, session_id: str) -> bool:
        """The relay closed ``session_id``: True (and it is dropped) if it is one of ours, waiting."""
        with self._cond:
            for ws in self._ready:
                if ws.reply.sessionId == session_id:
                    self._ready.remove(ws)
                    self._cond.notify_all()
                    break
            else:
                return False
        ws.end()
        return True

    @property
    def lifetime(self) -> float:
        return self._lifetime

    @lifetime.setter
    def lifetime(self, seconds: float) -> None:
        with self._cond:
            self._lifetime = seconds
            self._cond.notify_all()  # the filler recycles by the new lifetime at once

    @property
    def ready(self) -> int:
        with self._cond:
            return len(self._ready)

    def state(self) -> str:
        """For `proxy list` and the page."""
        if self.count == 0:
            return "off"
        if not self._applies():
            return "off (a direct path to the target is tried first: --path relay to use warm sessions)"
        return f"{self.ready}/{self.count} ready" + (f" ({self.problem})" if self.problem else "")

    # --- use --------------------------------------------------------------------------------

    def serve(self, user: socket.socket, addr: tuple) -> bool:
        """On the accept loop: take a warm session, send the go frame and hand the user to the
        session's waiting thread. False: none was usable (the caller sets the connection up afresh)."""
        ws = self._take()
        if ws is None:
            return False
        first = self._first_bytes(user)
        try:
            ws.stream.sendall(WARM_GO + first)  # into an idle connection's empty buffer: no wait
        except OSError as exc:
            log.debug("warm session %s... lost before its go frame: %s", ws.reply.sessionId[:8], exc)
            ws.end()
            self.fallbacks += 1
            if first:  # they cannot be given back to the user's socket: this connection is lost
                reset_connection(user)
                return True
            return False
        ws.sent_with_go = len(first)
        ws.give(user)
        return True

    def _first_bytes(self, user: socket.socket) -> bytes:
        """What the user sent already (a client that speaks first usually has), without waiting:
        it goes in the go frame's record, ahead of the pump's thread. Not under a bandwidth limit
        (the pump meters every byte there)."""
        if self.proxy.limits != (None, None):
            return b""
        try:
            return user.recv(FIRST_BYTES, socket.MSG_DONTWAIT)  # b"": the user's FIN, read again by the pump
        except (BlockingIOError, InterruptedError):
            return b""
        except OSError:
            return b""  # reset already: the pump finds out
    def _hold(self, ws: WarmSession) -> None:
        """A warm session's thread: wait for its user (or its end), then pump."""
        ws.handoff.wait()
        if ws.user is None:
            return
        proxy = self.proxy
        with self.client.sessions.track(ws.reply.sessionId, "A", **proxy.session_facts("tcp")) as record:
            record.sealed = ws.sealed
            proxy.pump(ws.user, ws.stream, ws.reply.sessionId, record, already_sent=ws.sent_with_go)

    def _take(self) -> WarmSession | None:
        with self._cond:
            while self._ready:
                ws = self._ready.popleft()
                self._cond.notify_all()  # the filler makes a replacement
                if self._usable(ws):
                    self.taken += 1
                    self._taken_at = time.monotonic()
                    return ws
                self.fallbacks += 1
                ws.end()
        return None

    def _usable(self, ws: WarmSession) -> bool:
        return (ws.generation == self._generation and time.monotonic() - ws.born < self.lifetime
                and self.client.sessions.close_reason(ws.reply.sessionId) is None and _still_open(ws.stream))

    # --- the filler -------------------------------------------------------------------------

    def _applies(self) -> bool:
        """Warm sessions go over the relay only (``path`` relay, or auto while the direct path to
        this target is not due for a try), with a relay that passes ``warm`` on."""
        client = self.client
        if client.direct.wants_to_try(self.proxy.target_client_id):
            return False
        reply = client.control.register_reply
        return reply is None or p.FEATURE_WARM in (reply.features or ())

    def _fill_loop(self) -> None:
        while True:
            with self._cond:
                generation = self._wait_for_need()
                if generation is None:
                    return
            try:
                ws = self._make(generation)
            except WarmUnsupported as exc:
                self._failed(f"not supported: {exc}", UNSUPPORTED_RETRY, logging.INFO)
                continue
            except ChuantouError as exc:  # a refused key is a warning, as for a user's connection
                refused_key = isinstance(exc, SealError) and exc.refused_here
                self._failed(str(exc), self._delay, logging.WARNING if refused_key else logging.INFO)
                self._delay = min(RETRY_MAX, self._delay * 2)
                continue
            with self._cond:
                if not self._stopping and ws.generation == self._generation and self._start_holder(ws):
                    self._ready.append(ws)
                    self._delay = RETRY_DELAY
                    self.problem = None
                    continue
            ws.end()  # stopping, the registration changed while it was made, or no thread for it

    def _start_holder(self, ws: WarmSession) -> bool:
        try:
            self.proxy.threads.spawn(f"warm-{ws.reply.sessionId[:8]}", self._hold, ws)
            return True
        except RuntimeError:  # out of threads: no warm session
            return False

    def _failed(self, why: str, delay: float, level: int) -> None:
        with self._cond:
            repeated, self.problem = why == self.problem, why
        level = logging.DEBUG if repeated else level  # said once, then quietly while it lasts
        log.log(level, "proxy %s: warm session not made (next try in %g s): %s", self.proxy.description, delay, why)
        with self._cond:
            self._retry_at = time.monotonic() + delay

    def _wait_for_need(self) -> int | None:
        """Wait (lock held) until a warm session is missing and may be made; None: stopping."""
        while not self._stopping:
            self._drop_old()
            now = time.monotonic()
            not_before = max(self._retry_at, self._taken_at + REFILL_DELAY)
            if (len(self._ready) < self.count and now >= not_before and self.client.connected
                    and self._applies()):
                return self._generation
            wake = [not_before - now] if now < not_before else []
            if self._ready:
                wake.append(self._ready[0].born + self.lifetime - now)
            if not self.client.connected:  # registered() runs just before the client counts as connected
                wake.append(REGISTRATION_POLL)
            self._cond.wait(max(0.002, min(wake)) if wake else 1.0)  # 1 s: the direct path's memory changed
        return None

    def _drop_old(self) -> None:
        """Close the sessions past their lifetime (lock held): a new one replaces each."""
        now = time.monotonic()
        while self._ready and now - self._ready[0].born >= self.lifetime:
            self._ready.popleft().end(clean=True)

    def _make(self, generation: int) -> WarmSession:
        """Request, join and seal one warm session, and read B's WARM_READY (raises ChuantouError)."""
        client, proxy = self.client, self.proxy
        early = EarlyJoin.take(client, "A")
        request = dataclasses.replace(proxy.connect_request("tcp"), warm=True)
        try:
            pending = client.control.start_request(request, on_reply=early.send_header)
        except ChuantouError:
            early.close()
            raise
        with self._cond:
            if self._stopping:  # stop() ran after the filler woke: it could not wake this attempt
                pending.abandon()
            self._inflight = (pending, None)
        try:
            try:
                reply = pending.wait(client.request_timeout)
            except RequestError as exc:
                if exc.code == p.WARM_UNSUPPORTED:
                    raise WarmUnsupported(str(exc)) from None
                raise
            record = SessionRecord(reply.sessionId, "A", **proxy.session_facts("tcp"))
            relay = client.join_session(record, reply, early)
            with self._cond:
                if self._stopping:
                    reset_connection(relay)
                    raise ChuantouError("the proxy is closing")
                self._inflight = (None, relay)
            stream = client.seal_as_a(relay, proxy, reply)
            with self._cond:
                self._inflight = (None, stream)
            try:
                ready = recv_exact(stream, len(WARM_READY), time.monotonic() + client.request_timeout)
                stream.settimeout(None)
            except (OSError, ChuantouError) as exc:
                reset_connection(stream)
                raise ChuantouError(f"the target did not confirm the warm session: {exc}") from None
            if ready != WARM_READY:  # not holding it: its service may have spoken already
                reset_connection(stream)
                raise WarmUnsupported("the target did not hold the session (it answered as an older chuantou)")
            return WarmSession(reply, stream, stream is not relay, time.monotonic(), generation)
        finally:
            early.close()
            with self._cond:
                self._inflight = (None, None)

    def _close_ready(self) -> int:
        with self._cond:
            ready = list(self._ready)
            self._ready.clear()
            self._cond.notify_all()
        for ws in ready:
            ws.end()
        return len(ready)


def _end_unused(stream) -> None:
    """End a warm session nobody used, cleanly (close_notify, then FIN): B sees it end before any
    go frame and lets it go quietly; the relay sees a normal end."""
    try:
        stream.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    close_quietly(stream)


def _still_open(stream) -> bool:
    """Nothing arrived on the idle session: no end, no reset, no byte (B sends nothing while it
    holds a warm session, so anything readable means it is closing)."""
    raw = stream
    while hasattr(raw, "_sock"):  # a SealedStream over a TlsStream over the TCP socket
        raw = raw._sock
    timeout = raw.gettimeout()
    try:
        raw.settimeout(0.0)
        raw.recv(1, socket.MSG_PEEK)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        raw.settimeout(timeout)
    return False
