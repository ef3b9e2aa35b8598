"""The control channel's requests in flight: each gets a fresh ``requestId``, and the relay's
reply that echoes it wakes the one waiter for it. No I/O: control.py sends the request and
hands every message it reads to ``RequestTable.answer`` first.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import threading

from common import protocol as p
from common.errors import NotConnectedError, RequestError

log = logging.getLogger("chuantou.client")


class PendingRequest:
    """A request sent and not answered yet: ``wait()`` for the reply. ``on_reply(reply)``, if
    given, runs on the reader thread the moment the reply arrives, before the waiter wakes (it
    must not block: it sends a data channel's join header, say, without a thread hand-off)."""

    def __init__(self, table: "RequestTable", request_id: str, msg, on_reply=None):
        self.table = table
        self.request_id = request_id
        self.msg = msg
        self.on_reply = on_reply
        self.event = threading.Event()
        self.reply = None

    def wait(self, timeout: float):
        """The reply; RequestError for an ``error`` reply (or none within ``timeout``)."""
        try:
            if not self.event.wait(timeout):
                raise RequestError(f"the relay did not answer {self.msg.TYPE} within {timeout:g} s", "timeout")
        finally:
            self.table.forget(self.request_id)
        reply = self.reply
        if reply is None:
            raise NotConnectedError("the connection to the relay was lost before it answered")
        if isinstance(reply, p.Error):
            raise RequestError(reply.message, reply.code)
        return reply

    def cancel(self) -> None:
        self.table.forget(self.request_id)

    def abandon(self) -> None:
        """Cancel, and wake a thread waiting for the reply (its wait raises NotConnectedError)."""
        self.cancel()
        self.event.set()


class RequestTable:
    """The waiters by requestId; every method is safe from any thread."""

    def __init__(self):
        self._ids = itertools.count(1)
        self._pending: dict[str, PendingRequest] = {}
        self._lock = threading.Lock()

    def add(self, msg, on_reply=None) -> PendingRequest:
        """A waiter for ``msg`` with a fresh requestId; send ``pending.msg``, which carries it."""
        request_id = f"r{next(self._ids)}"
        pending = PendingRequest(self, request_id, dataclasses.replace(msg, requestId=request_id), on_reply)
        with self._lock:
            self._pending[request_id] = pending
        return pending

    def forget(self, request_id: str) -> None:
        with self._lock:
            self._pending.pop(request_id, None)

    def answer(self, msg) -> bool:
        """Hand ``msg`` to the waiter whose requestId it echoes; False if none waits for it."""
        request_id = getattr(msg, "requestId", None)
        if request_id is None:
            return False
        with self._lock:
            waiter = self._pending.pop(request_id, None)
        if waiter is None:
            return False
        waiter.reply = msg
        if waiter.on_reply is not None:
            try:
                waiter.on_reply(msg)
            except Exception:
                log.exception("handling the answer to %s failed", waiter.msg.TYPE)
        waiter.event.set()
        return True

    def fail_all(self) -> None:
        """The connection is gone: wake every waiter with no reply (each fails with NotConnectedError)."""
        with self._lock:
            waiters = list(self._pending.values())
            self._pending.clear()
        for waiter in waiters:
            waiter.event.set()
