"""``start`` when an instance is already running (issue 10 item 11): the running worker records
the options it really uses; a new ``start`` compares the options the user gave with those and
either says "already running" (all equal) or names each option that was not applied and how to
apply it. Each program says what its options are.

Options are kept as ``{"--flag": canonical value}``: the same canonical form on both sides, so
``22, 3000-3999`` equals ``22,3000-3999`` and a relative ``--ca`` equals its absolute path.
Secrets (``--token``) are compared by fingerprint and never shown.

This is application shell rather than wire format; it lives in ``common`` because both programs'
``start`` commands use it and the layout has no other shared package.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from . import service
from .errors import ChuantouError

SECRET_OPTIONS = frozenset({"--token"})


class OptionsNotApplied(ChuantouError):
    """``start`` was given options that the running instance does not use."""


def differences(given: dict, running: dict) -> list[str]:
    """The flags in ``given`` whose value is not the running instance's, in ``given``'s order."""
    return [flag for flag, value in given.items() if running.get(flag) != value]


def describe_difference(flag: str, given, running, default: str = "the default") -> str:
    """One line such as ``--allow 22 (running: every port)``; never a secret's value."""
    if flag in SECRET_OPTIONS:
        return f"{flag} (running with {'another' if running else 'no'} {flag.lstrip('-')})"
    return f"{flag} {_show(given)} (running: {_show(running, default)})"


def _show(value, default: str = "the default") -> str:
    if value is None:
        return default
    if value is True:
        return "on"
    if value is False:
        return "off"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return ",".join(map(str, value)) or "none"
    return str(value)


def check_start_options(given: dict, running: dict | None, running_line: str, apply_hint: str,
                        defaults: dict | None = None) -> str:
    """The line to print when the running instance already uses ``given``; otherwise
    OptionsNotApplied naming each option that was not applied and ``apply_hint``.

    ``defaults`` says in words what an unset option means (``{"--allow": "every port"}``).
    ``running`` is None when the running worker did not record its options (an older version):
    then any option given counts as not applied, since nothing says it is in effect."""
    if not given:
        return running_line
    if running is None:
        raise OptionsNotApplied(f"{running_line}; it predates option checks, so these options were not applied: "
                                f"{' '.join(given)}\n{apply_hint}")
    changed = differences(given, running)
    if not changed:
        return f"{running_line}, already with these options"
    defaults = defaults or {}
    lines = [describe_difference(flag, given[flag], running.get(flag), defaults.get(flag, "the default"))
             for flag in changed]
    listing = "\n  ".join(lines)
    raise OptionsNotApplied(f"{running_line} with other options; not applied (nothing was saved):\n  {listing}\n"
                            f"{apply_hint}")


def refuse_if_running(svc, module: str, config: str | None, command: str, given: dict, describe_running,
                      defaults: dict) -> str | None:
    """None if no instance runs with these files; else the "already running" line when it uses
    every option ``given``, or OptionsNotApplied naming those it does not use and how to apply
    them. ``describe_running(pid, worker)`` words the running instance."""
    worker = service.running_worker(svc)
    if worker is None:
        return None
    pid = service.already_running(svc)
    config_option = f" --config {config}" if config else ""
    hint = f"to apply them: python -m {module} stop{config_option}, then run this {command} again"
    return check_start_options(given, worker.get("options"), describe_running(pid, worker), hint, defaults)


@contextlib.contextmanager
def config_restored_on_failure(path: Path):
    """Put ``path`` back as it was if the block fails: options that did not start are not saved."""
    try:
        before = path.read_bytes()
    except FileNotFoundError:
        before = None
    try:
        yield
    except BaseException:
        if before is None:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        else:
            _write_back(path, before)
        raise


def _write_back(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.restore")
    tmp.write_bytes(data)
    tmp.chmod(0o600)
    tmp.replace(path)
