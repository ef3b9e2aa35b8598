"""The command line as users run it: real ``python -m chuantou_server`` / ``chuantou_client``
processes, each test in its own XDG directories, on ports found free at run time.

Covers running in the foreground, start/status/stop/logs of the background service, proxies
created, used and deleted through the running client, restarts (stop/start, SIGKILL of a
worker) and the local API's refusals."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import stat
import time

import pytest

from cli_support import (  # noqa: F401 (cli is a fixture)
    cli,
    CLIENT,
    HOST,
    SERVER,
    TOKEN,
    api_headers,
    api_status,
    fetch,
    free_tcp_udp_port,
    one_line,
    pid_alive,
    wait_connected,
    wait_fetch,
)
from helpers import free_port, text_service, wait_until

WEB_TEXT = b"This is client B's web service"


@pytest.fixture
def web(services):
    """The HTTP service on B's side that proxies lead to."""
    return services(text_service(WEB_TEXT))


def relay_url(port: int) -> str:
    return f"ws://{HOST}:{port}"


def file_mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def start_pair(cli) -> tuple[int, int, int]:
    """A relay, client A (default config) and client B (config b.json); returns their ports."""
    relay = cli.start_relay()
    a_admin, b_admin = free_port(), free_port()
    cli.start_client(relay, "A", a_admin)
    cli.start_client(relay, "B", b_admin, config=cli.root / "b.json")
    return relay, a_admin, b_admin


def create_proxy(cli, local: int, target_port: int, *extra) -> str:
    result = cli.client("proxy", "create", "--local-port", local, "--target-client", "B",
                        "--target-port", target_port, *extra)
    assert result.returncode == 0, result.stderr
    return result.stdout


# --- foreground ------------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_foreground_server_and_two_clients_stop_cleanly_on_sigterm_and_ctrl_c(cli):
    port = free_tcp_udp_port()
    server = cli.popen(SERVER, "--host", HOST, "--port", port, "--token", TOKEN)
    worker = cli.wait_worker("server")
    assert (worker["pid"], worker["port"]) == (server.pid, port)

    clients = {}
    for name in ("A", "B"):
        config, admin = cli.root / f"{name.lower()}.json", free_port()
        proc = cli.popen(CLIENT, "--server", relay_url(port), "--client-id", name, "--admin-port", admin,
                         "--token", TOKEN, "--config", config)
        clients[name] = (proc, config, admin)
    for name, (proc, config, admin) in clients.items():
        worker = cli.wait_worker("client", config)
        assert (worker["pid"], worker["clientId"], worker["adminPort"]) == (proc.pid, name, admin)
        wait_connected(admin)

    listed = cli.client("clients", "--config", clients["A"][1])  # --config picks which running client
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines() == ["A  (this client)", "B"]
    status = cli.server("status")
    assert status.returncode == 0, status.stdout + status.stderr
    assert "clients:    2" in status.stdout and "running in the foreground" in status.stdout

    a, b = clients["A"][0], clients["B"][0]
    a.send_signal(signal.SIGTERM)
    b.send_signal(signal.SIGINT)  # Ctrl-C
    for name, (proc, config, _) in clients.items():
        assert proc.wait(15) == 0, cli.output(proc)
        assert not cli.files("client", config).worker_file.exists()
        assert "Traceback" not in cli.output(proc)
    server.send_signal(signal.SIGTERM)
    assert server.wait(15) == 0, cli.output(server)
    assert not cli.files("server").worker_file.exists()
    assert "relay on port" in cli.output(server) and "stopped" in cli.output(server)


# --- the background service ------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_server_start_status_logs_stop(cli):
    files = cli.files("server")
    status = cli.server("status")
    assert status.returncode == 1
    assert "chuantou server is not running" in one_line(status.stdout + status.stderr)
    stop = cli.server("stop")
    assert (stop.returncode, stop.stdout.strip()) == (0, "chuantou server is not running")

    port = free_tcp_udp_port()
    start = cli.server("start", "--host", HOST, "--port", port, "--token", TOKEN)
    assert start.returncode == 0, start.stderr
    assert f"listening on port {port}" in start.stdout
    assert f"log: {files.log_file}" in start.stdout
    supervisor_pid = int(files.pid_file.read_text())
    worker = cli.worker("server")
    assert worker["port"] == port and worker["pid"] != supervisor_pid

    again = cli.server("start", "--host", HOST, "--port", port)
    assert again.returncode == 0, again.stderr
    assert "already running" in again.stdout and f"pid {supervisor_pid}" in again.stdout  # as "started" said

    status = cli.server("status")
    assert status.returncode == 0, status.stdout + status.stderr
    assert f"port:       {port}" in status.stdout
    assert "clients:    0" in status.stdout
    assert f"supervisor: pid {supervisor_pid}, restarts 0" in status.stdout

    logs = cli.server("logs", "-n", "20")
    assert logs.returncode == 0 and f"listening on {HOST}:{port}" in logs.stdout
    saved = cli.config_dir / "server.json"  # holds the token: owner-only
    assert json.loads(saved.read_text())["token"] == TOKEN
    assert file_mode(saved) == 0o600

    stop = cli.server("stop")
    assert stop.returncode == 0, stop.stderr
    assert f"chuantou server stopped (pid {supervisor_pid})" in stop.stdout
    assert not pid_alive(supervisor_pid) and not pid_alive(worker["pid"])
    for path in (files.pid_file, files.worker_file, files.supervisor_file):
        assert not path.exists(), path
    assert cli.server("status").returncode == 1


@pytest.mark.timeout(60)
def test_client_start_status_logs_stop(cli):
    status = cli.client("status")
    assert status.returncode == 1
    line = one_line(status.stdout + status.stderr)
    assert "chuantou client is not running" in line and "python -m chuantou_client start" in line
    stop = cli.client("stop")
    assert (stop.returncode, stop.stdout.strip()) == (0, "chuantou client is not running")

    relay = cli.start_relay()
    admin = free_port()
    cli.start_client(relay, "A", admin)
    worker = cli.worker("client")
    supervisor_pid = int(cli.files("client").pid_file.read_text())
    again = cli.client("start", "--admin-port", admin)
    assert again.returncode == 0, again.stderr
    assert "already running" in again.stdout and f"pid {supervisor_pid}" in again.stdout

    status = cli.client("status")
    assert status.returncode == 0, status.stdout + status.stderr
    config = cli.config_dir / "client.json"
    for expected in ("client ID:  A", f"relay:      {relay_url(relay)}", "state:      connected",
                     "restarts 0", f"page:       http://127.0.0.1:{admin}/", f"config:     {config}",
                     "NAT:        ", "Path:       auto (TCP and UDP; direct attempts wait at most 1 s)"):
        assert expected in status.stdout
    saved = json.loads(config.read_text())
    assert (saved["clientId"], saved["server"], saved["token"]) == ("A", relay_url(relay), TOKEN)
    assert file_mode(config) == 0o600
    assert "clients:    1" in cli.server("status").stdout
    logs = cli.client("logs", "-n", "50")
    assert logs.returncode == 0 and "registered with relay" in logs.stdout

    stop = cli.client("stop")
    assert stop.returncode == 0 and "chuantou client stopped" in stop.stdout
    assert not pid_alive(worker["pid"]) and not cli.files("client").worker_file.exists()
    assert cli.client("stop").stdout.strip() == "chuantou client is not running"
    assert cli.client("status").returncode == 1


@pytest.mark.timeout(60)
def test_start_on_a_busy_port_fails_promptly_with_the_reason(cli):
    with socket.socket() as busy:
        busy.bind((HOST, 0))
        busy.listen()
        port = busy.getsockname()[1]
        start = cli.server("start", "--host", HOST, "--port", port, "--token", TOKEN, timeout=15)
        assert start.returncode == 1
        assert start.stderr.startswith("error: ") and "Address already in use" in start.stderr
        assert cli.supervisor("server") is None and not cli.files("server").pid_file.exists()

        start = cli.client("start", "--admin-port", port, timeout=15)
        assert start.returncode == 1
        assert f"admin port {port} is already in use" in start.stderr
        assert not cli.files("client").pid_file.exists()


@pytest.mark.timeout(30)
def test_logs_shows_the_last_lines_and_follows_new_ones(cli):
    log_file = cli.files("client").log_file
    missing = cli.client("logs")
    assert missing.returncode == 1 and str(log_file) in one_line(missing.stdout + missing.stderr)

    log_file.parent.mkdir(parents=True)
    log_file.write_text("".join(f"line {i}\n" for i in range(1, 6)))
    tail = cli.client("logs", "-n", "2")
    assert (tail.returncode, tail.stdout) == (0, "line 4\nline 5\n")

    follower = cli.popen(CLIENT, "logs", "-f", "-n", "1")
    wait_until(lambda: "line 5" in cli.output(follower), 10, message="logs -f printed the last line")
    with open(log_file, "a") as log:
        log.write("line 6, written later\n")
    wait_until(lambda: "line 6, written later" in cli.output(follower), 10, message="logs -f printed the new line")
    follower.send_signal(signal.SIGINT)  # Ctrl-C ends it quietly
    assert follower.wait(10) == 0
    assert "Traceback" not in cli.output(follower)


# --- proxies ---------------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_proxy_create_list_delete_round_trip_with_traffic(cli, web):
    relay = cli.start_relay()
    a_admin, b_admin = free_port(), free_port()
    cli.start_client(relay, "A", a_admin)
    b_config = cli.root / "b.json"
    # B is given no --server: CHUANTOU_SERVER says where the relay is
    b = cli.start_client(None, "B", b_admin, config=b_config, env={"CHUANTOU_SERVER": relay_url(relay)})
    assert b["serverUrl"] == relay_url(relay)

    empty = cli.client("proxy", "list")
    assert empty.returncode == 0 and "no proxies" in empty.stdout

    local = free_tcp_udp_port()
    out = create_proxy(cli, local, web.port)
    assert out.splitlines()[0] == f"proxy created: localhost:{local} -> B:{web.port}"
    assert f"localhost:{local}" in out.splitlines()[1]
    assert fetch(local) == WEB_TEXT

    listing = cli.client("proxy", "list")
    assert listing.returncode == 0, listing.stderr
    header, row = listing.stdout.splitlines()[:2]  # then the running sessions, if any still are
    assert header.split() == ["LOCAL", "TARGET", "PROTOCOL", "SEALED", "LIMIT", "ACTIVE", "WARM", "SENT", "RECEIVED",
                              "PATHS"]
    assert row.split()[:5] == [f"localhost:{local}", f"B:{web.port}", "both", "yes", "unlimited"]
    assert row.split()[-3:-1] != ["0", "B"]  # bytes came back through it
    limited = free_tcp_udp_port()
    create_proxy(cli, limited, web.port, "--bandwidth", "10MiB/s")
    assert f"localhost:{limited} B:{web.port} both yes 10MiB/s" in " ".join(cli.client("proxy", "list").stdout.split())
    assert cli.client("proxy", "delete", "--local-port", limited).returncode == 0

    conflict = cli.client("proxy", "create", "--local-port", local, "--target-client", "B", "--target-port", web.port)
    assert conflict.returncode == 1 and conflict.stdout == ""
    assert one_line(conflict.stderr) == f"error: port {local} is already in use; choose another with --local-port"
    with socket.socket() as other_program:
        other_program.bind((HOST, 0))
        other_program.listen()
        taken = other_program.getsockname()[1]
        conflict = cli.client("proxy", "create", "--local-port", taken, "--target-client", "B",
                              "--target-port", web.port, "--protocol", "tcp")
    assert conflict.returncode == 1
    assert one_line(conflict.stderr) == f"error: port {taken} is already in use; choose another with --local-port"

    clients = cli.client("clients")
    assert clients.returncode == 0 and clients.stdout.splitlines() == ["A  (this client)", "B"]
    assert cli.client("clients", "--config", b_config).stdout.splitlines() == ["A", "B  (this client)"]

    # a proxy set for the user's web browsing must not capture the CLI's calls to 127.0.0.1
    nowhere = f"http://{HOST}:{free_port()}"
    proxied = {"http_proxy": nowhere, "HTTP_PROXY": nowhere}
    assert cli.client("proxy", "list", env=proxied).returncode == 0
    server_status = cli.server("status", env=proxied)
    assert server_status.returncode == 0, server_status.stdout

    delete = cli.client("proxy", "delete", "--local-port", local)
    assert delete.returncode == 0, delete.stderr
    assert delete.stdout.strip() == f"proxy deleted: localhost:{local} -> B:{web.port}"
    assert fetch(local, timeout=2) is None
    assert "no proxies" in cli.client("proxy", "list").stdout
    assert json.loads((cli.config_dir / "client.json").read_text())["proxies"] == []
    again = cli.client("proxy", "delete", "--local-port", local)
    assert again.returncode == 1 and one_line(again.stderr) == f"error: no proxy on local port {local}"


@pytest.mark.timeout(60)
def test_a_refusal_by_the_target_shows_in_proxy_list(cli, web):
    relay = cli.start_relay()
    cli.start_client(relay, "B", free_port(), config=cli.root / "b.json", extra=("--allow", web.port))
    cli.start_client(relay, "A", free_port())
    local = free_tcp_udp_port()
    create_proxy(cli, local, web.port + 1 if web.port < 65535 else web.port - 1)
    assert fetch(local, timeout=3) is None  # B refuses the port; the user's connection is closed

    def listing():
        out = cli.client("proxy", "list").stdout
        return out if "last failure" in out else None

    out = wait_until(listing, 10, message="the refusal to show in proxy list")
    assert f"localhost:{local}: last failure" in out
    assert "is not allowed by the target client" in out


@pytest.mark.timeout(60)
def test_client_restarted_keeps_its_id_and_its_proxies(cli, web):
    relay = cli.start_relay()
    cli.start_client(relay, "B", free_port(), config=cli.root / "b.json")
    admin = free_port()
    first = cli.start_client(relay, None, admin)  # no --client-id: one is generated and saved
    client_id = first["clientId"]
    local = free_port()
    create_proxy(cli, local, web.port, "--protocol", "tcp")
    assert fetch(local) == WEB_TEXT

    config = cli.config_dir / "client.json"
    saved = json.loads(config.read_text())
    assert saved["clientId"] == client_id
    assert saved["proxies"] == [{"localPort": local, "targetClient": "B", "targetPort": web.port, "protocol": "tcp"}]
    assert file_mode(config) == 0o600

    assert cli.client("stop").returncode == 0
    assert fetch(local, timeout=2) is None
    start = cli.client("start", "--admin-port", admin)  # relay URL, ID, token and proxy all come from the file
    assert start.returncode == 0, start.stderr
    assert f"chuantou client {client_id} started" in start.stdout
    assert wait_connected(admin)["clientId"] == client_id
    wait_fetch(local, WEB_TEXT)
    assert f"localhost:{local}" in cli.client("proxy", "list").stdout


# --- crashes ---------------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_sigkill_of_the_client_worker_restarts_it_with_its_id_and_proxy(cli, web):
    relay, a_admin, _ = start_pair(cli)
    local = free_port()
    create_proxy(cli, local, web.port, "--protocol", "tcp")
    assert fetch(local) == WEB_TEXT

    killed = cli.worker("client")
    os.kill(killed["pid"], signal.SIGKILL)
    restarted = cli.wait_worker("client", other_than=killed["pid"], timeout=10)
    assert restarted["clientId"] == "A" and restarted["adminPort"] == a_admin
    wait_connected(a_admin)
    wait_fetch(local, WEB_TEXT)
    status = cli.client("status")
    assert status.returncode == 0
    assert "client ID:  A" in status.stdout and "restarts 1" in status.stdout


@pytest.mark.timeout(60)
def test_sigkill_of_the_server_worker_restarts_it_and_clients_come_back(cli, web):
    relay, a_admin, b_admin = start_pair(cli)
    local = free_port()
    create_proxy(cli, local, web.port, "--protocol", "tcp")
    assert fetch(local) == WEB_TEXT

    killed = cli.worker("server")
    os.kill(killed["pid"], signal.SIGKILL)
    restarted = cli.wait_worker("server", other_than=killed["pid"], timeout=10)
    assert restarted["port"] == relay
    def reconnected(admin: int) -> bool:
        status = api_status(admin) or {}
        return status.get("reconnects", 0) >= 1 and status.get("state") == "connected"

    for admin in (a_admin, b_admin):
        wait_until(lambda: reconnected(admin), 20, message=f"client on admin port {admin} registered again")
    wait_fetch(local, WEB_TEXT)
    status = cli.server("status")
    assert status.returncode == 0, status.stdout
    assert "restarts 1" in status.stdout and "clients:    2" in status.stdout


# --- errors users meet -----------------------------------------------------------------------

@pytest.mark.parametrize("args", [
    ["proxy", "list"],
    ["proxy", "create", "--local-port", "9090", "--target-client", "B", "--target-port", "8080"],
    ["proxy", "delete", "--local-port", "9090"],
    ["clients"],
])
def test_api_commands_without_a_running_client_say_how_to_start_one(cli, args):
    result = cli.client(*args)
    assert result.returncode == 1 and result.stdout == ""
    line = one_line(result.stderr)
    assert line.startswith("error: no chuantou client is running") and "python -m chuantou_client start" in line


@pytest.mark.parametrize("module, args", [
    (SERVER, ["--port", "abc"]),
    (SERVER, ["--log-level", "loud"]),
    (SERVER, ["restart"]),
    (CLIENT, ["proxy"]),
    (CLIENT, ["proxy", "create", "--local-port", "9090"]),
    (CLIENT, ["proxy", "create", "--local-port", "x", "--target-client", "B", "--target-port", "80"]),
    (CLIENT, ["proxy", "create", "--local-port", "9090", "--target-client", "B", "--target-port", "80",
              "--protocol", "sctp"]),
])
def test_bad_usage_exits_2_with_the_usage(cli, module, args):
    result = cli.run(module, *args)
    assert result.returncode == 2
    assert result.stderr.startswith("usage: ") and "error: " in result.stderr


@pytest.mark.timeout(30)
def test_local_api_refuses_foreign_host_cross_origin_bad_json_and_bad_ports(cli):
    admin = free_port()
    proc = cli.popen(CLIENT, "--server", relay_url(free_port()), "--admin-port", admin, "--config", cli.root / "a.json")
    wait_until(lambda: api_status(admin), 15, message="the client's local API answers")

    def request(method, path, body=None, headers=None):
        conn = http.client.HTTPConnection(HOST, admin, timeout=5)
        try:
            conn.request(method, path, body=body, headers={**api_headers(admin), **(headers or {})})
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read() or b"null")
        finally:
            conn.close()

    as_json = {"Content-Type": "application/json"}
    proxy = json.dumps({"localPort": free_port(), "targetClient": "B", "targetPort": 8080})
    assert request("GET", "/api/status")[0] == 200
    for host in ("evil.example", f"evil.example:{admin}"):
        status, reply = request("GET", "/api/status", headers={"Host": host})
        assert status == 403 and "refused" in reply["error"]
    status, reply = request("POST", "/api/proxies", proxy, {**as_json, "Origin": "http://evil.example"})
    assert status == 403 and "cross-origin" in reply["error"]
    status, reply = request("POST", "/api/proxies", '{"localPort": 9090, ', as_json)
    assert status == 400 and "not valid JSON" in reply["error"]
    for key in ("localPort", "targetPort"):
        for bad in (0, 70000, "http"):
            body = json.dumps({**json.loads(proxy), key: bad})
            status, reply = request("POST", "/api/proxies", body, {**as_json, "Origin": f"http://127.0.0.1:{admin}"})
            assert status == 400 and f"{key} must be a port number 1-65535" in reply["error"], reply
    assert request("GET", "/api/proxies") == (200, {"proxies": []})

    # its relay is down and it is still in its first seconds: SIGTERM must not wait for those to pass
    asked = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0
    assert time.monotonic() - asked < 3.0


@pytest.mark.parametrize("module, args", [
    ("chuantou_server", ("token",)), ("chuantou_server", ("status",)), ("chuantou_client", ("status",)),
    ("chuantou_server", ("logs",)), ("chuantou_client", ("proxy", "list")),
])
def test_a_command_whose_reader_goes_away_exits_quietly(cli, module, args):
    """``token | head -n 1``: a reader that closes the pipe before the command writes."""
    import subprocess
    import sys

    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first byte: the write gets EPIPE, every time
    try:
        done = subprocess.run([sys.executable, "-m", module, *args], env=cli.env, cwd=cli.root,
                              stdin=subprocess.DEVNULL, stdout=write_end, stderr=subprocess.PIPE,
                              text=True, timeout=30)
    finally:
        os.close(write_end)
    assert "Traceback" not in done.stderr and "BrokenPipeError" not in done.stderr, done.stderr
    assert done.returncode in (1, 141), done.returncode  # 141: as SIGPIPE ends other tools; 1: its own error
