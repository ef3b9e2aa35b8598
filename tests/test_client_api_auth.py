"""The client's local API needs its secret (issue 9 items 10 and 16): a per-client secret kept
in the state directory with mode 0600, sent by the CLI as X-Chuantou-Key; one-time login links
that buy a browser an expiring, revocable session cookie named after the port; and short
tokens refused without echo. Real clients and relays on 127.0.0.1 port 0, spoken to over HTTP."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import stat
import subprocess
import sys
from urllib.parse import urlsplit

import pytest

from chuantou_client import apiauth
from chuantou_client.app import ClientApp
from common.config import ConfigError

from admin_support import client_app, relay  # noqa: F401 (fixtures)
from cli_support import CLIENT, TOKEN, cli, wait_connected  # noqa: F401 (cli is a fixture)
from helpers import free_port, http_json, wait_until

DEADLINE = 10.0
SHORT_TOKEN = "tiny-Tok3n"  # 10 characters: refused
FIX_WORDS = ("run the CLI as the user who started the client", "login-link")


# --- helpers ----------------------------------------------------------------------------------

def secret_of(app) -> str:
    return app.admin.secret_path.read_text().strip()


def key(app) -> dict:
    return {"X-Chuantou-Key": secret_of(app)}


def proxy_body(local_port: int) -> dict:
    return {"localPort": local_port, "targetClient": "B", "targetPort": 8080, "protocol": "tcp"}


def login_path(app) -> str:
    link = urlsplit(app.admin.login_link())
    return f"{link.path}?{link.query}"


def log_in(app) -> str:
    """Use a fresh login link; return the session cookie's "name=value"."""
    status, response, _ = http_json(app.admin.port, "GET", login_path(app))
    assert status == 303 and response.getheader("Location") == "/"
    return response.getheader("Set-Cookie").split(";", 1)[0]


def assert_refused(status: int, payload) -> None:
    assert status == 401, payload
    assert all(words in payload["error"] for words in FIX_WORDS), payload


# --- the secret -------------------------------------------------------------------------------

@pytest.mark.timeout(30)
def test_without_the_secret_list_create_and_delete_are_refused(client_app):
    port = client_app.admin.port
    kept = free_port()
    assert http_json(port, "POST", "/api/proxies", key(client_app), proxy_body(kept))[0] == 201

    for method, path, body in (("GET", "/api/proxies", None), ("GET", "/api/status", None),
                               ("POST", "/api/proxies", proxy_body(free_port())),
                               ("DELETE", f"/api/proxies/{kept}", None), ("POST", "/api/login-link", None),
                               ("GET", "/api/clients", None), ("GET", "/api/connections", None)):
        status, _, payload = http_json(port, method, path, body=body)
        assert_refused(status, payload)
    assert [p.local_port for p in client_app.client.proxies] == [kept]  # nothing created, nothing deleted
    assert [e["localPort"] for e in client_app.settings["proxies"]] == [kept]


@pytest.mark.timeout(30)
def test_a_wrong_secret_is_refused(client_app):
    port, secret = client_app.admin.port, secret_of(client_app)
    for wrong in ("", "x", secret[:-1], secret + "x", secret.upper(), "é" * len(secret), "wrong " * 10):
        status, _, payload = http_json(port, "GET", "/api/proxies", {"X-Chuantou-Key": wrong})
        assert_refused(status, payload)
        assert secret not in json.dumps(payload)
    # A good cookie does not rescue a wrong key: the key, when sent, decides.
    cookie = log_in(client_app)
    assert http_json(port, "GET", "/api/proxies", {"X-Chuantou-Key": "wrong", "Cookie": cookie})[0] == 401


@pytest.mark.timeout(30)
def test_the_right_secret_lists_creates_and_deletes(client_app):
    port, local = client_app.admin.port, free_port()
    status, _, payload = http_json(port, "POST", "/api/proxies", key(client_app), proxy_body(local))
    assert status == 201, payload
    status, _, payload = http_json(port, "GET", "/api/proxies", key(client_app))
    assert status == 200 and [p["localPort"] for p in payload["proxies"]] == [local]
    status, _, payload = http_json(port, "DELETE", f"/api/proxies/{local}", key(client_app))
    assert status == 200 and "deleted" in payload["message"]
    assert not client_app.client.proxies


@pytest.mark.timeout(30)
def test_the_page_and_its_files_show_only_a_login_page_without_a_session(client_app):
    port = client_app.admin.port
    status, _, body = http_json(port, "GET", "/")
    assert status == 200 and 'id="key"' in body and "login-link" in body and "proxies" not in body
    assert http_json(port, "GET", "/static/client.js")[0] == 200  # public code, no data
    status, _, body = http_json(port, "GET", "/", key(client_app))
    assert status == 200 and 'id="proxies"' in body


def test_the_secret_file_is_private_and_reused(tmp_path):
    path = tmp_path / "state" / "client.api-secret"
    old_umask = os.umask(0)  # even a careless umask gives a private file
    try:
        secret = apiauth.load_or_create_secret(path)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(secret) >= 32 and path.read_text().strip() == secret
    assert apiauth.load_or_create_secret(path) == secret  # reused, not replaced
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left

    path.chmod(0o644)  # someone loosened it: made private again
    assert apiauth.load_or_create_secret(path) == secret
    assert stat.S_IMODE(path.stat().st_mode) == 0o600

    path.write_text("short\n")  # not one we wrote: a new secret
    fresh = apiauth.load_or_create_secret(path)
    assert fresh != secret and len(fresh) >= 32 and stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest.mark.timeout(30)
def test_a_client_app_makes_its_secret_on_first_start_and_keeps_it(relay, tmp_path):
    secret_file = tmp_path / "state" / "client.api-secret"
    options = {"server": f"ws://127.0.0.1:{relay.port}", "clientId": "A", "adminPort": 0}
    first = ClientApp(tmp_path / "client.json", options, api_secret_path=secret_file)
    assert not secret_file.exists()  # made when the API starts, not when a CLI only checks options
    with_app = first.start()
    try:
        secret = secret_of(with_app)
        assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    finally:
        first.stop()
    second = ClientApp(tmp_path / "client.json", options, api_secret_path=secret_file).start()
    try:
        assert secret_of(second) == secret
        assert http_json(second.admin.port, "GET", "/api/status", {"X-Chuantou-Key": secret})[0] == 200
    finally:
        second.stop()


# --- the browser's way in ---------------------------------------------------------------------

@pytest.mark.timeout(30)
def test_a_login_link_works_once_and_sets_a_strict_cookie_named_after_the_port(client_app):
    port = client_app.admin.port
    path = login_path(client_app)
    assert path.startswith("/login?key=") and secret_of(client_app) not in path  # a code, not the secret
    assert http_json(port, "HEAD", path)[0] == 405  # a HEAD or a prefetch does not use the code up
    assert http_json(port, "GET", path, {"Sec-Purpose": "prefetch"})[0] == 405

    status, response, _ = http_json(port, "GET", path)
    assert status == 303 and response.getheader("Location") == "/"
    cookie = response.getheader("Set-Cookie")
    name, _, value = cookie.split(";", 1)[0].partition("=")
    assert name == f"chuantou_client_{port}" and len(value) >= 32
    attributes = [a.strip() for a in cookie.split(";")[1:]]
    assert {"HttpOnly", "SameSite=Strict", "Path=/"} <= set(attributes)
    assert any(re.fullmatch(r"Max-Age=\d+", a) for a in attributes)
    assert not any(a.lower().startswith("domain") for a in attributes)

    assert http_json(port, "GET", "/api/status", {"Cookie": f"{name}={value}"})[0] == 200
    status, response, body = http_json(port, "GET", path)  # the second use
    assert status == 401 and response.getheader("Set-Cookie") is None and "login-link" in body
    # The same value under another port's name is not this API's session.
    assert http_json(port, "GET", "/api/status", {"Cookie": f"chuantou_client_{port + 1}={value}"})[0] == 401
    assert http_json(port, "GET", "/api/status", {"Cookie": f"{name}=forged-session-id"})[0] == 401
    status, _, body = http_json(port, "GET", "/login?key=never-issued")
    assert status == 401 and "used up, expired or wrong" in body


@pytest.mark.timeout(30)
def test_the_api_hands_out_fresh_links_to_the_secret_holder(client_app):
    port = client_app.admin.port
    status, _, payload = http_json(port, "POST", "/api/login-link", key(client_app))
    assert status == 200 and payload["url"].startswith(f"http://127.0.0.1:{port}/login?key=")
    link = urlsplit(payload["url"])
    assert http_json(port, "GET", f"{link.path}?{link.query}")[0] == 303
    status, _, payload = http_json(port, "POST", "/api/login-link",
                                   {**key(client_app), "Origin": "http://evil.example"})
    assert status == 403  # state-changing: another site's page may not ask


@pytest.mark.timeout(30)
def test_logout_revokes_the_session(client_app):
    port = client_app.admin.port
    cookie, other = log_in(client_app), log_in(client_app)
    status, response, _ = http_json(port, "POST", "/logout", {"Cookie": cookie})
    assert status == 200 and "Max-Age=0" in response.getheader("Set-Cookie")
    status, _, payload = http_json(port, "GET", "/api/status", {"Cookie": cookie})  # the old value, replayed
    assert_refused(status, payload)
    assert http_json(port, "GET", "/api/status", {"Cookie": other})[0] == 200  # another browser stays in


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.timeout(30)
def test_sessions_and_login_codes_expire(relay, tmp_path):
    clock = FakeClock()
    app = ClientApp(tmp_path / "client.json", {"server": f"ws://127.0.0.1:{relay.port}", "clientId": "A",
                                                "adminPort": 0}, api_secret_path=tmp_path / "client.api-secret")
    app.admin.auth = apiauth.ApiAuth("s" * 43, idle=60, lifetime=300, code_lifetime=30, clock=clock)
    app.start()
    try:
        port = app.admin.port
        cookie = log_in(app)
        clock.now += 59
        assert http_json(port, "GET", "/api/status", {"Cookie": cookie})[0] == 200  # used: idle time restarts
        clock.now += 61
        assert http_json(port, "GET", "/api/status", {"Cookie": cookie})[0] == 401  # idle too long

        cookie = log_in(app)
        for _ in range(6):  # in use all along, but past its lifetime
            clock.now += 55
            status = http_json(port, "GET", "/api/status", {"Cookie": cookie})[0]
        assert status == 401

        stale = login_path(app)
        clock.now += 31
        status, _, body = http_json(port, "GET", stale)  # a link left lying around for too long
        assert status == 401 and "expired" in body
        assert http_json(port, "GET", "/api/status", {"X-Chuantou-Key": "s" * 43})[0] == 200  # the secret never does
    finally:
        app.stop()


# --- tokens -----------------------------------------------------------------------------------

def test_a_short_token_is_refused_without_echo(relay, tmp_path, monkeypatch):
    monkeypatch.delenv("CHUANTOU_TOKEN", raising=False)
    config_path = tmp_path / "client.json"
    options = {"server": f"ws://127.0.0.1:{relay.port}", "clientId": "A", "adminPort": 0}
    with pytest.raises(ConfigError) as refused:
        ClientApp(config_path, {**options, "token": SHORT_TOKEN}, api_secret_path=tmp_path / "s")
    message = str(refused.value)
    assert "--token" in message and "too short" in message and "16" in message and SHORT_TOKEN not in message
    assert not config_path.exists()  # nothing saved

    monkeypatch.setenv("CHUANTOU_TOKEN", SHORT_TOKEN)
    with pytest.raises(ConfigError, match=r"\$CHUANTOU_TOKEN is too short") as refused:
        ClientApp(config_path, options, api_secret_path=tmp_path / "s")
    assert SHORT_TOKEN not in str(refused.value)
    monkeypatch.delenv("CHUANTOU_TOKEN")

    config_path.write_text(json.dumps({"token": SHORT_TOKEN}))
    with pytest.raises(ConfigError) as refused:
        ClientApp(config_path, options, api_secret_path=tmp_path / "s")
    assert str(config_path) in str(refused.value) and SHORT_TOKEN not in str(refused.value)
    # A good --token replaces the saved short one.
    app = ClientApp(config_path, {**options, "token": TOKEN}, api_secret_path=tmp_path / "s")
    assert app.token == TOKEN and json.loads(config_path.read_text())["token"] == TOKEN


@pytest.mark.timeout(60)
def test_the_cli_refuses_a_short_token_and_its_help_warns_of_cmdline(cli):
    for args in (("start", "--token", SHORT_TOKEN), ("--token", SHORT_TOKEN)):  # background and foreground
        result = cli.client(*args, "--server", "ws://127.0.0.1:1", "--admin-port", free_port())
        assert result.returncode == 1, result.stdout + result.stderr
        assert "--token is too short" in result.stderr
        assert SHORT_TOKEN not in result.stdout + result.stderr
    assert not (cli.config_dir / "client.json").exists()
    help_text = " ".join(cli.client("start", "--help").stdout.split())
    assert "/proc/PID/cmdline" in help_text and "CHUANTOU_TOKEN" in help_text


# --- the CLI ----------------------------------------------------------------------------------

@pytest.mark.timeout(120)
def test_the_cli_sends_the_secret_and_start_prints_a_one_time_link(cli):
    relay_port = cli.start_relay()
    admin = free_port()
    result = cli.client("start", "--server", f"ws://127.0.0.1:{relay_port}", "--client-id", "A",
                        "--admin-port", admin, "--token", TOKEN)
    assert result.returncode == 0, result.stdout + result.stderr
    wait_connected(admin)
    secret_file = cli.state_dir / "client.api-secret"
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    secret = secret_file.read_text().strip()
    [link] = re.findall(rf"log in to the page \(once\) at: (http://127\.0\.0\.1:{admin}/login\?key=\S+)",
                        result.stdout)
    assert secret not in result.stdout
    assert "key=" not in cli.files("client").log_file.read_text()  # the link went to the terminal, not the log

    assert http_json(admin, "GET", "/api/proxies")[0] == 401  # anyone else on this machine
    local = free_port()
    created = cli.client("proxy", "create", "--local-port", local, "--target-client", "A", "--target-port", 9)
    assert created.returncode == 0, created.stderr
    listed = cli.client("proxy", "list")
    assert listed.returncode == 0 and f":{local}" in listed.stdout
    assert cli.client("status", "--admin-port", admin).returncode == 0  # found by its port alone

    first = urlsplit(link)
    assert http_json(admin, "GET", f"{first.path}?{first.query}")[0] == 303
    assert http_json(admin, "GET", f"{first.path}?{first.query}")[0] == 401  # once
    fresh = cli.client("login-link")
    assert fresh.returncode == 0, fresh.stderr
    second = urlsplit(fresh.stdout.strip())
    assert second.query != first.query and http_json(admin, "GET", f"{second.path}?{second.query}")[0] == 303

    deleted = cli.client("proxy", "delete", "--local-port", local)
    assert deleted.returncode == 0, deleted.stderr

    secret_file.rename(secret_file.with_name("moved-away"))  # as a user who cannot read it
    refused = cli.client("proxy", "list")
    assert refused.returncode == 1
    assert "run the CLI as the user who started the client" in refused.stderr and "login-link" in refused.stderr


SYSTEM_PYTHON = "/usr/bin/python3"  # one that another user may run (ours may live in root's home)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0 or not os.access(SYSTEM_PYTHON, os.X_OK),
                    reason="needs root (to act as nobody) and a system python")
@pytest.mark.timeout(120)
def test_another_local_user_cannot_use_the_api(cli):
    relay_port = cli.start_relay()
    admin = free_port()
    cli.start_client(relay_port, "A", admin)
    script = ("import urllib.request, urllib.error\n"
              f"req = urllib.request.Request('http://127.0.0.1:{admin}/api/proxies')\n"
              "try:\n    urllib.request.build_opener(urllib.request.ProxyHandler({})).open(req, timeout=5)\n"
              "    print('OPEN')\nexcept urllib.error.HTTPError as exc:\n    print(exc.code)\n")
    as_nobody = subprocess.run([SYSTEM_PYTHON, "-c", script], capture_output=True, text=True, timeout=30,
                               user="nobody", env={"PATH": "/usr/bin:/bin"}, cwd="/")
    assert as_nobody.stdout.strip() == "401", as_nobody.stdout + as_nobody.stderr


@pytest.mark.timeout(60)
def test_a_foreground_client_prints_a_login_link_to_a_terminal_only(cli):
    admin = free_port()
    config = cli.root / "a.json"
    proc = cli.popen(CLIENT, "--server", "ws://127.0.0.1:1", "--admin-port", admin, "--config", config)
    hint = "log in to the page with the link printed by: python -m chuantou_client login-link"
    wait_until(lambda: hint in cli.output(proc), 20, message="the login hint in the foreground output")
    assert "key=" not in cli.output(proc)  # this output may be a log file that others can read
    secret_file = cli.state_dir / f"{cli.files('client', config).name}.api-secret"
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    # --admin-port alone finds this client's secret by the port it announced
    listed = cli.client("login-link", "--admin-port", admin)
    assert listed.returncode == 0, listed.stderr
    link = urlsplit(listed.stdout.strip())
    assert http_json(admin, "GET", f"{link.path}?{link.query}")[0] == 303
    proc.terminate()
    assert proc.wait(15) == 0

    controller, terminal = pty.openpty()  # a person at a terminal gets the link itself
    try:
        admin = free_port()
        with_tty = subprocess.Popen([sys.executable, "-m", CLIENT, "--server", "ws://127.0.0.1:1", "--admin-port",
                                     str(admin), "--config", str(config)], env=cli.env, cwd=cli.root,
                                    stdin=subprocess.DEVNULL, stdout=terminal, stderr=subprocess.STDOUT)
        os.close(terminal)
        terminal = None
        seen = b""
        pattern = rf"log in to the page \(once\) at: http://127\.0\.0\.1:{admin}(/login\?key=[\w-]+)".encode()
        try:
            while not re.search(pattern, seen):
                ready, _, _ = select.select([controller], [], [], 20)
                assert ready, f"no login link on the terminal: {seen!r}"
                seen += os.read(controller, 4096)
            assert http_json(admin, "GET", re.search(pattern, seen).group(1).decode())[0] == 303
        finally:
            with_tty.terminate()
            with_tty.wait(15)
    finally:
        os.close(controller)
        if terminal is not None:
            os.close(terminal)
