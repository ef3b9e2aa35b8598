"""The systemd system service (``install-service``, ``uninstall-service``): the unit's text and
its hardening, ``systemd-analyze verify`` where that tool exists, installing and removing into a
staging root (``--root``, so nothing touches the real /etc), systemctl driven through a stand-in,
the refusal without root, and the relay run as the unit runs it, finding the config that
install-service prepared."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from chuantou_client import cli as client_cli
from chuantou_server import cli as server_cli
from cli_support import HOST, TOKEN, fake_systemctl, free_tcp_udp_port
from helpers import wait_until
from common import config, systemunit

PROGRAMS = [("chuantou_server", server_cli, "chuantou-relay.service"),
            ("chuantou_client", client_cli, "chuantou-client.service")]
HARDENING = ["NoNewPrivileges=yes", "ProtectSystem=strict", "PrivateTmp=yes", "PrivateDevices=yes",
             "ProtectKernelTunables=yes", "ProtectKernelModules=yes", "ProtectControlGroups=yes",
             "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX", "LimitNOFILE=65536", "Restart=on-failure",
             "RestartSec=2", "StateDirectory=chuantou", "WantedBy=multi-user.target"]
SERVER_ARGS = ["--host", "0.0.0.0", "--port", "8300"]


@pytest.fixture(autouse=True)
def private_home(tmp_path, monkeypatch):
    """XDG directories of the test's own, and a PATH with only a stand-in systemctl's folder."""
    for name in ("CONFIG", "STATE", "CACHE", "DATA"):
        monkeypatch.setenv(f"XDG_{name}_HOME", str(tmp_path / "xdg" / name.lower()))
    monkeypatch.delenv("CHUANTOU_SERVER", raising=False)
    monkeypatch.delenv("CHUANTOU_TOKEN", raising=False)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))
    return bin_dir


def printed_unit(cli, capsys, *args: str) -> str:
    assert cli.main(["install-service", "--print", *args]) == 0
    return capsys.readouterr().out


def exec_start(text: str) -> list[str]:
    lines = [line for line in text.splitlines() if line.startswith("ExecStart=")]
    assert len(lines) == 1
    return shlex.split(lines[0][len("ExecStart="):])


def unit_env(text: str) -> dict:
    line = next(line for line in text.splitlines() if line.startswith("Environment="))
    return dict(item.split("=", 1) for item in line[len("Environment="):].split())


# --- the text ------------------------------------------------------------------------------------

@pytest.mark.parametrize("module,cli,unit", PROGRAMS)
def test_print_shows_the_hardened_unit_running_the_foreground_program(module, cli, unit, capsys, monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)  # --print needs no root
    text = printed_unit(cli, capsys)
    lines = text.splitlines()
    for line in HARDENING:
        assert line in lines, line
    home = "ProtectHome=read-only" if systemunit.under_homes(systemunit.code_paths(module)) else "ProtectHome=yes"
    assert home in lines
    assert exec_start(text) == [sys.executable, "-m", module]  # the foreground program, no "start"
    assert Path(exec_start(text)[0]).is_absolute()
    assert "DynamicUser=yes" in lines and "User=chuantou" in lines
    assert "Type=exec" in lines and lines[0] == "[Unit]"
    env = unit_env(text)  # platformdirs finds the config and state in the StateDirectory
    assert env["XDG_CONFIG_HOME"] == env["XDG_STATE_HOME"] == "/var/lib"
    assert f"# config: /var/lib/chuantou/{'server' if module == 'chuantou_server' else 'client'}.json" in text


def test_the_unit_starts_the_relay_with_the_run_options_given_and_never_the_token(capsys):
    text = printed_unit(server_cli, capsys, *SERVER_ARGS, "--token", TOKEN)
    assert exec_start(text) == [sys.executable, "-m", "chuantou_server", *SERVER_ARGS]
    assert TOKEN not in text  # install-service saves it in the 0600 config instead


def test_user_names_a_static_user_instead_of_a_dynamic_one(capsys):
    lines = printed_unit(client_cli, capsys, "--user", "tunnel").splitlines()
    assert "User=tunnel" in lines and not any(line.startswith("DynamicUser") for line in lines)


def test_protect_home_is_read_only_when_the_program_lives_in_a_home():
    svc = systemunit.SystemService("server", "chuantou_server")
    assert "ProtectHome=yes\n" in systemunit.unit_text(svc, [], paths=["/usr/bin/python3", "/opt/chuantou"])
    text = systemunit.unit_text(svc, [], paths=["/home/me/.venv/bin/python", "/opt/chuantou"])
    assert "ProtectHome=read-only\n" in text and "ProtectHome=yes" not in text


def test_percent_and_dollar_in_exec_start_are_escaped_for_systemd():
    svc = systemunit.SystemService("server", "chuantou_server")
    text = systemunit.unit_text(svc, ["--tls-cert", "/etc/100%/$cert.pem"], paths=[])
    assert "/etc/100%%/$$cert.pem" in text


@pytest.mark.skipif(not shutil.which("systemd-analyze", path="/usr/bin:/bin:/usr/sbin:/sbin"),
                    reason="no systemd-analyze here (Debian package systemd)")
@pytest.mark.parametrize("module,cli,unit", PROGRAMS)
@pytest.mark.parametrize("user", [[], ["--user", "root"]])
def test_the_unit_passes_systemd_analyze_verify(module, cli, unit, user, capsys, tmp_path):
    # verify reads the file alone, with no running systemd needed (it works in a container).
    path = tmp_path / unit
    path.write_text(printed_unit(cli, capsys, *user))
    tool = shutil.which("systemd-analyze", path="/usr/bin:/bin:/usr/sbin:/sbin")
    result = subprocess.run([tool, "verify", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert str(path) not in result.stderr and unit not in result.stderr, result.stderr  # not even a warning


@pytest.mark.skipif(not shutil.which("systemd-analyze", path="/usr/bin:/bin:/usr/sbin:/sbin"),
                    reason="no systemd-analyze here (Debian package systemd)")
@pytest.mark.parametrize("module,cli,unit", PROGRAMS)
def test_systemd_rates_the_units_exposure_low(module, cli, unit, capsys, tmp_path):
    # "security --offline" (systemd 250+) scores the unit file alone: 0 safest, 10 unprotected; ours is
    # about 1.7, kept at 2.5 or less (the score counts tenths: threshold 25).
    path = tmp_path / unit
    path.write_text(printed_unit(cli, capsys))
    tool = shutil.which("systemd-analyze", path="/usr/bin:/bin:/usr/sbin:/sbin")
    result = subprocess.run([tool, "security", "--offline=yes", "--threshold=25", str(path)], capture_output=True,
                            text=True, timeout=60)
    if "offline" in result.stderr and "unrecognized" in result.stderr:
        pytest.skip("this systemd-analyze has no --offline (systemd < 250)")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr


# --- installing and removing ---------------------------------------------------------------------

@pytest.mark.parametrize("module,cli,unit", PROGRAMS)
def test_install_into_a_staging_root_writes_the_unit_and_uninstall_removes_it(module, cli, unit, tmp_path,
                                                                              private_home, capsys):
    calls = tmp_path / "systemctl.log"
    fake_systemctl(private_home, calls)
    root = tmp_path / "root"
    expected = printed_unit(cli, capsys)
    assert cli.main(["install-service", "--root", str(root)]) == 0
    out = capsys.readouterr().out
    path = root / "etc/systemd/system" / unit
    assert path.read_text() == expected
    assert path.stat().st_mode & 0o777 == 0o644
    assert f"systemctl daemon-reload && systemctl enable --now {unit}" in out
    assert not calls.exists()  # a staging root is not this machine's systemd
    state = root / "var/lib/chuantou"
    assert state.stat().st_mode & 0o777 == 0o750

    assert cli.main(["uninstall-service", "--root", str(root)]) == 0
    out = capsys.readouterr().out
    assert not path.exists() and f"removed {path}" in out
    assert state.is_dir() and "kept" in out  # the config and its tokens stay
    assert not (tmp_path / "xdg" / "config").exists()  # nothing in the user's own config


def test_install_prepares_the_relays_config_with_its_tokens_and_shows_them(tmp_path, capsys):
    root = tmp_path / "root"
    assert server_cli.main(["install-service", "--root", str(root), "--port", "8300"]) == 0
    out = capsys.readouterr().out
    saved = json.loads((root / "var/lib/chuantou/server.json").read_text())
    assert saved["token"] in out and saved["adminToken"] in out  # root sees them once, at install time
    assert (root / "var/lib/chuantou/server.json").stat().st_mode & 0o777 == 0o600
    assert "XDG_CONFIG_HOME=/var/lib XDG_STATE_HOME=/var/lib" in out  # how to run `token` for the service


def test_install_saves_the_clients_relay_id_and_token(tmp_path, capsys):
    root = tmp_path / "root"
    assert client_cli.main(["install-service", "--root", str(root), "--server", "ws://relay.example:8200",
                            "--client-id", "office", "--token", TOKEN]) == 0
    saved = json.loads((root / "var/lib/chuantou/client.json").read_text())
    assert (saved["server"], saved["clientId"], saved["token"]) == ("ws://relay.example:8200", "office", TOKEN)
    unit = (root / "etc/systemd/system/chuantou-client.service").read_text()
    assert TOKEN not in unit


def test_install_refuses_a_config_of_its_own(tmp_path, capsys):
    assert server_cli.main(["install-service", "--root", str(tmp_path), "--config", "/srv/relay.json"]) == 1
    assert "keeps its config in /var/lib/chuantou" in capsys.readouterr().err
    assert not (tmp_path / "etc").exists()


def test_install_warns_when_the_service_could_not_import_the_program():
    assert systemunit.boot_import_problem("json") is None
    warning = systemunit.boot_import_problem("no_such_module_of_chuantou")
    assert warning and "cannot import no_such_module_of_chuantou" in warning and "pip install" in warning


@pytest.fixture
def this_machine(monkeypatch):
    """The staging root is treated as the real one (systemctl and useradd are run) and systemd runs."""
    monkeypatch.setattr(systemunit.SystemService, "real_root", property(lambda self: True))
    monkeypatch.setattr(systemunit, "systemd_running", lambda: True)


def test_where_systemd_runs_install_enables_and_starts_and_uninstall_stops_and_disables(
        tmp_path, private_home, capsys, this_machine):
    calls = tmp_path / "systemctl.log"
    fake_systemctl(private_home, calls)
    root = tmp_path / "root"
    assert server_cli.main(["install-service", "--root", str(root)]) == 0
    assert "enabled and started chuantou-relay.service" in capsys.readouterr().out
    assert calls.read_text().splitlines() == ["daemon-reload", "enable chuantou-relay.service",
                                              "restart chuantou-relay.service"]  # restart: a reinstall applies
    assert server_cli.main(["uninstall-service", "--root", str(root)]) == 0
    assert calls.read_text().splitlines()[3:] == ["disable --now chuantou-relay.service", "daemon-reload"]
    assert not (root / "etc/systemd/system/chuantou-relay.service").exists()


def test_without_systemd_install_says_how_to_start_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(systemunit.SystemService, "real_root", property(lambda self: True))
    monkeypatch.setattr(systemunit, "systemd_running", lambda: False)
    assert client_cli.main(["install-service", "--root", str(tmp_path / "root")]) == 0
    out = capsys.readouterr().out
    assert "systemd is not running here (PID 1 is" in out
    assert "systemctl daemon-reload && systemctl enable --now chuantou-client.service" in out


def test_a_missing_user_is_made_with_useradd_system(tmp_path, private_home, capsys, this_machine, monkeypatch):
    made = tmp_path / "useradd.log"
    (private_home / "useradd").write_text(f"#!/bin/sh\necho \"$*\" >> '{made}'\n")
    (private_home / "useradd").chmod(0o755)
    fake_systemctl(private_home, tmp_path / "systemctl.log")
    me = os.getuid(), os.getgid()
    users = {}

    def getpwnam(name):  # the stand-in useradd makes no user: pretend it did, as this process's ids
        if name not in users:
            users[name] = True
            raise KeyError(name)
        return type("pw", (), {"pw_uid": me[0], "pw_gid": me[1]})

    monkeypatch.setattr(systemunit.pwd, "getpwnam", getpwnam)
    root = tmp_path / "root"
    assert server_cli.main(["install-service", "--root", str(root), "--user", "tunnel"]) == 0
    assert "created the system user tunnel" in capsys.readouterr().out
    assert made.read_text().split() == ["--system", "--user-group", "--home-dir", "/var/lib/chuantou",
                                        "--no-create-home", "--shell", "/usr/sbin/nologin", "tunnel"]
    assert "User=tunnel" in (root / "etc/systemd/system/chuantou-relay.service").read_text()


def test_a_missing_user_in_a_staging_root_is_named_not_made(tmp_path, capsys):
    assert server_cli.main(["install-service", "--root", str(tmp_path / "root"), "--user", "no-such-user-x1"]) == 0
    assert "on the target machine run: useradd --system" in capsys.readouterr().out


@pytest.mark.parametrize("module,cli,unit", PROGRAMS)
@pytest.mark.parametrize("command", ["install-service", "uninstall-service"])
def test_without_root_it_refuses_with_a_clear_message(module, cli, unit, command, capsys, monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert cli.main([command]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {command} writes /etc/systemd/system/{unit} and needs root: sudo ")
    assert "--print" in err


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a file to another user")
def test_root_saving_a_service_users_config_keeps_its_owner(tmp_path):
    path = tmp_path / "server.json"
    config.save(path, {"port": 8200})
    os.chown(path, 65534, 65534)
    config.save(path, {"port": 8300})  # as `token add` run by root on the service's config
    assert (path.stat().st_uid, path.stat().st_gid) == (65534, 65534)
    assert path.stat().st_mode & 0o777 == 0o600 and json.loads(path.read_text()) == {"port": 8300}


# --- run as the unit runs it ---------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_the_relay_run_as_the_unit_says_uses_the_prepared_config(tmp_path, capsys):
    root, port = tmp_path / "root", free_tcp_udp_port()
    assert server_cli.main(["install-service", "--root", str(root), "--host", HOST, "--port", str(port)]) == 0
    capsys.readouterr()
    text = (root / "etc/systemd/system/chuantou-relay.service").read_text()
    env = {k: str(root) + v for k, v in unit_env(text).items() if k.startswith("XDG_")}  # /var/lib, staged
    env = {**os.environ, "PATH": os.defpath, **env}
    process = subprocess.Popen(exec_start(text), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        record = root / "var/lib/chuantou/server.worker.json"
        worker = wait_until(lambda: record.exists() and json.loads(record.read_text()), 20,
                            message="the relay's worker record")
        assert worker["port"] == port
        saved = json.loads((root / "var/lib/chuantou/server.json").read_text())
        status = server_cli.fetch_status(worker, saved["adminToken"])  # the prepared admin token works
        assert status["port"] == port
    finally:
        process.send_signal(signal.SIGTERM)
        out = process.communicate(timeout=20)[0].decode()
    assert process.returncode == 0, out
    assert "generated" not in out  # no new token: the one install-service made and showed
