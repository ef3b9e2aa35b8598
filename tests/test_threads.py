"""ThreadGroup: named tasks on threads that are reused while work keeps coming, and joined by stop."""

from __future__ import annotations

import logging
import threading

import pytest

from common import threads
from common.threads import ThreadGroup
from helpers import wait_until

pytestmark = pytest.mark.timeout(30)


def group_threads(prefix: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(prefix + "-") and t.is_alive()]


def run_and_report(group: ThreadGroup, name: str) -> tuple[int, str]:
    seen: dict = {}

    def work():
        me = threading.current_thread()
        seen["ident"], seen["name"] = me.ident, me.name

    group.spawn(name, work).join(5)
    return seen["ident"], seen["name"]


def test_a_task_after_another_runs_on_the_parked_thread_under_its_own_name():
    group = ThreadGroup("t-reuse")
    first, first_name = run_and_report(group, "one")
    # the first task counts as done once its thread is parked: the next spawn finds it there
    second, second_name = run_and_report(group, "two")
    assert (first_name, second_name) == ("t-reuse-one", "t-reuse-two")
    assert second == first
    assert len(group) == 0, "a parked thread is not a running task"
    assert [t.name for t in group_threads("t-reuse")] == ["t-reuse-idle"]
    assert group.join_all(timeout=5) == []
    assert group_threads("t-reuse") == [], "join_all ends the parked threads too"


def test_a_parked_thread_exits_after_lingering(monkeypatch):
    monkeypatch.setattr(threads, "IDLE_LINGER", 0.2)
    group = ThreadGroup("t-linger")
    run_and_report(group, "one")
    assert group_threads("t-linger")
    wait_until(lambda: not group_threads("t-linger"), timeout=5, message="the idle thread exits by itself")
    ident, _ = run_and_report(group, "two")  # and the group still starts work afterwards
    assert ident is not None
    assert group.join_all(timeout=5) == []


def test_no_more_than_max_idle_threads_stay_parked(monkeypatch):
    monkeypatch.setattr(threads, "MAX_IDLE", 3)
    group = ThreadGroup("t-cap")
    release = threading.Event()
    tasks = [group.spawn(f"w{i}", release.wait, 5) for i in range(8)]
    wait_until(lambda: len(group_threads("t-cap")) == 8)
    release.set()
    for task in tasks:
        task.join(5)
    assert not any(task.is_alive() for task in tasks)
    wait_until(lambda: len(group_threads("t-cap")) == 3, message="the threads past the cap exit")
    assert group.join_all(timeout=5) == []
    assert group_threads("t-cap") == []


def test_a_failing_task_is_logged_and_its_thread_serves_the_next(caplog, monkeypatch):
    # logged to a logger of its own: the suite fails any test whose "chuantou" log shows a crash
    monkeypatch.setattr(threads, "log", logging.getLogger("t-fail"))
    group = ThreadGroup("t-fail")

    def boom():
        raise ValueError("broken task")

    group.spawn("boom", boom).join(5)
    assert any("t-fail-boom failed" in r.getMessage() for r in caplog.records)
    _, name = run_and_report(group, "after")
    assert name == "t-fail-after"
    assert group.join_all(timeout=5) == []


def test_join_all_from_a_task_of_the_group_skips_only_that_task():
    group = ThreadGroup("t-self")
    release = threading.Event()
    other = group.spawn("other", release.wait, 5)
    result: dict = {}

    def stopper():
        release.set()
        result["left"] = group.join_all(timeout=5)

    group.spawn("stopper", stopper).join(10)
    assert result["left"] == []
    assert not other.is_alive()
