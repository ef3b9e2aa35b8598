"""Give memory back to the system after many sessions have ended.

glibc keeps what a process freed in its heaps for reuse, so after a burst of thousands of
sessions a relay or client would sit at its peak RSS for the rest of its life. ``Trimmer``
watches the count of live sessions and, each time it has fallen to half of its peak since the
last trim (from at least ``MIN_PEAK``), calls glibc's ``malloc_trim(0)``: a mass close of 9,000
sessions costs about a dozen trims of a few milliseconds each, steady traffic none. A session's
memory is freed a little after it leaves the books (its threads unwind), so the owner's periodic
``tick()`` trims once more when SETTLE seconds have passed since the last drop. Elsewhere than
glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import threading
import time

MIN_PEAK = 64  # below this many sessions there is little to give back
SETTLE = 1.0


def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


_TRIM = _malloc_trim()


class Trimmer:
    def __init__(self, min_peak: int = MIN_PEAK):
        self._min_peak = min_peak
        self._peak = 0
        self._lock = threading.Lock()
        self._dropped_at = 0.0  # a trim is owed once the sessions that ended have unwound
        self.trims = 0

    def note(self, live: int) -> bool:
        """Called with the count of live sessions after one ended; True if it trimmed."""
        with self._lock:
            if live > self._peak:
                self._peak = live
                return False
            if self._peak < self._min_peak or live > self._peak // 2:
                return False
            self._peak = live
            self._dropped_at = time.monotonic()
        self._trim()
        return True

    def tick(self) -> bool:
        """Called now and then by the owner's housekeeping: the trim owed after a drop; True if it trimmed."""
        with self._lock:
            if not self._dropped_at or time.monotonic() - self._dropped_at < SETTLE:
                return False
            self._dropped_at = 0.0
        self._trim()
        return True

    def _trim(self) -> None:
        self.trims += 1
        if _TRIM is not None:
            _TRIM(0)

    def opened(self, live: int) -> None:
        """Called with the count of live sessions after one began."""
        if live > self._peak:  # unlocked read: a stale peak only delays a trim
            with self._lock:
                self._peak = max(self._peak, live)
