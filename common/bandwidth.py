"""Bandwidth figures as people write them: ``10MiB/s``, ``512 KiB``, ``2000000`` (bytes per second).

Bytes only, with binary units (B, KiB, MiB, GiB; the "/s" is optional): a limit in bits or in
decimal units is a different number that looks the same, so those are refused rather than
guessed. 0 means no limit. Plain data, no I/O: the client's proxies and the relay's settings
both parse through here.
"""

from __future__ import annotations

import re

from .errors import ChuantouError

UNITS = {"": 1, "b": 1, "kib": 1024, "mib": 1024 ** 2, "gib": 1024 ** 3}
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*(?:/\s*s)?\s*$")
MAX_RATE = 1024 ** 4  # 1 TiB/s: anything above is a typo, not a limit
EXPECTED = "bytes per second: a whole number, or with a unit like 10MiB/s, 512KiB/s, 1GiB/s (0: no limit)"


def parse_bandwidth(value) -> int:
    """Bytes per second from ``value`` (an int, or text such as "10MiB/s"); ChuantouError if it is not one."""
    if isinstance(value, bool):
        raise ChuantouError(f"bandwidth {value!r} is not {EXPECTED}")
    if isinstance(value, int):
        rate = value
    elif isinstance(value, str):
        match = _PATTERN.match(value)
        unit = match.group(2).lower() if match else None
        if match is None or unit not in UNITS:
            raise ChuantouError(f"bandwidth {value!r} is not {EXPECTED}")
        rate = int(float(match.group(1)) * UNITS[unit])
    else:
        raise ChuantouError(f"bandwidth {value!r} is not {EXPECTED}")
    if not 0 <= rate <= MAX_RATE:
        raise ChuantouError(f"bandwidth {value!r} is out of range (0 to 1 TiB/s)")
    return rate


def is_bandwidth(value) -> bool:
    try:
        parse_bandwidth(value)
    except ChuantouError:
        return False
    return True


def format_bandwidth(rate: int | None) -> str:
    """``10MiB/s`` for 10485760 (as it is written to ``--bandwidth``); "unlimited" for 0 or None."""
    if not rate:
        return "unlimited"
    for unit, size in (("GiB", 1024 ** 3), ("MiB", 1024 ** 2), ("KiB", 1024)):
        if rate >= size:
            return f"{rate / size:.3g}{unit}/s"
    return f"{rate}B/s"
