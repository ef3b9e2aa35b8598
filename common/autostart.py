"""Start at boot: a systemd user unit where a user session of systemd runs, else an @reboot
line in the user's crontab; each runs ``python -m <module> start`` with the saved options.

This is application shell rather than wire format; it lives in ``common`` because both programs
install themselves the same way and the layout has no other shared package.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from . import config
from .service import ServiceFiles, remove


def unit_name(files: ServiceFiles) -> str:
    return f"chuantou-{files.name}.service"


def systemd_unit_text(files: ServiceFiles, module: str, args: list[str]) -> str:
    command = shlex.join([sys.executable, "-m", module, "start", *args])
    return (
        "[Unit]\n"
        f"Description=chuantou {files.name} (started at boot)\n"
        "After=network-online.target\n\n"
        "[Service]\n"
        "Type=forking\n"
        f"PIDFile={files.pid_file}\n"
        f"ExecStart={command}\n"
        "TimeoutStopSec=30\n\n"
        "[Install]\n"
        "WantedBy=default.target\n"
    )


def crontab_line(files: ServiceFiles, module: str, args: list[str]) -> str:
    command = shlex.join([sys.executable, "-m", module, "start", *args]).replace("%", "\\%")  # cron: % is newline
    return f"@reboot {command}  # chuantou-{files.name}\n"


def systemd_user_available() -> bool:
    if not shutil.which("systemctl"):
        return False
    try:
        result = subprocess.run(["systemctl", "--user", "is-system-running"], capture_output=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.stdout.strip() in (b"running", b"degraded", b"starting")


def systemd_unit_path(files: ServiceFiles) -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "systemd" / "user" / unit_name(files)


def install_autostart(files: ServiceFiles, module: str, args: list[str]) -> str:
    """Make the service start at boot; return a sentence saying how. Raises ConfigError if unsupported."""
    if systemd_user_available():
        path = systemd_unit_path(files)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(systemd_unit_text(files, module, args))
        subprocess.run(["systemctl", "--user", "daemon-reload"], check=False, timeout=15)
        subprocess.run(["systemctl", "--user", "enable", unit_name(files)], check=False, timeout=15,
                       capture_output=True)
        return (f"autostart: systemd user unit {path} enabled; to start it at boot without logging in, "
                f"run: loginctl enable-linger {os.environ.get('USER', '$USER')}")
    if shutil.which("crontab"):
        line = crontab_line(files, module, args)
        current = _read_crontab()
        kept = [l for l in current.splitlines(keepends=True) if not l.rstrip().endswith(f"# chuantou-{files.name}")]
        _write_crontab("".join(kept) + line)
        return f"autostart: added to your crontab: {line.strip()}"
    raise config.ConfigError(
        "autostart is not supported here: no systemd user session and no crontab; "
        f"start it from your init system with: {sys.executable} -m {module} start"
    )


def remove_autostart(files: ServiceFiles) -> str | None:
    """Undo install_autostart; return what was removed, or None."""
    removed = None
    path = systemd_unit_path(files)
    if path.exists():
        if shutil.which("systemctl"):
            subprocess.run(["systemctl", "--user", "disable", unit_name(files)], check=False, timeout=15,
                           capture_output=True)
        remove(path)
        removed = f"removed systemd user unit {path}"
    if shutil.which("crontab"):
        current = _read_crontab()
        marker = f"# chuantou-{files.name}"
        if marker in current:
            kept = [l for l in current.splitlines(keepends=True) if not l.rstrip().endswith(marker)]
            _write_crontab("".join(kept))
            removed = "removed the @reboot line from your crontab"
    return removed


def _read_crontab() -> str:
    result = subprocess.run(["crontab", "-l"], capture_output=True, text=True, timeout=15)
    return result.stdout if result.returncode == 0 else ""


def _write_crontab(text: str) -> None:
    subprocess.run(["crontab", "-"], input=text, text=True, check=True, timeout=15)
