"""Running the server or the client in the background: a supervisor process that restarts
its worker after a crash, pid and state files, the log file, and start-at-boot.

Layout under the platformdirs state directory, for ``name`` = "server" or "client"::

    <name>.pid          the supervisor's pid (present while it runs)
    <name>.supervisor.json   supervisor facts: pid, worker pid, restarts, started
    <name>.worker.json  written by the running worker: pid, ports, started (also in foreground)

and the log in the platformdirs log directory as ``<name>.log``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from . import config
from .logfile import RotatingLog, rotate_if_larger
from .errors import ChuantouError

RESTART_DELAYS = (0.5, 1, 2, 4, 8, 15, 30)
BURST_WINDOW = 60.0  # seconds
BURST_LIMIT = 10  # restarts within the window before the supervisor gives up


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


# --- the supervisor -------------------------------------------------------------------------

def start_background(files: ServiceFiles, module: str, worker_args: list[str], timeout: float = 20.0) -> dict:
    """Start ``python -m module _supervise -- worker_args`` detached; wait until its worker runs.

    Returns the worker facts. Raises config.ConfigError (a ChuantouError) with the worker's
    error, or the log's last lines, if it does not come up: as soon as the first worker has
    exited, since a worker that fails at once (busy port, bad setting) fails again.
    """
    files.log_dir.mkdir(parents=True, exist_ok=True)
    files.state_dir.mkdir(parents=True, exist_ok=True)
    rotate_if_larger(files.log_file)
    remove(files.worker_file)
    with open(files.log_file, "ab") as log:
        log_start = log.tell()
        proc = subprocess.Popen(
            [sys.executable, "-m", module, "_supervise", "--", *worker_args],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, close_fds=True,
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        worker = running_worker(files)
        if worker is not None:
            return worker
        supervisor = read_json(files.supervisor_file)
        if proc.poll() is not None or (supervisor and supervisor.get("pid") == proc.pid and supervisor["restarts"]):
            break
        time.sleep(0.05)  # polling a file another process writes; bounded by the deadline
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
    lines = read_log_tail(files.log_file, 10, start=log_start)
    errors = [line for line in lines if line.startswith("error: ")]
    if errors:
        raise config.ConfigError(f"the {files.name} did not start: {errors[-1][len('error: '):]} "
                                 f"(log: {files.log_file})")
    tail = "\n".join(lines)
    raise config.ConfigError(f"the {files.name} did not start; last lines of {files.log_file}:\n{tail}")


def supervise(files: ServiceFiles, module: str, worker_args: list[str]) -> int:
    """Run the worker, restarting it after a crash, until SIGTERM/SIGINT. Runs in the supervisor."""
    stopping = False
    worker: subprocess.Popen | None = None

    def on_signal(signum, _frame):
        nonlocal stopping
        stopping = True
        if worker is not None and worker.poll() is None:
            worker.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    files.state_dir.mkdir(parents=True, exist_ok=True)
    files.pid_file.write_text(f"{os.getpid()}\n")
    facts = {"pid": os.getpid(), "startedAt": time.time(), "restarts": 0, "workerPid": None, "gaveUp": False}
    recent: list[float] = []
    log = RotatingLog(files.log_file)
    copier: threading.Thread | None = None
    try:
        while not stopping:
            worker = subprocess.Popen([sys.executable, "-m", module, *worker_args], stdin=subprocess.DEVNULL,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            facts["workerPid"] = worker.pid
            write_json(files.supervisor_file, facts)
            copier = threading.Thread(target=log.copy_from, args=(worker.stdout,), name="supervisor-log", daemon=True)
            copier.start()
            code = worker.wait()
            copier.join(5.0)  # the worker's last lines (a traceback) are in the log before a restart
            worker.stdout.close()
            if stopping:
                break
            now = time.monotonic()
            recent = [t for t in recent if now - t < BURST_WINDOW] + [now]
            if len(recent) > BURST_LIMIT:
                log.write_line(f"supervisor: worker failed {len(recent)} times within {BURST_WINDOW:g} s; giving up")
                facts["gaveUp"] = True
                write_json(files.supervisor_file, facts)
                return 1
            delay = RESTART_DELAYS[min(len(recent) - 1, len(RESTART_DELAYS) - 1)]
            log.write_line(f"supervisor: worker exited with {code}; restarting in {delay:g} s")
            facts["restarts"] += 1
            write_json(files.supervisor_file, facts)
            deadline = time.monotonic() + delay
            while not stopping and time.monotonic() < deadline:
                time.sleep(0.05)  # signals set `stopping`; this is a bounded wait, not a sync
        return 0
    finally:
        if worker is not None and worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(15)
            except subprocess.TimeoutExpired:
                worker.kill()
        if copier is not None:
            copier.join(5.0)
        log.close()
        remove(files.pid_file)
        remove(files.supervisor_file)


def stop_background(files: ServiceFiles, timeout: float = 20.0) -> int | None:
    """SIGTERM the supervisor (or a foreground worker); wait for it to end. Returns the pid stopped."""
    pid = supervisor_pid(files)
    if pid is None:
        worker = running_worker(files)
        pid = worker["pid"] if worker else None
    if pid is None:
        remove(files.pid_file)
        return None
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)  # waiting for another process to exit; bounded
    if pid_alive(pid):
        os.kill(pid, signal.SIGKILL)
    remove(files.pid_file)
    return pid


# --- logs -----------------------------------------------------------------------------------

def read_log_tail(path: Path, lines: int, start: int = 0) -> list[str]:
    """The last ``lines`` lines of the log (of what was written after offset ``start``)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(start, size - 256 * 1024))
            data = f.read()
    except OSError:
        return []
    return data.decode("utf-8", "replace").splitlines()[-lines:] if lines > 0 else []


def follow_log(path: Path, out=sys.stdout, stop_after: float | None = None) -> None:
    """Print lines appended to ``path`` until Ctrl-C (or ``stop_after`` seconds, for tests)."""
    started = time.monotonic()
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        while stop_after is None or time.monotonic() - started < stop_after:
            chunk = f.read()
            if chunk:
                out.write(chunk.decode("utf-8", "replace"))
                out.flush()
            else:
                time.sleep(0.2)  # tail -f polls the same way


# --- start at boot --------------------------------------------------------------------------

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


# --- the commands both programs share ---------------------------------------------------------

def role_of(files: ServiceFiles) -> str:
    return files.name.split("-", 1)[0]  # "server" or "client"


def stop_command(files: ServiceFiles, keep_autostart: bool) -> int:
    """``stop``: stop the background instance (or a foreground one) and remove autostart."""
    pid = stop_background(files)
    print(f"chuantou {role_of(files)} stopped (pid {pid})" if pid else f"chuantou {role_of(files)} is not running")
    if not keep_autostart:
        removed = remove_autostart(files)
        if removed:
            print(removed)
    return 0


def logs_command(files: ServiceFiles, lines: int, follow: bool) -> int:
    """``logs [-f] [-n N]``."""
    if not files.log_file.exists():
        print(f"no log yet at {files.log_file} (the log is written by: python -m chuantou_{role_of(files)} start)",
              file=sys.stderr)
        return 1
    for line in read_log_tail(files.log_file, lines):
        print(line)
    if follow:
        try:
            follow_log(files.log_file)
        except KeyboardInterrupt:
            pass
    return 0


def already_running(files: ServiceFiles) -> int | None:
    """The pid to report if an instance runs: its supervisor's, else the foreground worker's."""
    worker = running_worker(files)
    if worker is None:
        return None
    return supervisor_pid(files) or worker["pid"]


def install_autostart_or_warn(files: ServiceFiles, module: str, args: list[str]) -> None:
    try:
        print(install_autostart(files, module, args))
    except config.ConfigError as exc:
        print(f"warning: {exc}", file=sys.stderr)


EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE  # what a shell reports for a program that SIGPIPE ended


def run_command(commands: dict, args) -> int:
    """Run the chosen command; a ChuantouError becomes one line on stderr and exit code 1.

    Output piped into a reader that stops early (``token | head -n 1``) ends the command
    quietly, as SIGPIPE ends other tools, instead of with a traceback."""
    try:
        code = commands[args.command](args)
        sys.stdout.flush()  # here, not at interpreter exit, where a closed pipe prints a traceback
        return code
    except ChuantouError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_BROKEN_PIPE


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush has nowhere to fail."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass
