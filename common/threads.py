"""Named, tracked threads that a stop() can join."""

from __future__ import annotations

import logging
import sys
import threading
import queue
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


IDLE_LINGER = 2.0  # seconds a thread whose task ended waits for the next one before it exits
MAX_IDLE = 16  # threads per group kept waiting for work; the rest exit when their task ends


class Task:
    """One named piece of work that ``ThreadGroup.spawn`` started: joined like a thread."""

    __slots__ = ("name", "_done")

    def __init__(self, name: str):
        self.name = name
        self._done = threading.Event()

    def join(self, timeout: float | None = None) -> None:
        self._done.wait(timeout)

    def is_alive(self) -> bool:
        return not self._done.is_set()


class _Worker(threading.Thread):
    """A thread of a group that runs one task after another, parked in between.

    Starting a thread costs ~120 µs of CPU here (clone, a fresh stack, its first GIL
    acquisition) and the starter waits for it; handing a task to a parked thread ~30 µs.
    A session's set-up starts several threads in each process, on the first bytes' way."""

    def __init__(self, group: "ThreadGroup", task: Task, work):
        super().__init__(name=task.name, daemon=True)
        self.group = group
        self.task = task
        self._work = work
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()

    def run(self) -> None:
        group = self.group
        while True:
            task, (target, args) = self.task, self._work
            try:
                target(*args)
            except Exception:
                log.exception("thread %s failed", task.name)
            finally:
                parked = group._park(self)  # parked before the task counts as done: join_all sees it
                group._forget(task)
                task._done.set()
            if not parked or not self._next_task():
                return

    def _next_task(self) -> bool:
        """Wait for the next task; False: exit (lingered too long, or told to)."""
        group = self.group
        try:
            handed = self.inbox.get(timeout=IDLE_LINGER)
        except queue.Empty:
            try:
                group._idle.remove(self)  # atomic under the GIL: nobody can hand us work now
                return False
            except ValueError:  # a spawn took us off the list just now: its task is on its way
                handed = self.inbox.get(timeout=5.0)
        if handed is None:
            return False
        self.task, self._work = handed
        return True


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
        self._threads: set = set()  # running Tasks, and adopted threads
        self._idle: list[_Worker] = []  # parked threads, the latest last

    def spawn(self, name: str, target, *args) -> Task:
        """Run ``target(*args)`` on a thread named ``<prefix>-<name>``: a parked thread of this
        group if one waits, else a new one (RuntimeError: the process cannot start one)."""
        task = Task(f"{self.prefix}-{name}")
        self._threads.add(task)
        work = (target, args)
        while True:
            try:
                worker = self._idle.pop()  # atomic under the GIL
            except IndexError:
                break
            worker.name = task.name
            worker.inbox.put((task, work))
            return task
        try:
            _Worker(self, task, work).start()
        except BaseException:
            self._forget(task)
            raise
        return task

    def adopt(self, thread: threading.Thread) -> None:
        """Track a thread started elsewhere (a library's reader thread) so join_all waits for it."""
        self._threads.add(thread)

    def _park(self, worker: _Worker) -> bool:
        if len(self._idle) >= MAX_IDLE:
            return False
        worker.name = f"{self.prefix}-idle"
        self._idle.append(worker)
        return True

    def _forget(self, task) -> None:
        self._threads.discard(task)

    def _release_idle(self, deadline: float) -> None:
        """Tell every parked thread to exit, and join them."""
        leaving = []
        while True:
            try:
                worker = self._idle.pop()
            except IndexError:
                break
            worker.inbox.put(None)
            leaving.append(worker)
        for worker in leaving:
            worker.join(max(0.0, deadline - time.monotonic()))

    def __len__(self) -> int:
        return len(self._threads)

    def join_all(self, timeout: float = 5.0) -> list[str]:
        """Join every tracked thread (except the caller) under one overall deadline; return the
        names still alive. Each pass joins a snapshot in order (O(N)); threads adopted while it
        ran are picked up by the next pass."""
        deadline = time.monotonic() + timeout
        current = threading.current_thread()
        me = current.task if isinstance(current, _Worker) else current
        joined: set = set()
        while True:
            threads = list(self._threads)  # a snapshot: atomic under the GIL, no lock needed
            for thread in threads:
                if not thread.is_alive():
                    self._threads.discard(thread)
            pending = [t for t in threads if t is not me and t not in joined and t.is_alive()]
            if not pending:
                self._release_idle(deadline)
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
