"""Traffic history for the admin pages: byte totals sampled once a second into a ring buffer.

The sampler reads counters the byte pumps already keep; it adds no work to the pumps.

This is application shell rather than wire format; it lives in ``common`` because both programs'
pages use it and the layout has no other shared package.
"""

from __future__ import annotations

import threading
import time
from collections import deque

SAMPLE_INTERVAL = 1.0
HISTORY_SAMPLES = 300  # five minutes at one sample a second


class RateHistory:
    """Rates (bytes/s) of one or more monotonic byte totals, one sample per ``sample()`` call.

    ``read_totals()`` returns a tuple of totals; a total that goes down (a counter that was
    dropped) counts as no traffic rather than a negative rate.
    """

    def __init__(self, read_totals, keep: int = HISTORY_SAMPLES):
        self._read_totals = read_totals
        self._lock = threading.Lock()
        self._samples: deque[tuple] = deque(maxlen=keep)
        self._last: tuple[float, tuple] | None = None

    def sample(self) -> None:
        now = time.monotonic()
        totals = tuple(self._read_totals())
        with self._lock:
            if self._last is not None and now > self._last[0]:
                elapsed = now - self._last[0]
                rates = tuple(max(0.0, (new - old) / elapsed) for new, old in zip(totals, self._last[1]))
                self._samples.append((round(time.time(), 3), *rates))
            self._last = (now, totals)

    def run(self, stopping: threading.Event, interval: float = SAMPLE_INTERVAL) -> None:
        """Sample every ``interval`` seconds until ``stopping`` is set."""
        self.sample()
        while not stopping.wait(interval):
            self.sample()

    def history(self) -> list[list[float]]:
        """[[unix time, rate, ...], ...], oldest first."""
        with self._lock:
            return [list(s) for s in self._samples]

    def current(self) -> tuple:
        """The latest rates, or zeros before the second sample."""
        with self._lock:
            if self._samples:
                return self._samples[-1][1:]
            width = len(self._last[1]) if self._last else 1
        return (0.0,) * width
