"""Helpers for the command-line tests: run ``python -m chuantou_server`` / ``chuantou_client`` as
real processes in a private set of XDG directories, wait on their state files and local APIs
with deadlines, and tear down whatever they started, even when a test fails.

Nothing here touches the user's home: every process gets ``XDG_CONFIG_HOME``,
``XDG_STATE_HOME``, ``XDG_CACHE_HOME`` and ``XDG_DATA_HOME`` under the test's ``tmp_path``.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from common import service
from helpers import http_get, wait_until

REPO = Path(__file__).resolve().parent.parent
SERVER = "chuantou_server"
CLIENT = "chuantou_client"
HOST = "127.0.0.1"
TOKEN = "cli-test-token-0123456789abcdef"  # the relay's token in these tests (16+ characters)
COMMAND_TIMEOUT = 40.0  # no single CLI command may take longer (start waits up to 20 s for its worker)
STOP_TIMEOUT = 15.0


# --- ports -------------------------------------------------------------------------

def free_tcp_udp_port() -> int:
    """A port number free for both TCP and UDP on 127.0.0.1 (the relay and 'both' proxies need that)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp, \
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            tcp.bind((HOST, 0))
            port = tcp.getsockname()[1]
            try:
                udp.bind((HOST, port))
            except OSError:
                continue
            return port
    raise AssertionError("no port free for both TCP and UDP")


def pid_alive(pid) -> bool:
    return service.pid_alive(pid)


def is_chuantou_process(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"chuantou_" in f.read()
    except OSError:
        return False


# --- talking to processes over HTTP ------------------------------------------------------------

_STATE_DIRS: list[Path] = []  # of the live Cli instances: where api_key finds a client's secret
KEY_HEADER = "X-Chuantou-Key"


def api_key(admin_port: int) -> str | None:
    """The API secret of the client (started by a live Cli) whose local API is on ``admin_port``."""
    for state_dir in list(_STATE_DIRS):
        for record in state_dir.glob("client*.worker.json"):
            info = service.read_json(record) or {}
            if info.get("adminPort") == admin_port:
                try:
                    return (state_dir / f"{record.name[:-len('.worker.json')]}.api-secret").read_text().strip()
                except OSError:
                    pass
    return None


def api_headers(admin_port: int) -> dict:
    """Headers that let a test use the local API on ``admin_port`` as the CLI does."""
    key = api_key(admin_port)
    return {KEY_HEADER: key} if key else {}


def fetch(port: int, path: str = "/", timeout: float = 5.0, host: str = HOST) -> bytes | None:
    """GET http://host:port/path; the body on 200, None if it fails in any way."""
    try:
        status, body = http_get(port, path, timeout, host=host)
    except (OSError, ValueError, http.client.HTTPException):
        return None
    return body if status == 200 else None


def api_status(admin_port: int) -> dict | None:
    """The running client's /api/status, or None if it does not answer."""
    try:
        status, body = http_get(admin_port, "/api/status", timeout=3.0, headers=api_headers(admin_port))
        return json.loads(body) if status == 200 else None
    except (OSError, ValueError, http.client.HTTPException):
        return None


def wait_connected(admin_port: int, timeout: float = 15.0) -> dict:
    """Wait until the client on ``admin_port`` is registered with its relay; return its status."""
    def connected():
        status = api_status(admin_port)
        return status if status and status.get("state") == "connected" else None
    return wait_until(connected, timeout, message=f"client with admin port {admin_port} connected to its relay")


def wait_fetch(port: int, expected: bytes, timeout: float = 15.0) -> None:
    """Wait until a GET through ``port`` returns ``expected`` (a proxy coming back after a restart)."""
    wait_until(lambda: fetch(port, timeout=3.0) == expected, timeout,
               message=f"GET through port {port} returns {expected!r}")


# --- the command line in a private home ----------------------------------------------------------

def one_line(text: str) -> str:
    """The text, asserted to be exactly one non-empty line."""
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line, got {text!r}"
    return lines[0]


class Cli:
    """Runs the two programs with XDG directories under ``root`` and cleans up after them."""

    def __init__(self, root: Path):
        self.root = root
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith("CHUANTOU_") and not k.lower().endswith("_proxy")}
        for name in ("CONFIG", "STATE", "CACHE", "DATA"):
            path = root / "xdg" / name.lower()
            path.mkdir(parents=True, exist_ok=True)
            self.env[f"XDG_{name}_HOME"] = str(path)
        self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        # An empty PATH: `stop` removes autostart entries, and must never reach the user's real
        # crontab or systemctl (tests that want them put stand-ins in a PATH of their own).
        self.bin_dir = root / "bin"
        self.bin_dir.mkdir(exist_ok=True)
        self.env["PATH"] = str(self.bin_dir)
        self.env["PYTHONUNBUFFERED"] = "1"
        _STATE_DIRS.append(self.state_dir)
        self._procs: list[subprocess.Popen] = []
        self._services: set[tuple[str, str | None]] = set()  # (module, config) that `start` was run for

    # --- where things are ---------------------------------------------------------------------

    @property
    def config_dir(self) -> Path:
        return Path(self.env["XDG_CONFIG_HOME"]) / "chuantou"

    @property
    def state_dir(self) -> Path:
        return Path(self.env["XDG_STATE_HOME"]) / "chuantou"

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "log"

    def files(self, role: str, config: Path | str | None = None) -> service.ServiceFiles:
        """The state files of the ``role`` ("server"/"client") instance using ``config``."""
        name = service.ServiceFiles.for_role(role, str(config) if config else None).name
        return service.ServiceFiles(name, self.state_dir, self.log_dir)

    def worker(self, role: str, config=None) -> dict | None:
        """The running worker's facts (pid, ports), or None."""
        return service.running_worker(self.files(role, config))

    def supervisor(self, role: str, config=None) -> dict | None:
        return service.read_json(self.files(role, config).supervisor_file)

    def wait_worker(self, role: str, config=None, timeout: float = 15.0, other_than: int | None = None) -> dict:
        """Wait for a live worker (one whose pid is not ``other_than``) to announce itself."""
        def found():
            info = self.worker(role, config)
            return info if info and info["pid"] != other_than else None
        return wait_until(found, timeout, message=f"a {role} worker running (config {config})")

    # --- running commands -----------------------------------------------------------------------

    def run(self, module: str, *args: str, env: dict | None = None,
            timeout: float = COMMAND_TIMEOUT) -> subprocess.CompletedProcess:
        args = [str(a) for a in args]
        if "start" in args:
            self._services.add((module, _option(args, "--config")))
        return subprocess.run([sys.executable, "-m", module, *args], env={**self.env, **(env or {})},
                              cwd=self.root, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)

    def server(self, *args, **kwargs) -> subprocess.CompletedProcess:
        return self.run(SERVER, *args, **kwargs)

    def client(self, *args, **kwargs) -> subprocess.CompletedProcess:
        return self.run(CLIENT, *args, **kwargs)

    def popen(self, module: str, *args, env: dict | None = None) -> subprocess.Popen:
        """Start a foreground program; its output goes to a file in ``root`` (see ``output``)."""
        output_path = self.root / f"{module}-{len(self._procs)}.out"
        with open(output_path, "wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", module, *map(str, args)], env={**self.env, **(env or {})},
                                    cwd=self.root, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        proc.output_path = output_path
        self._procs.append(proc)
        return proc

    @staticmethod
    def output(proc: subprocess.Popen) -> str:
        return proc.output_path.read_text(errors="replace")

    # --- the usual set-ups --------------------------------------------------------------------

    def start_relay(self, *extra: str) -> int:
        """``chuantou_server start`` on a free port of 127.0.0.1 with TOKEN; return the port."""
        port = free_tcp_udp_port()
        result = self.server("start", "--host", HOST, "--port", port, "--token", TOKEN, *extra)
        assert result.returncode == 0, result.stderr
        return port

    def start_client(self, relay_port: int | None, client_id: str | None, admin_port: int,
                     config: Path | None = None, env: dict | None = None, extra: tuple = ()) -> dict:
        """``chuantou_client start``; wait until it is registered and return its API status."""
        args = ["start", "--admin-port", admin_port, "--token", TOKEN, *extra]
        if relay_port is not None:
            args += ["--server", f"ws://{HOST}:{relay_port}"]
        if client_id is not None:
            args += ["--client-id", client_id]
        if config is not None:
            args += ["--config", config]
        result = self.client(*args, env=env)
        assert result.returncode == 0, result.stdout + result.stderr
        return wait_connected(admin_port)

    # --- teardown -----------------------------------------------------------------------------

    def cleanup(self) -> None:
        """Stop everything this Cli started: `stop` each service, end foreground processes, and as
        a last resort SIGKILL any chuantou pid still named in the state files."""
        for module, config in sorted(self._services, key=lambda s: (s[0] == SERVER, s[1] or "")):
            args = ["stop", "--keep-autostart"] + (["--config", config] if config else [])
            try:
                subprocess.run([sys.executable, "-m", module, *args], env=self.env, cwd=self.root,
                               capture_output=True, timeout=STOP_TIMEOUT + 10, stdin=subprocess.DEVNULL)
            except subprocess.TimeoutExpired:
                pass
        for proc in self._procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
        for pid in self._pids_in_state_files():
            if pid_alive(pid) and is_chuantou_process(pid):
                os.kill(pid, signal.SIGKILL)
        if self.state_dir in _STATE_DIRS:
            _STATE_DIRS.remove(self.state_dir)

    def _pids_in_state_files(self) -> set[int]:
        pids = set()
        if not self.state_dir.exists():
            return pids
        for path in self.state_dir.iterdir():
            if path.suffix == ".pid":
                try:
                    pids.add(int(path.read_text().strip()))
                except (OSError, ValueError):
                    pass
            elif path.suffix == ".json":
                info = service.read_json(path) or {}
                pids.update(v for k, v in info.items() if k in ("pid", "workerPid") and isinstance(v, int))
        return pids


def _option(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args[:-1] else None


# --- stand-ins for crontab(1) and systemctl(1) ---------------------------------------------------

def _script(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + text)
    path.chmod(0o755)
    return path


def fake_crontab(bin_dir: Path, table: Path) -> Path:
    """A ``crontab`` in ``bin_dir`` that keeps its table in ``table`` (``-l`` and ``-`` only)."""
    return _script(bin_dir / "crontab", f"""\
case "$1" in
  -l) [ -f '{table}' ] || {{ echo "no crontab for $USER" >&2; exit 1; }}; exec /bin/cat '{table}' ;;
  -) exec /bin/cat > '{table}' ;;
esac
echo "fake crontab: unsupported arguments: $*" >&2
exit 2
""")


def fake_systemctl(bin_dir: Path, calls: Path, state: str = "running") -> Path:
    """A ``systemctl`` in ``bin_dir`` that logs its arguments to ``calls`` and reports ``state``."""
    return _script(bin_dir / "systemctl", f"""\
echo "$*" >> '{calls}'
[ "$2" = "is-system-running" ] && echo '{state}'
exit 0
""")


@pytest.fixture
def cli(tmp_path):
    """A Cli with its own XDG directories; everything it started is stopped afterwards."""
    env = Cli(tmp_path)
    try:
        yield env
    finally:
        env.cleanup()
