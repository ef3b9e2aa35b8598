"""Running a server or client in the background: a detached supervisor process that restarts
its worker after a crash and copies the worker's output into the rotating log; starting and
stopping it from a command, and reading that log.

This is application shell rather than wire format; it lives in ``common`` because both programs
are supervised the same way and the layout has no other shared package.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from .errors import ChuantouError
from .logfile import RotatingLog, rotate_if_larger
from .service import ServiceFiles, pid_alive, read_json, remove, running_worker, supervisor_pid, write_json

RESTART_DELAYS = (0.5, 1, 2, 4, 8, 15, 30)
BURST_WINDOW = 60.0  # seconds
BURST_LIMIT = 10  # restarts within the window before the supervisor gives up


def start_background(files: ServiceFiles, module: str, worker_args: list[str], timeout: float = 20.0) -> dict:
    """Start ``python -m module _supervise -- worker_args`` detached; wait until its worker runs.

    Returns the worker facts. Raises ChuantouError with the worker's
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
        raise ChuantouError(f"the {files.name} did not start: {errors[-1][len('error: '):]} "
                                 f"(log: {files.log_file})")
    tail = "\n".join(lines)
    raise ChuantouError(f"the {files.name} did not start; last lines of {files.log_file}:\n{tail}")


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
    facts: dict[str, Any] = {"pid": os.getpid(), "startedAt": time.time(), "restarts": 0, "workerPid": None, "gaveUp": False}
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
            assert worker.stdout is not None  # stdout=PIPE above
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
