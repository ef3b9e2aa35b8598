"""Start at boot: the systemd user unit and the crontab line that ``start --autostart`` installs,
installing and removing them through stand-in ``systemctl`` / ``crontab`` programs, the plain
"not supported" error where neither exists, and a real systemd user unit where this machine has
a user systemd. Nothing is left installed."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import uuid

import pytest

from chuantou_client import cli as client_cli
from chuantou_server import cli as server_cli
from cli_support import (  # noqa: F401 (cli is a fixture)
    cli,
    HOST,
    TOKEN,
    fake_crontab,
    fake_systemctl,
    free_port,
    free_tcp_udp_port,
    one_line,
)
from common import autostart, config, service

ARGS = ["--host", "0.0.0.0", "--port", "8300", "--config", "/srv/my relay/server.json"]


@pytest.fixture
def files(tmp_path) -> service.ServiceFiles:
    return service.ServiceFiles("server", tmp_path / "state", tmp_path / "state" / "log")


@pytest.fixture
def private_path(tmp_path, monkeypatch):
    """PATH = an empty folder of our own (add stand-ins to it), XDG_CONFIG_HOME = tmp."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    return bin_dir


def start_command(module: str, args: list[str]) -> list[str]:
    return [sys.executable, "-m", module, "start", *args]


# --- the texts -----------------------------------------------------------------------------------

@pytest.mark.parametrize("module", ["chuantou_server", "chuantou_client"])
def test_systemd_unit_runs_start_with_the_same_options(files, module):
    text = autostart.systemd_unit_text(files, module, ARGS)
    lines = text.splitlines()
    exec_start = [line for line in lines if line.startswith("ExecStart=")]
    assert len(exec_start) == 1
    assert shlex.split(exec_start[0][len("ExecStart="):]) == start_command(module, ARGS)
    assert f"-m {module} start --host 0.0.0.0 --port 8300" in exec_start[0]
    assert "Type=forking" in lines  # start returns once the supervisor runs
    assert f"PIDFile={files.pid_file}" in lines  # ... and systemd follows the supervisor
    assert lines[0] == "[Unit]" and "[Service]" in lines and "[Install]" in lines
    assert "WantedBy=default.target" in lines


@pytest.mark.parametrize("module", ["chuantou_server", "chuantou_client"])
def test_crontab_line_runs_start_at_reboot_and_is_marked(files, module):
    line = autostart.crontab_line(files, module, ARGS)
    assert line.endswith(f"  # chuantou-{files.name}\n") and line.count("\n") == 1
    assert line.startswith("@reboot ")
    command = line[len("@reboot "):].rsplit("  #", 1)[0]
    assert shlex.split(command) == start_command(module, ARGS)
    assert f"-m {module} start --host 0.0.0.0 --port 8300" in command


def test_crontab_line_escapes_percent_which_cron_reads_as_a_newline(files):
    line = autostart.crontab_line(files, "chuantou_client", ["--config", "/home/u/50%/client.json"])
    assert "50\\%" in line and "50%/" not in line.replace("\\%", "")


def test_the_installed_command_has_the_start_options_an_absolute_config_and_no_token(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = server_cli.build_parser().parse_args(
        ["start", "--port", "8300", "--config", "relay.json", "--token", TOKEN, "--autostart"])
    assert server_cli.PROGRAM.worker_args(args) == ["--port", "8300", "--config", str(tmp_path / "relay.json")]
    args = client_cli.build_parser().parse_args(
        ["start", "--server", "ws://relay:8200", "--admin-port", "8301", "--config", "c.json", "--token", TOKEN])
    assert client_cli.PROGRAM.worker_args(args) == ["--server", "ws://relay:8200", "--admin-port", "8301",
                                            "--config", str(tmp_path / "c.json")]


# --- installing and removing ---------------------------------------------------------------------

def test_without_systemd_or_crontab_install_says_it_is_not_supported(files, private_path):
    with pytest.raises(config.ConfigError, match="autostart is not supported here") as raised:
        autostart.install_autostart(files, "chuantou_server", ARGS)
    assert f"{sys.executable} -m chuantou_server start" in str(raised.value)
    assert autostart.remove_autostart(files) is None


def test_offline_user_systemd_falls_back_to_crontab(files, private_path, tmp_path):
    table = tmp_path / "crontab.txt"
    fake_systemctl(private_path, tmp_path / "systemctl.log", state="offline")
    fake_crontab(private_path, table)
    assert "crontab" in autostart.install_autostart(files, "chuantou_server", ARGS)
    assert not autostart.systemd_unit_path(files).exists()
    assert autostart.remove_autostart(files) == "removed the @reboot line from your crontab"
    assert table.read_text() == ""


def test_crontab_install_replaces_its_own_line_keeps_others_and_is_removed(files, private_path, tmp_path):
    table = tmp_path / "crontab.txt"
    fake_crontab(private_path, table)
    others = "MAILTO=me@example.com\n0 3 * * * /usr/local/bin/backup\n"
    table.write_text(others)

    said = autostart.install_autostart(files, "chuantou_server", ARGS)
    assert said.startswith("autostart: added to your crontab: @reboot")
    autostart.install_autostart(files, "chuantou_server", ARGS)  # again: still one line
    assert table.read_text() == others + autostart.crontab_line(files, "chuantou_server", ARGS)
    client_files = service.ServiceFiles("client", files.state_dir, files.log_dir)
    autostart.install_autostart(client_files, "chuantou_client", ["--admin-port", "8301"])

    assert autostart.remove_autostart(files) == "removed the @reboot line from your crontab"
    assert table.read_text() == others + autostart.crontab_line(client_files, "chuantou_client", ["--admin-port", "8301"])
    assert autostart.remove_autostart(files) is None
    autostart.remove_autostart(client_files)
    assert table.read_text() == others


def test_systemd_install_writes_and_enables_the_unit_and_remove_disables_it(files, private_path, tmp_path):
    calls = tmp_path / "systemctl.log"
    fake_systemctl(private_path, calls)
    said = autostart.install_autostart(files, "chuantou_server", ARGS)
    unit = tmp_path / "config" / "systemd" / "user" / "chuantou-server.service"
    assert unit.read_text() == autostart.systemd_unit_text(files, "chuantou_server", ARGS)
    assert f"systemd user unit {unit} enabled" in said and "loginctl enable-linger" in said
    assert calls.read_text().splitlines() == [
        "--user is-system-running", "--user daemon-reload", "--user enable chuantou-server.service"]

    assert autostart.remove_autostart(files) == f"removed systemd user unit {unit}"
    assert not unit.exists()
    assert calls.read_text().splitlines()[-1] == "--user disable chuantou-server.service"


def _user_systemd_running() -> bool:
    if not shutil.which("systemctl"):
        return False
    try:
        result = subprocess.run(["systemctl", "--user", "is-system-running"], capture_output=True, text=True,
                                timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.stdout.strip() in ("running", "degraded")


@pytest.mark.skipif(not _user_systemd_running(), reason="no user systemd on this machine")
@pytest.mark.timeout(60)
def test_real_user_systemd_unit_is_enabled_then_removed(tmp_path, monkeypatch):
    # The user's own systemd reads units from the real ~/.config: a unit name of our own, removed after.
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    files = service.ServiceFiles(f"server-clitest-{uuid.uuid4().hex[:8]}", tmp_path / "state", tmp_path / "log")
    unit = autostart.unit_name(files)
    try:
        autostart.install_autostart(files, "chuantou_server", ["--port", str(free_port())])
        enabled = subprocess.run(["systemctl", "--user", "is-enabled", unit], capture_output=True, text=True)
        assert enabled.stdout.strip() == "enabled"
    finally:
        autostart.remove_autostart(files)
        subprocess.run(["systemctl", "--user", "daemon-reload"], capture_output=True, timeout=15)
    assert not autostart.systemd_unit_path(files).exists()
    enabled = subprocess.run(["systemctl", "--user", "is-enabled", unit], capture_output=True, text=True)
    assert enabled.stdout.strip() != "enabled"


# --- through the command line --------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_start_autostart_adds_the_crontab_line_and_stop_removes_it(cli):
    table = cli.root / "crontab.txt"
    fake_crontab(cli.bin_dir, table)
    port = free_tcp_udp_port()
    start = cli.server("start", "--host", HOST, "--port", port, "--token", TOKEN, "--autostart")
    assert start.returncode == 0, start.stderr
    assert "autostart: added to your crontab: @reboot" in start.stdout
    line = table.read_text()
    assert shlex.split(line[len("@reboot "):].rsplit("  #", 1)[0]) == start_command(
        "chuantou_server", ["--host", HOST, "--port", str(port)])
    assert TOKEN not in line  # the token stays in the 0600 config file

    stop = cli.server("stop")
    assert stop.returncode == 0
    assert "removed the @reboot line from your crontab" in stop.stdout
    assert table.read_text() == ""


@pytest.mark.timeout(60)
def test_start_autostart_where_unsupported_warns_and_still_starts(cli):
    start = cli.server("start", "--host", HOST, "--port", free_tcp_udp_port(), "--token", TOKEN, "--autostart")
    assert start.returncode == 0, start.stderr
    assert one_line(start.stderr).startswith("warning: autostart is not supported here")
    assert cli.worker("server") is not None
    assert cli.server("stop").returncode == 0
