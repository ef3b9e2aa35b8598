"""common.memtrim: when the live-session count falls far enough, freed memory is given back."""

from __future__ import annotations

import time

from common import memtrim


def test_a_trim_each_time_the_live_count_halves_from_a_large_enough_peak():
    trimmer = memtrim.Trimmer(min_peak=64)
    for live in range(1, 1001):
        trimmer.opened(live)
    trims = [live for live in range(999, -1, -1) if trimmer.note(live)]
    assert trims == [500, 250, 125, 62]  # then the peak (62) is below the minimum: nothing left worth it
    assert trimmer.trims == 4


def test_no_trim_below_the_minimum_peak_or_in_steady_traffic():
    small = memtrim.Trimmer(min_peak=64)
    for live in range(1, 40):
        small.opened(live)
    assert not any(small.note(live) for live in range(38, -1, -1))
    steady = memtrim.Trimmer(min_peak=64)
    for _ in range(1000):  # sessions come and go around 100
        steady.opened(101)
        assert not steady.note(100)
    assert steady.trims == 0


def test_the_owed_trim_comes_on_a_tick_once_the_ended_sessions_have_unwound(monkeypatch):
    trimmer = memtrim.Trimmer(min_peak=64)
    trimmer.opened(100)
    assert trimmer.note(50)
    assert not trimmer.tick(), "too soon after the drop"
    now = time.monotonic()
    monkeypatch.setattr(memtrim.time, "monotonic", lambda: now + memtrim.SETTLE + 0.1)
    assert trimmer.tick()
    assert not trimmer.tick(), "owed once, not on every tick"
