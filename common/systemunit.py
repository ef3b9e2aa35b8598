"""Run at boot as a systemd *system* service: the unit text, and installing or removing it.

``install-service`` writes ``/etc/systemd/system/chuantou-relay.service`` (or
``chuantou-client.service``) running the program in the foreground under a user of its own,
with systemd's hardening. The config and state live in the unit's StateDirectory,
``/var/lib/chuantou``, where platformdirs finds them through the XDG_* variables the unit sets:
both programs write their config while running (the relay its tokens on the first start, the
client its ID and proxies), and under ``ProtectSystem=strict`` only such directories are
writable; ``/etc`` (a ConfigurationDirectory) stays read-only and is not given to a dynamic
user. Logs go to the journal (the foreground program writes no log file, so no LogsDirectory).

The user start-at-boot (``start --autostart``) is in autostart.py. This is application shell
rather than wire format; it lives in ``common`` because both programs install themselves the
same way and the layout has no other shared package.
"""

from __future__ import annotations

import os
import pwd
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import common

from .errors import ChuantouError

STATE_PARENT = "/var/lib"  # XDG_CONFIG_HOME and XDG_STATE_HOME: platformdirs adds "chuantou"
STATE_DIR = f"{STATE_PARENT}/chuantou"  # StateDirectory=chuantou
UNIT_DIR = "/etc/systemd/system"
HOMES = ("/home", "/root", "/run/user")  # what ProtectHome=yes hides
NOFILE = 65536  # each TCP session holds two descriptors (user side and relay side)


class ServiceError(ChuantouError):
    pass


@dataclass(frozen=True)
class SystemService:
    """One program's system unit: ``role`` "server" or "client", run as ``python -m module``."""

    role: str
    module: str
    user: str | None = None  # a static user (made if missing); None: DynamicUser named "chuantou"
    root: Path = Path("/")  # install under this directory instead (tests, package builds)

    @property
    def unit_name(self) -> str:
        return "chuantou-relay.service" if self.role == "server" else "chuantou-client.service"

    @property
    def unit_path(self) -> Path:
        return self.under_root(f"{UNIT_DIR}/{self.unit_name}")

    @property
    def config_path(self) -> Path:
        """The config file as the service sees it (its default one, through XDG_CONFIG_HOME)."""
        return Path(STATE_DIR) / f"{self.role}.json"

    def under_root(self, path: str | Path) -> Path:
        return self.root / str(path).lstrip("/")

    @property
    def real_root(self) -> bool:
        return self.root.resolve() == Path("/")


def code_paths(module: str) -> list[str]:
    """Where the interpreter and the program's code live: the service must be able to read them."""
    files = [getattr(sys.modules.get(module) or __import__(module), "__file__", None), common.__file__]
    return [sys.executable, *(str(Path(f).resolve().parent) for f in files if f)]


def under_homes(paths: list[str]) -> list[str]:
    return [p for p in paths if any(p == h or p.startswith(h + "/") for h in HOMES)]


def unit_text(svc: SystemService, args: list[str], paths: list[str] | None = None) -> str:
    """The unit: ``python -m <module> <args>`` in the foreground, hardened. ``paths``: the
    interpreter and code (default: this one's); under a home directory they need
    ``ProtectHome=read-only`` instead of ``yes``, which would hide them."""
    command = shlex.join([sys.executable, "-m", svc.module, *args])
    homes = under_homes(code_paths(svc.module) if paths is None else paths)
    user = (f"User={svc.user}\n" if svc.user else
            "DynamicUser=yes\nUser=chuantou\n")  # one dynamic user shared by both units, like their state dir
    what = "relay server" if svc.role == "server" else "client"
    return (
        "[Unit]\n"
        f"Description=chuantou {what}\n"
        "After=network-online.target\n"
        "Wants=network-online.target\n\n"
        "[Service]\n"
        "Type=exec\n"
        f"# config: {svc.config_path} (found through XDG_CONFIG_HOME); state beside it; log: journalctl -u "
        f"{svc.unit_name}\n"
        f"ExecStart={command.replace('%', '%%').replace('$', '$$')}\n"  # systemd expands % and $
        f"{user}"
        "StateDirectory=chuantou\n"
        "StateDirectoryMode=0750\n"
        f"Environment=XDG_CONFIG_HOME={STATE_PARENT} XDG_STATE_HOME={STATE_PARENT} PYTHONUNBUFFERED=1\n"
        "Restart=on-failure\n"
        "RestartSec=2\n"
        "TimeoutStopSec=30\n"
        f"LimitNOFILE={NOFILE}\n"
        "NoNewPrivileges=yes\n"
        "ProtectSystem=strict\n"
        + (f"# ProtectHome=read-only, not yes: the program is under {homes[0]}\nProtectHome=read-only\n" if homes
           else "ProtectHome=yes\n") +
        "PrivateTmp=yes\n"
        "PrivateDevices=yes\n"
        "ProtectKernelTunables=yes\n"
        "ProtectKernelModules=yes\n"
        "ProtectKernelLogs=yes\n"
        "ProtectControlGroups=yes\n"
        "ProtectClock=yes\n"
        "ProtectHostname=yes\n"
        "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX\n"
        "RestrictNamespaces=yes\n"
        "RestrictRealtime=yes\n"
        "RestrictSUIDSGID=yes\n"
        "LockPersonality=yes\n"
        "SystemCallArchitectures=native\n"
        "SystemCallFilter=@system-service\n"
        "SystemCallErrorNumber=EPERM\n"
        "ProtectProc=invisible\n"  # its own processes only; /proc/self/fd counts descriptors
        "ProcSubset=pid\n"
        "PrivateMounts=yes\n"
        "# a port below 1024 (443) needs this one capability, and nothing else is kept\n"
        "CapabilityBoundingSet=CAP_NET_BIND_SERVICE\n"
        "AmbientCapabilities=CAP_NET_BIND_SERVICE\n"
        "UMask=0077\n\n"
        "[Install]\n"
        "WantedBy=multi-user.target\n"
    )


# --- installing ------------------------------------------------------------------------------

def systemd_running() -> bool:
    """Is PID 1 systemd? (its own test: sd_booted() looks for /run/systemd/system)"""
    return os.path.isdir("/run/systemd/system") and bool(shutil.which("systemctl"))


def require_root(svc: SystemService, command: str) -> None:
    """The real /etc needs root; a --root staging directory does not."""
    if svc.real_root and os.geteuid() != 0:
        raise ServiceError(f"{command} writes {UNIT_DIR}/{svc.unit_name} and needs root: "
                           f"sudo {sys.executable} -m {svc.module} {command} "
                           f"(or see the unit first with: python -m {svc.module} {command} --print)")


def ensure_user(svc: SystemService) -> list[str]:
    """The static user, made with ``useradd --system`` if missing; what was done, in words."""
    if not svc.user:
        return []
    try:
        pwd.getpwnam(svc.user)
        return []
    except KeyError:
        pass
    command = ["useradd", "--system", "--user-group", "--home-dir", STATE_DIR, "--no-create-home",
               "--shell", "/usr/sbin/nologin", svc.user]
    if not svc.real_root:  # a staging root has no user database of ours to change
        return [f"user {svc.user} does not exist; on the target machine run: {shlex.join(command)}"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise ServiceError(f"cannot create the user {svc.user}: {result.stderr.strip() or result.returncode}")
    return [f"created the system user {svc.user}"]


def hand_state_to_user(svc: SystemService) -> None:
    """A static user owns its state directory (systemd does this for a dynamic one at start)."""
    if not (svc.user and svc.real_root):
        return
    entry = pwd.getpwnam(svc.user)
    state = svc.under_root(STATE_DIR)
    for path in (state, *state.iterdir()):
        os.chown(path, entry.pw_uid, entry.pw_gid)


def install(svc: SystemService, text: str) -> list[str]:
    """Write the unit and, where systemd runs, enable and start it; what was done, in words."""
    done = []
    svc.unit_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = svc.unit_path.with_name(f".{svc.unit_name}.tmp")
    tmp.write_text(text)
    tmp.chmod(0o644)
    os.replace(tmp, svc.unit_path)
    done.append(f"wrote {svc.unit_path}")
    if svc.real_root and systemd_running():
        systemctl("daemon-reload")
        systemctl("enable", svc.unit_name)
        systemctl("restart", svc.unit_name)  # starts it, or applies a reinstall's new options
        done.append(f"enabled and started {svc.unit_name}; see it with: systemctl status {svc.unit_name}; "
                    f"its log: journalctl -u {svc.unit_name}")
    elif svc.real_root:
        done.append(f"systemd is not running here (PID 1 is {pid1_name()}); once it is: "
                    f"systemctl daemon-reload && systemctl enable --now {svc.unit_name}")
    else:
        done.append(f"on the target machine: systemctl daemon-reload && systemctl enable --now {svc.unit_name}")
    return done


def uninstall(svc: SystemService) -> list[str]:
    """Stop, disable and remove the unit (the state in /var/lib/chuantou stays: it holds the tokens)."""
    done = []
    if svc.real_root and systemd_running():
        systemctl("disable", "--now", svc.unit_name, check=False)
        done.append(f"stopped and disabled {svc.unit_name}")
    if svc.unit_path.exists():
        svc.unit_path.unlink()
        done.append(f"removed {svc.unit_path}")
        if svc.real_root and systemd_running():
            systemctl("daemon-reload")
    else:
        done.append(f"no unit at {svc.unit_path}")
    done.append(f"kept {svc.under_root(STATE_DIR)} (config and tokens); delete it yourself if no longer needed")
    return done


def systemctl(*args: str, check: bool = True) -> None:
    result = subprocess.run(["systemctl", *args], capture_output=True, text=True, timeout=60)
    if check and result.returncode != 0:
        raise ServiceError(f"systemctl {' '.join(args)} failed: {result.stderr.strip() or result.returncode}")


def pid1_name() -> str:
    try:
        return Path("/proc/1/comm").read_text().strip()
    except OSError:
        return "unknown"


def home_warnings(module: str) -> list[str]:
    """The interpreter or code under a home directory: the service's user may not read it there."""
    return [f"warning: {path} is under a home directory: the service's user must be able to read it "
            f"(the unit uses ProtectHome=read-only); an install under /usr or /opt is safer"
            for path in under_homes(code_paths(module))[:1]]


def boot_import_problem(module: str) -> str | None:
    """Can the unit's command import the program? It runs in / with a clean environment, so a
    checkout used from its own folder (not installed) is not found there."""
    try:
        result = subprocess.run([sys.executable, "-c", f"import {module}"], cwd="/", env={}, capture_output=True,
                                timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"warning: could not check that the service can import {module}: {exc}"
    if result.returncode == 0:
        return None
    return (f"warning: {sys.executable} cannot import {module} outside this folder, as the service will run "
            f"it: install chuantou for that interpreter first (pip install .)")


def admin_prefix() -> str:
    """How root runs the program's other commands against the service's config and state."""
    return f"sudo env XDG_CONFIG_HOME={STATE_PARENT} XDG_STATE_HOME={STATE_PARENT}"
