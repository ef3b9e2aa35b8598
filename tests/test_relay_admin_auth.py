"""The relay's admin credential and login sessions (issue 9 items 10, 11 and 16): a separate
admin token, random server-side session cookies that expire and are revoked by logout, a cap
on sessions, a limit on failed logins per source, and short tokens refused without echo.
Real relays on 127.0.0.1 port 0, spoken to over HTTP."""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import logging
import stat
import time

import pytest

from chuantou_server import Server, cli
from chuantou_server import admin as server_admin
from chuantou_server import app as server_app
from chuantou_server.httpd import Request
from common.errors import ChuantouError

DEADLINE = 10.0
ADMIN = "relay-admin-token-0123456789abcdef"
CLIENT_TOKEN = "relay-client-token-0123456789abcd"


# --- helpers ----------------------------------------------------------------------------------

def request(port: int, method: str, path: str, headers: dict | None = None):
    """(status, response, decoded body) of one HTTP request to 127.0.0.1:port."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=DEADLINE)
    try:
        conn.request(method, path, headers=headers or {})
        response = conn.getresponse()
        raw = response.read()
        kind = response.getheader("Content-Type", "")
        return response.status, response, json.loads(raw) if kind.startswith("application/json") else raw.decode()
    finally:
        conn.close()


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def log_in(server: Server, token: str = ADMIN) -> tuple[str, str]:
    """Log in; returns (the Set-Cookie header, the "name=value" to send back)."""
    status, response, reply = request(server.port, "POST", "/login", bearer(token))
    assert status == 200, reply
    set_cookie = response.getheader("Set-Cookie")
    return set_cookie, set_cookie.split(";", 1)[0]


def api_status(server: Server, jar: str) -> int:
    return request(server.port, "GET", "/api/status", {"Cookie": jar})[0]


def let_time_pass(seconds: float) -> None:
    """What is tested here is a deadline passing: wait it out on the monotonic clock."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(min(0.05, max(0.0, end - time.monotonic())))


@pytest.fixture
def relay():
    with Server(host="127.0.0.1", port=0, token=CLIENT_TOKEN, admin_token=ADMIN) as server:
        yield server


# --- sessions ---------------------------------------------------------------------------------

@pytest.mark.timeout(30)
def test_each_login_gets_its_own_random_cookie(relay):
    first_header, first = log_in(relay)
    _, second = log_in(relay)
    name, _, value = first.partition("=")
    assert name == f"chuantou_admin_{relay.port}"  # named per port: cookies ignore ports
    assert first != second and len(value) >= 40
    assert ADMIN not in first_header and CLIENT_TOKEN not in first_header
    attributes = [a.strip() for a in first_header.split(";")[1:]]
    assert "HttpOnly" in attributes and "SameSite=Strict" in attributes and "Path=/" in attributes
    assert f"Max-Age={int(relay.admin_sessions.lifetime)}" in attributes
    assert not any(a.lower().startswith("domain") for a in attributes)
    assert api_status(relay, first) == 200 and api_status(relay, second) == 200


@pytest.mark.timeout(30)
def test_the_old_hmac_cookie_is_refused(relay):
    for secret in (ADMIN, CLIENT_TOKEN):
        old = hmac.new(secret.encode(), b"chuantou-admin", hashlib.sha256).hexdigest()
        assert api_status(relay, f"chuantou_admin_{relay.port}={old}") == 401
    status, _, page = request(relay.port, "GET", "/", {"Cookie": f"chuantou_admin_{relay.port}=x"})
    assert status == 200 and "login.js" in page


@pytest.mark.timeout(30)
def test_logout_revokes_the_session(relay):
    _, jar = log_in(relay)
    _, other = log_in(relay)
    assert api_status(relay, jar) == 200
    status, response, _ = request(relay.port, "POST", "/logout", {"Cookie": jar})
    assert status == 200 and "Max-Age=0" in response.getheader("Set-Cookie")
    assert api_status(relay, jar) == 401  # replaying the cookie after logout does not work
    assert api_status(relay, other) == 200  # another login is not affected


@pytest.mark.timeout(30)
def test_a_session_expires_when_idle():
    with Server(host="127.0.0.1", port=0, admin_token=ADMIN, admin_session_idle=0.5) as server:
        _, jar = log_in(server)
        assert api_status(server, jar) == 200
        let_time_pass(0.8)
        assert api_status(server, jar) == 401
        _, fresh = log_in(server)
        assert api_status(server, fresh) == 200


@pytest.mark.timeout(30)
def test_a_session_expires_at_its_lifetime_even_in_use():
    with Server(host="127.0.0.1", port=0, admin_token=ADMIN, admin_session_idle=60,
                admin_session_lifetime=1.0) as server:
        _, jar = log_in(server)
        started = time.monotonic()
        while api_status(server, jar) == 200:  # used every few ms: never idle
            assert time.monotonic() - started < DEADLINE, "the session outlived its lifetime"
            let_time_pass(0.05)
        assert time.monotonic() - started >= 0.9


@pytest.mark.timeout(30)
def test_sessions_are_capped_and_the_least_recently_used_ends():
    with Server(host="127.0.0.1", port=0, admin_token=ADMIN, max_admin_sessions=2) as server:
        _, first = log_in(server)
        _, second = log_in(server)
        assert api_status(server, first) == 200  # first is now the most recently used
        _, third = log_in(server)
        assert api_status(server, second) == 401
        assert api_status(server, first) == 200 and api_status(server, third) == 200
        assert server.admin_sessions.count() == 2


# --- the credential ---------------------------------------------------------------------------

@pytest.mark.timeout(30)
def test_the_registration_token_does_not_open_the_admin_page(relay):
    status, response, reply = request(relay.port, "POST", "/login", bearer(CLIENT_TOKEN))
    assert status == 401 and response.getheader("Set-Cookie") is None and CLIENT_TOKEN not in json.dumps(reply)
    assert request(relay.port, "GET", "/api/status", bearer(CLIENT_TOKEN))[0] == 401
    assert request(relay.port, "GET", "/api/status", bearer(ADMIN))[0] == 200


def test_the_admin_token_may_not_be_a_client_token():
    for kwargs in ({"token": ADMIN}, {"extra_tokens": [ADMIN]}, {"client_tokens": {"B": ADMIN}}):
        with pytest.raises(ChuantouError, match="must not be a client registration token") as caught:
            Server(host="127.0.0.1", port=0, admin_token=ADMIN, **kwargs)
        assert ADMIN not in str(caught.value)


@pytest.mark.timeout(30)
def test_failed_logins_are_limited_per_source(caplog):
    with Server(host="127.0.0.1", port=0, admin_token=ADMIN, admin_login_failures_per_minute=3) as server:
        for _ in range(3):
            assert request(server.port, "POST", "/login", bearer("wrong-token-0123456789"))[0] == 401
        with caplog.at_level(logging.WARNING, logger="chuantou.server"):
            for headers in (bearer("wrong-token-0123456789"), bearer(ADMIN)):  # even the right one, for now
                status, response, reply = request(server.port, "POST", "/login", headers)
                assert status == 429 and response.getheader("Retry-After") == "60", reply
                assert "too many failed logins" in reply["error"]
            status, _, _ = request(server.port, "GET", "/api/status", bearer(ADMIN))
            assert status == 429  # a bearer on the API is a guess as well
        lines = [r for r in caplog.records if "adminLoginFailuresPerMinute" in r.getMessage()]
        assert len(lines) == 1  # logged once, however often it bites
        assert server.admin_login_failures.limit_log.count("adminLoginFailuresPerMinute") == 3

        # Another source is not affected, and neither are logged-in sessions.
        other = ("203.0.113.9", 40000)
        answer = server_admin.handle(server, Request("POST", "/login", "HTTP/1.1", {"authorization": f"Bearer {ADMIN}"}),
                                     other)
        assert answer[0] == 200
        jar = answer[3]["Set-Cookie"].split(";", 1)[0]
        assert api_status(server, jar) == 200  # from 127.0.0.1, with a cookie: no token guessed


@pytest.mark.timeout(30)
def test_failed_logins_recover_with_time():
    with Server(host="127.0.0.1", port=0, admin_token=ADMIN, admin_login_failures_per_minute=60) as server:
        peer = ("198.51.100.7", 1)
        wrong = Request("POST", "/login", "HTTP/1.1", {"authorization": "Bearer wrong-token-0123456789"})
        right = Request("POST", "/login", "HTTP/1.1", {"authorization": f"Bearer {ADMIN}"})
        while server_admin.handle(server, wrong, peer)[0] == 401:
            pass
        assert server_admin.handle(server, right, peer)[0] == 429
        let_time_pass(1.2)  # 60 a minute: one more try each second
        assert server_admin.handle(server, right, peer)[0] == 200


# --- short tokens -----------------------------------------------------------------------------

def test_a_short_token_on_the_command_line_is_refused_without_echo(tmp_path, capsys):
    short = "Sh0rtSecret"
    path = tmp_path / "server.json"
    path.write_text("{}")
    code = cli.main(["--config", str(path), "--port", "0", "--token", short])
    err = capsys.readouterr().err
    assert code == 1 and "--token is too short" in err and "16" in err
    assert short not in err
    assert path.read_text() == "{}"  # not saved either


@pytest.mark.parametrize("key, value", [("token", "Sh0rtSecret"), ("adminToken", "Sh0rtSecret"),
                                        ("extraTokens", ["Sh0rtSecret"]), ("clientTokens", {"B": "Sh0rtSecret"})])
def test_a_short_token_in_the_config_is_refused_without_echo(tmp_path, capsys, key, value):
    path = tmp_path / "server.json"
    path.write_text(json.dumps({key: value}))
    code = cli.main(["--config", str(path), "--port", "0"])
    err = capsys.readouterr().err
    assert code == 1 and f"key '{key}'" in err and "hidden" in err
    assert "Sh0rtSecret" not in err


def test_a_short_admin_token_is_refused_by_the_server():
    with pytest.raises(ChuantouError, match="too short") as caught:
        Server(host="127.0.0.1", port=0, admin_token="Sh0rtSecret")
    assert "Sh0rtSecret" not in str(caught.value)


# --- the command line -------------------------------------------------------------------------

def test_the_cli_makes_a_separate_admin_token(tmp_path, capsys):
    path = tmp_path / "server.json"
    path.write_text("{}")
    assert cli.main(["token", "--admin", "--config", str(path)]) == 0
    saved = json.loads(path.read_text())
    assert len(saved["adminToken"]) >= 16 and saved["adminToken"] in capsys.readouterr().out
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert cli.main(["token", "--config", str(path)]) == 0  # the registration token: another one
    saved = json.loads(path.read_text())
    assert saved["token"] != saved["adminToken"]
    capsys.readouterr()
    assert cli.main(["token", "--admin", "--config", str(path)]) == 0  # shown again, not replaced
    assert capsys.readouterr().out.splitlines()[0] == saved["adminToken"]
    server = server_app.make_server(cli.make_app(cli.build_parser().parse_args(["--config", str(path)])).settings)
    assert server.config.admin_token == saved["adminToken"] and server.config.token == saved["token"]
