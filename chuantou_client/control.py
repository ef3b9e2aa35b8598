"""The client's control channel: a WebSocket to the relay that registers, sends heartbeats,
matches answers to requests, and reconnects with capped, jittered backoff.

One named thread connects and then reads; another sends heartbeats and notices a silent
relay. Messages the relay starts (``connect_request``, ``session_closed``) go to the
``on_message`` callback, which must not block.

With several relay URLs (the nodes of a relay cluster), the client starts on the first that
answers and, when a connection fails or is lost, moves on to the next one, in order (or in an
order shuffled once per start, relays.py); only after a whole round of them fails does it wait
out its backoff. A node may answer ``register`` with a redirect to a less loaded node, which
the client follows within the rules of relays.py; a redirect it does not follow, or one that
fails, sends it back to the URL of its list, where it registers without accepting redirects.

A refused registration ends the loop only before the first success (a wrong token or ID at
the first start); once registered, every failure is retried, so a relay restarted with
another token, or an ID held by another connection, recovers when the cause goes away. A
client replaced by another connection with its ID retries without taking it back, so the
two do not take turns.
"""

from __future__ import annotations

import logging
import random
import ssl
import threading
import time

import websocket

from common import handshake, tls
from common import protocol as p
from common.errors import ChuantouError, NotConnectedError

from .pending import PendingRequest, RequestTable
from .relays import IN_ORDER, RelayList, redirect_problem

log = logging.getLogger("chuantou.client")


class RegistrationRefused(ChuantouError):
    """The relay answered ``register`` with an error; ``code`` says which, if the relay did."""

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        self.code = code


class WrongScheme(ChuantouError):
    """A ``ws://`` URL for a relay that accepts only TLS (it answered 426 Upgrade Required)."""

    def __init__(self, url: str):
        super().__init__(f"the relay accepts only TLS: use --server {url.replace('ws://', 'wss://', 1)}")


def split_server_urls(value) -> list[str]:
    """--server's value: one URL, several separated by commas, or a list of such strings."""
    items = [value] if isinstance(value, str) else list(value)
    urls = [url.strip() for item in items for url in item.split(",") if url.strip()]
    if not urls:
        raise ChuantouError("no relay URL given: use --server ws://HOST:8200 (several: separate with commas)")
    return urls


class ControlChannel:
    def __init__(self, url: str, client_id: str, threads, on_message, *, heartbeat_interval: float,
                 heartbeat_timeout: float, connect_timeout: float, reconnect_max_delay: float,
                 token: str | None = None, tls=None, on_lost=None, public_key: str | None = None,
                 on_registered=None, on_tick=None, server_order: str = IN_ORDER, order_rng=None):
        self.relays = RelayList(split_server_urls(url), server_order, order_rng)  # see _next_url
        self.urls = self.relays.urls  # in the order they are tried
        self.url = self.relays.current  # the one in use or being tried (a redirect may lead off the list)
        self.client_id = client_id
        self.threads = threads
        self.on_message = on_message
        self.heartbeat_interval = heartbeat_interval
        self._on_tick = on_tick  # the client's periodic chores, on the heartbeat's beat
        self.heartbeat_timeout = heartbeat_timeout
        self.connect_timeout = connect_timeout
        self.reconnect_max_delay = reconnect_max_delay
        self._token = token
        self._tls = tls
        self.on_lost = on_lost  # called when a registered connection ends: the relay drops our sessions
        self.public_key = public_key  # base64 SPKI sent with register, for peers' sealed sessions
        self.on_registered = on_registered  # called with the register_response after each registration
        self.register_reply: p.RegisterResponse | None = None

        self.state = "idle"  # idle, connecting, connected, reconnecting, failed, stopped
        self.last_error: str | None = None
        self.next_attempt_at: float | None = None
        self.reconnects = 0
        self.registered = threading.Event()  # set while registered
        self.finished = threading.Event()  # set when the connect loop gave up or stopped
        self._stopping = threading.Event()
        self._ever_registered = False  # after the first success no failure is final
        self._takeover = True  # False after being replaced: do not kick the live holder of the ID
        self._ws: websocket.WebSocket | None = None
        self._last_received = time.monotonic()
        self._requests = RequestTable()  # requests sent and not answered yet

    @property
    def stopping_event(self) -> threading.Event:
        return self._stopping

    # --- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        self.threads.spawn("control", self._run)
        self.threads.spawn("heartbeat", self._heartbeat_loop)

    def stop(self) -> None:
        if self._stopping.is_set():
            return
        self._stopping.set()
        ws = self._ws
        if ws is not None and self.registered.is_set():
            try:
                ws.send(p.encode(p.Unregister()))
            except Exception:  # the relay is already gone; nothing to tell it
                pass
        self._abort()
        self.state = "stopped"

    def _abort(self) -> None:
        ws = self._ws
        if ws is not None:
            ws.abort()

    # --- connect / read loop ----------------------------------------------------------------

    def _run(self) -> None:
        attempt = 0
        try:
            while not self._stopping.is_set():
                self.state = "connecting" if attempt == 0 and not self.reconnects else "reconnecting"
                try:
                    ws = self._connect_and_register()
                except (RegistrationRefused, tls.TlsError, ssl.SSLCertVerificationError, WrongScheme) as exc:
                    self.last_error = _describe(exc)
                    if not self._ever_registered:
                        self.state = "failed"
                        log.error("%s", self.last_error)
                        return
                    self._log_refused_retry(exc)
                except Exception as exc:  # unreachable, reset, bad handshake: try again later
                    self.last_error = _describe(exc)
                    log.info("cannot reach relay at %s: %s", self.url, self.last_error)
                    if self._next_url():
                        continue  # another relay of the list, at once
                else:
                    attempt = 0
                    ended = self._serve(ws)
                    if self.on_lost is not None:
                        self.on_lost(ended)
                    if self._stopping.is_set():
                        return
                    self.reconnects += 1
                    if ended == "replaced":
                        self._takeover = False
                        log.error("%s; retrying every %g s at most without taking the ID back, so the two do not "
                                  "take turns; this client registers again once the other goes offline",
                                  self.last_error, self.reconnect_max_delay)
                    else:
                        lost = self.url
                        if self._next_url():
                            log.warning("connection to relay %s lost; moving to %s", lost, self.url)
                            continue
                        log.warning("connection to relay %s lost; reconnecting", self.url)
                delay = min(self.reconnect_max_delay, 0.5 * 2 ** min(attempt, 10)) * random.uniform(0.5, 1.0)
                attempt += 1
                self.next_attempt_at = time.time() + delay
                self._stopping.wait(delay)
        finally:
            self.next_attempt_at = None
            self.finished.set()

    def _next_url(self) -> bool:
        """Move to the next relay URL; False when that starts a new round (or there is only one),
        so the caller waits its backoff before trying again."""
        more = self.relays.advance()
        self.url = self.relays.current
        return more

    def _log_refused_retry(self, exc: Exception) -> None:
        if isinstance(exc, RegistrationRefused) and exc.code == p.ID_IN_USE:
            log.warning("client ID %s is still in use by another connection; retrying", self.client_id)
        else:
            log.error("%s; retrying with backoff (at most every %g s), since this "
                      "client was registered before", self.last_error, self.reconnect_max_delay)

    def _connect_and_register(self) -> websocket.WebSocket:
        """Register at the current URL of the list, or where its redirects lead (relays.py)."""
        home = self.url
        visited = [home]
        follows = True
        while True:
            try:
                return self._register_at(follows)
            except handshake.Redirected as redirect:
                if not follows:  # a node must not redirect a client that said it does not follow
                    raise ConnectionError(f"relay {self.url} redirected to {redirect.url} although this client "
                                          f"asked not to be redirected") from None
                problem = redirect_problem(self.urls, visited, redirect.url)
                if problem is None:
                    log.info("relay %s redirected this client to %s%s; registering there", self.url, redirect.url,
                             f" (node {redirect.node})" if redirect.node else "")
                    self.url = redirect.url
                    visited.append(redirect.url)
                    continue
                log.warning("not following the redirect from relay %s to %s: %s; registering at %s (from "
                            "--server) without redirects", self.url, redirect.url, problem, home)
            except Exception as exc:
                if self.url == home:
                    raise
                log.warning("relay %s, where a redirect led, failed: %s; registering at %s (from --server) "
                            "without redirects", self.url, _describe(exc), home)
            self.url, follows = home, False

    def _register_at(self, follows_redirect: bool) -> websocket.WebSocket:
        sslopt = {"context": self._tls.context} if self._tls else None
        # protocol.decode rejects invalid UTF-8 itself; websocket-client's own check is a slow Python loop
        try:
            ws = websocket.create_connection(self.url, timeout=self.connect_timeout, enable_multithread=True,
                                             sslopt=sslopt, skip_utf8_validation=True)
        except websocket.WebSocketBadStatusException as exc:
            if exc.status_code == 426:  # a --tls-only relay answering a ws:// URL
                raise WrongScheme(self.url) from None
            raise
        try:
            if self._tls is not None:
                assert isinstance(ws.sock, ssl.SSLSocket)  # TLS settings come only with a wss:// URL
                tls.check_pin(ws.sock.getpeercert(binary_form=True), self._tls.fingerprint)
            try:
                ws.send(p.encode(handshake.register_for(self._receive_message(ws), self.client_id, self._token,
                                                        self._takeover, self.public_key, follows_redirect)))
                reply = None
                while reply is None:
                    reply = handshake.registration_result(self._receive_message(ws))
            except handshake.Refused as exc:
                raise RegistrationRefused(str(exc), exc.code) from None
            ws.settimeout(None)  # the reader blocks; stop() and the heartbeat watchdog abort it
        except BaseException:
            ws.abort()
            ws.shutdown()
            raise
        self.register_reply = reply
        if reply.existingKicked:
            log.warning("client ID %s was registered elsewhere; that connection was replaced", self.client_id)
        return ws

    @staticmethod
    def _receive_message(ws: websocket.WebSocket):
        opcode, data = ws.recv_data()
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            raise ConnectionError("relay closed the connection during registration")
        return p.decode(data, sender="relay")

    def _serve(self, ws: websocket.WebSocket) -> str:
        """Read until the connection ends; returns why it ended."""
        self._ws = ws
        self._last_received = time.monotonic()
        self.state = "connected"
        self.next_attempt_at = None
        self.last_error = None
        self._ever_registered = True
        self.relays.registered_at(self.url)
        self._takeover = True  # the ID is ours again: an ordinary reconnect may replace a stale connection
        if self.on_registered is not None and self.register_reply is not None:
            self.on_registered(self.register_reply)  # before registered: what it learns holds for every flow
        self.registered.set()
        log.info("registered with relay %s as %s", self.url, self.client_id)
        if self._stopping.is_set():  # stop() raced with the connect
            ws.abort()
        ended = "lost"
        try:
            while True:
                try:
                    opcode, data = ws.recv_data()
                except (websocket.WebSocketException, OSError, AttributeError):
                    return ended
                if opcode == websocket.ABNF.OPCODE_CLOSE:
                    return ended
                self._last_received = time.monotonic()
                if opcode not in (websocket.ABNF.OPCODE_TEXT, websocket.ABNF.OPCODE_BINARY):
                    continue
                try:
                    msg = p.decode(data, sender="relay")
                except p.ProtocolError as exc:
                    log.warning("ignoring a bad message from the relay: %s", exc)
                    continue
                if isinstance(msg, p.Error) and msg.code == "replaced":
                    self.last_error = msg.message
                    ended = "replaced"
                    continue
                self._dispatch(msg)
        finally:
            self.registered.clear()
            self._ws = None
            ws.shutdown()
            self._requests.fail_all()

    def _dispatch(self, msg) -> None:
        if self._requests.answer(msg):
            return
        if isinstance(msg, p.Heartbeat):
            return
        try:
            self.on_message(msg)
        except Exception:
            log.exception("handling %s from the relay failed", msg.TYPE)

    # --- sending ----------------------------------------------------------------------------

    def send(self, msg) -> None:
        ws = self._ws
        if ws is None or not self.registered.is_set():
            raise NotConnectedError(f"not connected to the relay at {self.url} ({self.last_error or self.state})")
        try:
            ws.send(p.encode(msg))
        except (websocket.WebSocketException, OSError) as exc:
            ws.abort()
            raise NotConnectedError(f"lost the relay at {self.url}: {_describe(exc)}") from None

    def request(self, msg, timeout: float):
        """Send a message carrying a fresh requestId and wait for the reply that echoes it.

        An ``error`` reply raises RequestError with the relay's message.
        """
        return self.start_request(msg).wait(timeout)

    def start_request(self, msg, on_reply=None) -> PendingRequest:
        """Send a message carrying a fresh requestId and return at once; ``wait()`` on the result."""
        pending = self._requests.add(msg, on_reply)
        try:
            self.send(pending.msg)
        except BaseException:
            pending.cancel()
            raise
        return pending

    # --- heartbeat --------------------------------------------------------------------------

    def _heartbeat_loop(self) -> None:
        while not self._stopping.wait(self.heartbeat_interval):
            if self._on_tick is not None:
                self._on_tick()
            if not self.registered.is_set():
                continue
            if time.monotonic() - self._last_received > self.heartbeat_timeout:
                log.warning("relay silent for %g s; reconnecting", self.heartbeat_timeout)
                self._abort()
                continue
            try:
                self.send(p.Heartbeat(timestamp=time.time()))
            except NotConnectedError:
                pass


def _describe(exc: BaseException) -> str:
    """One sentence that names what went wrong and, where it can, the fix. Only a refusal the
    relay sent is worded as the relay refusing; a certificate this client cannot trust is not."""
    text = str(exc) or type(exc).__name__
    if isinstance(exc, RegistrationRefused):
        return f"the relay refused registration: {text}"
    if isinstance(exc, tls.TlsError):
        return f"cannot trust the relay: {text}"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (f"cannot trust the relay: its TLS certificate is not trusted ({exc.verify_message}); for a "
                f"private CA pass "
                f"--ca FILE, or pin the certificate with --tls-fingerprint SHA256")
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (is the relay running on that host and port?)"
    return text
