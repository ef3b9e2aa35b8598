"""Where a background server or client keeps its state, and what it says about itself: the pid and
state files, the running worker's record, and whether an instance is running.

Layout under the platformdirs state directory, for ``name`` = "server" or "client"::

    <name>.pid          the supervisor's pid (present while it runs)
    <name>.supervisor.json   supervisor facts: pid, worker pid, restarts, started
    <name>.worker.json  written by the running worker: pid, ports, started (also in foreground)

and the log in the platformdirs log directory as ``<name>.log``. The supervisor that writes
most of these is in supervisor.py, start-at-boot in autostart.py, the commands that read them
in cli_shell.py.

This is application shell rather than wire format; it lives in ``common`` because both programs
run as services the same way and the layout has no other shared package.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from . import config


@dataclass(frozen=True)
class ServiceFiles:
    name: str
    state_dir: Path
    log_dir: Path

    @classmethod
    def for_role(cls, name: str, config_path: str | None = None) -> "ServiceFiles":
        """Files of the instance that uses ``config_path``; the default config's is just ``name``.

        So two clients with different config files can run side by side on one machine.
        """
        if config_path:
            resolved = str(Path(config_path).resolve())
            digest = hashlib.sha256(resolved.encode()).hexdigest()[:8]
            name = f"{name}-{Path(resolved).stem}-{digest}"
        return cls(name, config.state_dir(), config.log_dir())

    @property
    def pid_file(self) -> Path:
        return self.state_dir / f"{self.name}.pid"

    @property
    def supervisor_file(self) -> Path:
        return self.state_dir / f"{self.name}.supervisor.json"

    @property
    def worker_file(self) -> Path:
        return self.state_dir / f"{self.name}.worker.json"

    @property
    def log_file(self) -> Path:
        return self.log_dir / f"{self.name}.log"


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{days}d"] if days else []
    if days or hours:
        parts.append(f"{hours}h")
    if days or hours or minutes:
        parts.append(f"{minutes}m")
    parts.append(f"{secs}s")
    return " ".join(parts)


def files_for_worker(name: str, worker_args: list[str]) -> ServiceFiles:
    """The files of the instance a supervisor runs, from its worker's --config option."""
    path = worker_args[worker_args.index("--config") + 1] if "--config" in worker_args[:-1] else None
    return ServiceFiles.for_role(name, path)


# --- small file helpers ---------------------------------------------------------------------

def read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_json(path: Path, data: dict) -> None:
    config.save(path, data)


def remove(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def pid_alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is not running
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def supervisor_pid(files: ServiceFiles) -> int | None:
    try:
        pid = int(files.pid_file.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if pid_alive(pid) else None


def running_worker(files: ServiceFiles) -> dict | None:
    """The worker's facts if a worker (supervised or foreground) is running."""
    info = read_json(files.worker_file)
    if info and pid_alive(info.get("pid")):
        return info
    return None


# --- the worker side ------------------------------------------------------------------------

class WorkerRecord:
    """Context manager the foreground program uses to announce itself in the state dir."""

    def __init__(self, files: ServiceFiles, facts: dict):
        self.files = files
        self.facts = {"pid": os.getpid(), "startedAt": time.time(), **facts}

    def __enter__(self) -> "WorkerRecord":
        write_json(self.files.worker_file, self.facts)
        return self

    def __exit__(self, *exc) -> None:
        info = read_json(self.files.worker_file)
        if info and info.get("pid") == os.getpid():
            remove(self.files.worker_file)


def already_running(files: ServiceFiles) -> int | None:
    """The pid to report if an instance runs: its supervisor's, else the foreground worker's."""
    worker = running_worker(files)
    if worker is None:
        return None
    return supervisor_pid(files) or worker["pid"]
