"""Named, tracked threads that a stop() can join."""

from __future__ import annotations

import logging
import sys
import threading
import time

log = logging.getLogger("chuantou")

STACK_SIZE = 512 * 1024
SWITCH_INTERVAL = 0.05  # seconds; CPython's default is 0.005


def tune_for_many_threads() -> None:
    """Settings for a process that holds thousands of pump threads: the CLIs call it at start;
    a program embedding Server or Client with that many sessions should too.

    - Modest stacks (512 KiB of address space each, instead of 8 MiB).
    - A longer GIL switch interval: every thread waiting for the GIL wakes once per interval to
      ask for it, so when thousands wake at once (a client with 2,000 sessions dies) those
      wake-ups convoy. Tearing down 2,000 sessions cost the relay 35 s of CPU and 51 s at 5 ms,
      4.6 s of CPU and 17 s at 50 ms (bench/bench_teardown.py). A pump thread gives up the GIL
      at every recv and send, so the longer interval delays only CPU-bound Python work.
    """
    threading.stack_size(STACK_SIZE)
    sys.setswitchinterval(SWITCH_INTERVAL)


class ThreadGroup:
    """Starts named threads, remembers the live ones, and joins them all on request.

    Each target runs inside a wrapper that logs an unexpected exception once, with the
    thread's name, so one failing connection never takes anything else down.

    The set of threads takes no lock of our own: ``set.add``/``discard`` and ``list(set)`` are
    atomic under the GIL. A lock here made mass teardown quadratic: thousands of ending threads
    queued on it, and each hand-over of the lock then waited for the GIL behind all the others
    (2,000 sessions took 11 s to close, with 1 s stalls of every other thread).
    """

    def __init__(self, prefix: str):
        self.prefix = prefix
        self._threads: set[threading.Thread] = set()

    def spawn(self, name: str, target, *args) -> threading.Thread:
        thread = threading.Thread(
            target=self._run, args=(target, args), name=f"{self.prefix}-{name}", daemon=True
        )
        self._threads.add(thread)
        try:
            thread.start()
        except BaseException:
            self._forget(thread)
            raise
        return thread

    def adopt(self, thread: threading.Thread) -> None:
        """Track a thread started elsewhere (a library's reader thread) so join_all waits for it."""
        self._threads.add(thread)

    def _run(self, target, args) -> None:
        try:
            target(*args)
        except Exception:
            log.exception("thread %s failed", threading.current_thread().name)
        finally:
            self._forget(threading.current_thread())

    def _forget(self, thread: threading.Thread) -> None:
        self._threads.discard(thread)

    def __len__(self) -> int:
        return len(self._threads)

    def join_all(self, timeout: float = 5.0) -> list[str]:
        """Join every tracked thread (except the caller) under one overall deadline; return the
        names still alive. Each pass joins a snapshot in order (O(N)); threads adopted while it
        ran are picked up by the next pass."""
        deadline = time.monotonic() + timeout
        me = threading.current_thread()
        joined: set[threading.Thread] = set()
        while True:
            threads = list(self._threads)  # a snapshot: atomic under the GIL, no lock needed
            for thread in threads:
                if not thread.is_alive():
                    self._threads.discard(thread)
            pending = [t for t in threads if t is not me and t not in joined and t.is_alive()]
            if not pending:
                return []
            for thread in pending:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                thread.join(remaining)
                if not thread.is_alive():
                    joined.add(thread)
            alive = [t for t in list(self._threads) if t is not me and t.is_alive()]
            if alive and time.monotonic() >= deadline:
                names = [t.name for t in alive]
                log.warning("threads still running after stop: %s", ", ".join(sorted(names)))
                return names
