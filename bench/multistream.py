"""Several streams at once through one path: the aggregate throughput of issue 13's "8 streams"
target, measured with the same upload/download helpers as the one-stream phase."""

from __future__ import annotations

import threading
import time


def parallel_seconds(fn, port: int, nbytes: int, streams: int) -> float:
    """Run ``fn(port, nbytes)`` on ``streams`` connections at once; seconds from the first start
    to the last finish. A stream that fails fails the run (its error is raised here)."""
    errors: list[BaseException] = []
    start = threading.Barrier(streams + 1)

    def one() -> None:
        try:
            start.wait()
            fn(port, nbytes)
        except BaseException as exc:  # reported below, with the others' results discarded
            errors.append(exc)

    threads = [threading.Thread(target=one, name=f"bench-stream-{i}", daemon=True) for i in range(streams)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} of {streams} streams failed: {errors[0]}")
    return elapsed


def aggregate(paths: dict[str, dict], key: str, fn, nbytes: int, streams: int, repeats: int) -> dict:
    """Median aggregate MB/s per path (``paths``: label -> ports), the paths taking turns."""
    samples: dict[str, list[float]] = {label: [] for label in paths}
    for _ in range(repeats):
        for label, ports in paths.items():
            samples[label].append(parallel_seconds(fn, ports[key], nbytes, streams))
    total = nbytes * streams
    return {label: sorted(total / s / 1e6 for s in times)[len(times) // 2] for label, times in samples.items()}
