"""Saved configuration: where it lives, how it is validated, how it is written.

A config file is a JSON object. Each program declares its keys as ``Key`` entries (type,
check, default) in one place; loading rejects unknown keys and bad values with the file,
the key and what was expected (never the value of a secret key). Files are written atomically with mode 0600, since they may
hold secrets.

It is application shell rather than wire format, and lives in ``common`` because both programs
read and write their config files through it and the layout has no other shared package.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import platformdirs

from .errors import ChuantouError

APP = "chuantou"


class ConfigError(ChuantouError):
    pass


def config_dir() -> Path:
    return Path(platformdirs.user_config_dir(APP))


def state_dir() -> Path:
    return Path(platformdirs.user_state_dir(APP))


def log_dir() -> Path:
    return Path(platformdirs.user_log_dir(APP))


@dataclass(frozen=True)
class Key:
    kind: type | tuple  # accepted JSON type(s)
    expected: str  # what a user should write, for error messages
    default: Any = None
    check: Callable[[Any], bool] | None = None
    required: bool = False
    secret: bool = False  # a token or password: never printed, not even in an error


LOG_LEVELS = ("debug", "info", "warning", "error")  # --log-level and "logLevel" of both programs
LOG_LEVEL = Key(str, f"one of {', '.join(LOG_LEVELS)}", "info", lambda v: v in LOG_LEVELS)


def shown(value, key: Key) -> str:
    """How a value may appear in a message: secrets never do."""
    return "the value given (hidden: it is a secret)" if key.secret else json.dumps(value)[:60]


def redacted(settings: dict, keys: dict[str, Key]) -> dict:
    """``settings`` fit for printing: every secret key that is set reads "(hidden)"."""
    return {name: "(hidden)" if keys.get(name, Key(object, "")).secret and value else value
            for name, value in settings.items()}


def is_port(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 65535


def is_positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def validate(data: Any, keys: dict[str, Key], where: str) -> dict:
    """Check a parsed JSON object against ``keys``; return it with defaults filled in
    (ConfigError naming the first problem)."""
    out, found = checked(data, keys, where)
    if found:
        raise ConfigError(found[0])
    return out


def checked(data: Any, keys: dict[str, Key], where: str) -> tuple[dict, list[str]]:
    """``data`` with defaults filled in (bad values left out), and every problem found, each
    naming ``where`` and the key: what check-config lists, and validate() raises the first of."""
    if not isinstance(data, dict):
        return {}, [f"{where}: expected a JSON object with keys {', '.join(keys)}"]
    found = [f"{where}: unknown key '{name}' (known keys: {', '.join(keys)})" for name in sorted(set(data) - set(keys))]
    out = {}
    for name, key in keys.items():
        if name not in data or data[name] is None:
            if key.required:
                found.append(f"{where}: missing key '{name}' ({key.expected})")
            out[name] = key.default() if callable(key.default) else key.default
            continue
        value = data[name]
        kinds = key.kind if isinstance(key.kind, tuple) else (key.kind,)
        ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
        if ok and key.check is not None:
            ok = key.check(value)
        if not ok:
            found.append(f"{where}: key '{name}' must be {key.expected}, not {shown(value, key)}")
            continue
        out[name] = value
    return out, found


def read_json(path: Path) -> tuple[Any, str | None]:
    """(the parsed file, None), or (None, why it cannot be read or parsed); a missing file reads as {}."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}, None
    except OSError as exc:
        return None, f"cannot read config file {path}: {exc.strerror or exc}"
    try:
        return json.loads(text), None
    except ValueError as exc:
        return None, f"{path}: not valid JSON ({exc}); fix or delete the file"


def load(path: Path, keys: dict[str, Key]) -> dict:
    """Read and validate ``path``; a missing file gives the defaults."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return validate({}, keys, str(path))
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc}); fix or delete the file") from None
    return validate(data, keys, str(path))


def _owner_to_keep(path: Path) -> tuple[int, int] | None:
    """(uid, gid) of the file being replaced when root replaces another user's file, else None."""
    if os.geteuid() != 0:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_uid, st.st_gid) if st.st_uid != 0 else None


def save(path: Path, data: dict) -> None:
    """Write ``data`` as indented JSON, atomically, readable only by the owner."""
    write_private(path, (json.dumps(data, indent=2, sort_keys=False) + "\n").encode("utf-8"))


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` atomically (a temporary file, then a rename) with mode 0600 from the start,
    for every file that holds a secret: configs, keys, the API secret, pins.

    The file keeps its owner: root editing a system service's files (``token add``) must not
    leave them unreadable to the service's user."""
    path.parent.mkdir(parents=True, exist_ok=True)
    owner = _owner_to_keep(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # mkstemp: 0600 already
    try:
        os.fchmod(fd, 0o600)
        if owner:
            os.fchown(fd, *owner)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
