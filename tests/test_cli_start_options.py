"""``start`` of a client or relay that already runs (issue 10 item 11): with the options it
already uses it says "already running" and exits 0; with others it exits 1 naming each option
that was not applied and how to apply it (stop, then start), and saves none of them. A start
that fails keeps no option either. Real relay and clients through the CLI."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

from cli_support import (  # noqa: F401 (cli is a fixture)
    cli,
    HOST,
    fake_crontab,
    TOKEN,
    free_tcp_udp_port,
    one_line,
    wait_connected,
)
from helpers import free_port
from common import service

OTHER_TOKEN = "another-token-that-the-relay-does-not-know"


def saved(cli, name: str) -> dict:
    return json.loads((cli.config_dir / name).read_text())


def not_applied_lines(result) -> list[str]:
    """The indented option lines of an 'options not applied' error, asserting its frame."""
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines[0].startswith("error: chuantou ") and lines[0].endswith(
        "with other options; not applied (nothing was saved):"), lines[0]
    assert lines[-1].startswith("to apply them: python -m chuantou_"), lines[-1]
    return [line.strip() for line in lines[1:-1]]


@pytest.mark.timeout(150)
def test_client_start_with_new_options_names_them_saves_none_and_applies_them_after_a_restart(cli):
    relay = cli.start_relay()
    admin = free_port()
    cli.start_client(relay, "A", admin)
    before = saved(cli, "client.json")
    pid = cli.worker("client")["pid"]

    same = cli.client("start", "--client-id", "A", "--admin-port", admin, "--token", TOKEN,
                      "--server", f"ws://{HOST}:{relay}")
    assert same.returncode == 0, same.stderr
    assert "chuantou client is already running" in one_line(same.stdout) and "already with these options" in same.stdout

    changed = cli.client("start", "--allow", "22, 8000-8100", "--client-id", "A", "--token", OTHER_TOKEN,
                         "--allow-host", "192.168.1.20")
    assert not_applied_lines(changed) == [
        "--token (running with another token)",
        "--allow 22,8000-8100 (running: every port on 127.0.0.1)",
        "--allow-host 192.168.1.20 (running: none)",
    ]
    assert "to apply them: python -m chuantou_client stop, then run this start again" in changed.stderr
    assert OTHER_TOKEN not in changed.stderr
    assert saved(cli, "client.json") == before  # nothing that was not applied is saved
    assert cli.worker("client")["pid"] == pid

    foreground = cli.client("--allow", "23", "--admin-port", free_port())  # a second copy, in the terminal
    assert foreground.returncode == 1
    assert "--allow 23 (running: every port on 127.0.0.1)" in foreground.stderr
    assert saved(cli, "client.json") == before and cli.worker("client")["pid"] == pid

    assert cli.client("stop").returncode == 0  # what the hint says: stop, then the same start again
    restarted = cli.client("start", "--allow", "22, 8000-8100", "--admin-port", admin)
    assert restarted.returncode == 0, restarted.stderr
    wait_connected(admin)
    assert saved(cli, "client.json")["allow"] == "22, 8000-8100"
    again = cli.client("start", "--allow", "22,8000-8100")
    assert again.returncode == 0, again.stderr
    assert "already with these options" in again.stdout


@pytest.mark.timeout(120)
def test_client_start_with_pool_count_saves_it_applies_zero_and_names_another_as_not_applied(cli):
    relay = cli.start_relay()
    admin = free_port()
    cli.start_client(relay, "A", admin, extra=("--pool-count", "0"))  # 0 is a value, not "not given"
    assert saved(cli, "client.json")["poolCount"] == 0
    assert cli.worker("client")["options"]["--pool-count"] == 0  # what the running client uses

    same = cli.client("start", "--pool-count", "0")
    assert same.returncode == 0, same.stderr
    assert "already with these options" in same.stdout
    changed = cli.client("start", "--pool-count", "4")
    assert not_applied_lines(changed) == ["--pool-count 4 (running: 0)"]
    assert saved(cli, "client.json")["poolCount"] == 0


@pytest.mark.timeout(120)
def test_relay_start_with_new_options_names_them_and_a_foreground_copy_saves_no_token(cli):
    port = cli.start_relay()
    same = cli.server("start", "--host", HOST, "--port", port, "--token", TOKEN)
    assert same.returncode == 0, same.stderr
    assert one_line(same.stdout).startswith(f"chuantou server is already running (pid ")
    assert "already with these options" in same.stdout

    table = cli.root / "crontab.txt"
    fake_crontab(cli.bin_dir, table)
    boot = cli.server("start", "--host", HOST, "--port", port, "--autostart")  # the one live-applicable option
    assert boot.returncode == 0, boot.stderr
    assert "already with these options" in boot.stdout and "autostart: added to your crontab: @reboot" in boot.stdout
    assert f"--port {port}" in table.read_text()

    other_port = free_tcp_udp_port()
    changed = cli.server("start", "--port", other_port, "--heartbeat-timeout", "20", "--token", OTHER_TOKEN,
                         "--no-auth")
    assert not_applied_lines(changed) == [
        f"--port {other_port} (running: {port})",
        "--heartbeat-timeout 20 (running: 25)",
        "--token (running with another token)",
        "--no-auth on (running: off)",
    ]
    assert changed.stderr.splitlines()[-1] == "to apply them: python -m chuantou_server stop, then run this start again"
    assert OTHER_TOKEN not in changed.stderr

    foreground = cli.server("--port", other_port, "--token", OTHER_TOKEN, timeout=20)
    assert foreground.returncode == 1
    assert "--token (running with another token)" in foreground.stderr
    assert saved(cli, "server.json")["token"] == TOKEN  # the new token was not saved behind the user's back


@pytest.mark.timeout(120)
def test_a_start_that_fails_keeps_none_of_its_options(cli):
    port = cli.start_relay()
    admin = free_port()
    cli.start_client(port, "A", admin)
    assert cli.client("stop").returncode == 0
    before = saved(cli, "client.json")

    refused = cli.client("start", "--token", OTHER_TOKEN, "--allow", "22")
    assert refused.returncode == 1 and "the relay refused registration" in refused.stderr
    assert saved(cli, "client.json") == before  # the wrong token and --allow were not kept

    retry = cli.client("start")  # the saved, right token still works
    assert retry.returncode == 0, retry.stderr
    wait_connected(admin)

    assert cli.server("stop").returncode == 0
    relay_before = saved(cli, "server.json")
    with socket.socket() as squatter:  # another program took the relay's port meanwhile
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind((HOST, port))
        squatter.listen()
        busy = cli.server("start", "--host", HOST, "--port", port, "--token", OTHER_TOKEN, timeout=30)
    assert busy.returncode == 1 and "did not start" in busy.stderr
    assert saved(cli, "server.json") == relay_before


@pytest.mark.timeout(60)
def test_a_running_instance_that_recorded_no_options_is_not_assumed_to_use_them(cli):
    files = cli.files("server")
    files.state_dir.mkdir(parents=True, exist_ok=True)
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as older:
        try:  # what a worker of the previous version leaves: no "options"
            service.write_json(files.worker_file, {"pid": older.pid, "port": 8200, "host": HOST})
            plain = cli.server("start")
            assert plain.returncode == 0 and "already running" in plain.stdout
            given = cli.server("start", "--port", 8300)
            assert given.returncode == 1
            assert "it predates option checks, so these options were not applied: --port" in given.stderr
        finally:
            service.remove(files.worker_file)
            older.kill()
