"""The log file of a background client or relay, rotated by size while it runs.

The supervisor copies its worker's output (log lines, and a traceback if it crashes) into
``<name>.log``; past ``max_bytes`` that file becomes ``<name>.log.1``, the older ones move up
to ``.log.<backups>`` and the oldest is dropped, so a relay that runs for months keeps a
bounded, recent log.

This is application shell rather than wire format; it lives in ``common`` because both programs'
supervisors write their logs through it and the layout has no other shared package.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

LOG_ROTATE_BYTES = 10 * 1024 * 1024
LOG_BACKUPS = 5


class RotatingLog:
    def __init__(self, path: Path, max_bytes: int = LOG_ROTATE_BYTES, backups: int = LOG_BACKUPS):
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.backups = backups
        self._lock = threading.Lock()
        self._file = open(self.path, "ab")
        self._size = self._file.tell()

    def __enter__(self) -> "RotatingLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def write(self, data: bytes) -> None:
        """Append ``data`` (whole lines), rotating first if it would pass the size limit."""
        with self._lock:
            if self._size and self._size + len(data) > self.max_bytes:
                self._rotate()
            self._file.write(data)
            self._file.flush()
            self._size += len(data)

    def write_line(self, text: str) -> None:
        self.write(text.rstrip("\n").encode("utf-8", "replace") + b"\n")

    def copy_from(self, stream) -> None:
        """Copy a binary stream line by line until it ends (a worker's stdout)."""
        for line in iter(stream.readline, b""):
            self.write(line if line.endswith(b"\n") else line + b"\n")

    def close(self) -> None:
        with self._lock:
            self._file.close()

    def _rotate(self) -> None:
        self._file.close()
        rotate_files(self.path, self.backups)
        self._file = open(self.path, "ab")
        self._size = 0


def rotate_files(path: Path, backups: int = LOG_BACKUPS) -> None:
    """``log`` -> ``log.1`` -> ... -> ``log.<backups>`` (dropped after that)."""
    for index in range(backups - 1, 0, -1):
        older = path.with_name(f"{path.name}.{index}")
        if older.exists():
            os.replace(older, path.with_name(f"{path.name}.{index + 1}"))
    if path.exists():
        os.replace(path, path.with_name(f"{path.name}.1"))


def rotate_if_larger(path: Path, max_bytes: int = LOG_ROTATE_BYTES, backups: int = LOG_BACKUPS) -> None:
    try:
        if path.stat().st_size > max_bytes:
            rotate_files(path, backups)
    except OSError:
        pass
