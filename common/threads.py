"""Named, tracked threads that a stop() can join."""

from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger("chuantou")


class ThreadGroup:
    """Starts named threads, remembers the live ones, and joins them all on request.

    Each target runs inside a wrapper that logs an unexpected exception once, with the
    thread's name, so one failing connection never takes anything else down.
    """

    def __init__(self, prefix: str):
        self.prefix = prefix
        self._lock = threading.Lock()
        self._threads: set[threading.Thread] = set()

    def spawn(self, name: str, target, *args) -> threading.Thread:
        thread = threading.Thread(
            target=self._run, args=(target, args), name=f"{self.prefix}-{name}", daemon=True
        )
        with self._lock:
            self._threads.add(thread)
        try:
            thread.start()
        except BaseException:
            self._forget(thread)
            raise
        return thread

    def adopt(self, thread: threading.Thread) -> None:
        """Track a thread started elsewhere (a library's reader thread) so join_all waits for it."""
        with self._lock:
            self._threads.add(thread)

    def _run(self, target, args) -> None:
        try:
            target(*args)
        except Exception:
            log.exception("thread %s failed", threading.current_thread().name)
        finally:
            self._forget(threading.current_thread())

    def _forget(self, thread: threading.Thread) -> None:
        with self._lock:
            self._threads.discard(thread)

    def __len__(self) -> int:
        with self._lock:
            return len(self._threads)

    def join_all(self, timeout: float = 5.0) -> list[str]:
        """Join every tracked thread (except the caller) under one overall deadline; return the
        names still alive. Each pass joins a snapshot in order (O(N)); threads adopted while it
        ran are picked up by the next pass."""
        deadline = time.monotonic() + timeout
        me = threading.current_thread()
        joined: set[threading.Thread] = set()
        while True:
            with self._lock:
                pending = [t for t in self._threads if t is not me and t not in joined and t.is_alive()]
            if not pending:
                return []
            for thread in pending:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                thread.join(remaining)
                if not thread.is_alive():
                    joined.add(thread)
            with self._lock:
                self._threads = {t for t in self._threads if t.is_alive()}
                alive = [t for t in self._threads if t is not me]
            if alive and time.monotonic() >= deadline:
                names = [t.name for t in alive]
                log.warning("threads still running after stop: %s", ", ".join(sorted(names)))
                return names
