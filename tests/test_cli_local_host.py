"""``proxy create --local-host ADDR`` (issue 10 item 12): a proxy listens where the user says
(IPv4, IPv6, all interfaces), through the CLI and the local API alike; it is saved as
``localHost``, restored at the next start and shown by ``proxy list``; off loopback the CLI and
the log warn that anyone on that network can use the tunnel. Real relay and clients through the
CLI, a real web service behind B."""

from __future__ import annotations

import json
import socket

import pytest

from cli_support import (  # noqa: F401 (cli is a fixture)
    cli,
    HOST,
    api_headers,
    fetch,
    free_tcp_udp_port,
    one_line,
    wait_connected,
)
from helpers import UdpEchoService, free_port, http_request, text_service, wait_until

WEB_TEXT = b"B's web service, reached through a proxy listening where it was told to"


@pytest.fixture
def web(services):
    return services(text_service(WEB_TEXT))


def start_pair(cli) -> int:
    """A relay, client A (default config) and B (b.json); returns A's admin port."""
    relay = cli.start_relay()
    a_admin = free_port()
    cli.start_client(relay, "A", a_admin)
    cli.start_client(relay, "B", free_port(), config=cli.root / "b.json")
    return a_admin


def create(cli, local: int, target_port: int, *extra):
    return cli.client("proxy", "create", "--local-port", local, "--target-client", "B",
                      "--target-port", target_port, *extra)


def saved_proxies(cli) -> list[dict]:
    return json.loads((cli.config_dir / "client.json").read_text())["proxies"]


def listing_row(cli, port: int) -> list[str]:
    out = cli.client("proxy", "list")
    assert out.returncode == 0, out.stderr
    rows = [line.split() for line in out.stdout.splitlines()[1:]]
    return next(row for row in rows if row[0].endswith(f":{port}"))


def api_post(admin_port: int, body: dict) -> tuple[int, dict]:
    status, reply = http_request(admin_port, "POST", "/api/proxies", body, 10, api_headers(admin_port))
    return status, json.loads(reply)


def client_log(cli) -> str:
    return cli.files("client").log_file.read_text(errors="replace")


@pytest.mark.timeout(120)
def test_ipv6_loopback_proxy_is_saved_listed_and_restored_without_a_warning(cli, web):
    a_admin = start_pair(cli)
    local = free_port()
    out = create(cli, local, web.port, "--local-host", "::1", "--protocol", "tcp")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [f"proxy created: [::1]:{local} -> B:{web.port}", f"use it at: [::1]:{local}"]
    assert out.stderr == ""  # loopback: nothing to warn about
    assert fetch(local, host="::1") == WEB_TEXT
    assert fetch(local, timeout=2, host=HOST) is None  # only where it was told to listen
    assert listing_row(cli, local)[:3] == [f"[::1]:{local}", f"B:{web.port}", "tcp"]
    assert saved_proxies(cli) == [{"localPort": local, "targetClient": "B", "targetPort": web.port,
                                   "protocol": "tcp", "localHost": "::1"}]

    assert cli.client("stop").returncode == 0
    assert cli.client("start", "--admin-port", a_admin).returncode == 0
    wait_connected(a_admin)
    wait_until(lambda: fetch(local, timeout=3, host="::1") == WEB_TEXT, 15,
               message="the restored proxy answers on [::1]")
    assert listing_row(cli, local)[0] == f"[::1]:{local}"
    assert "not on loopback" not in client_log(cli)


@pytest.mark.timeout(120)
def test_all_interfaces_warns_in_the_output_and_the_log_and_serves_both_families(cli, web):
    start_pair(cli)
    dual = free_tcp_udp_port()
    out = create(cli, dual, web.port, "--local-host", "::")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == f"proxy created: [::]:{dual} -> B:{web.port}"
    warning = one_line(out.stderr)
    assert warning.startswith(f"warning: proxy on [::]:{dual} is not on loopback: anyone on any network of this "
                              f"machine can use it to reach B:{web.port}")
    assert "--local-host 127.0.0.1" in warning
    assert fetch(dual, host=HOST) == WEB_TEXT  # "::" is dual-stack: IPv4 users too
    assert fetch(dual, host="::1") == WEB_TEXT
    assert listing_row(cli, dual)[0] == f"[::]:{dual}"

    v4 = free_tcp_udp_port()
    out = create(cli, v4, web.port, "--local-host", "0.0.0.0", "--protocol", "tcp")
    assert out.returncode == 0, out.stderr
    assert f"warning: proxy on 0.0.0.0:{v4} is not on loopback" in out.stderr
    assert f"use it at: localhost:{v4} or <this machine's address>:{v4}" in out.stdout
    assert fetch(v4, host=HOST) == WEB_TEXT
    assert listing_row(cli, v4)[0] == f"0.0.0.0:{v4}"
    assert {e["localPort"]: e.get("localHost") for e in saved_proxies(cli)} == {dual: "::", v4: "0.0.0.0"}

    log = wait_until(lambda: client_log(cli) if f"0.0.0.0:{v4} is not on loopback" in client_log(cli) else None,
               10, message="the warning in the client's log")
    assert f"WARNING chuantou.client: proxy on [::]:{dual} is not on loopback" in log


@pytest.mark.timeout(120)
def test_udp_through_a_proxy_on_ipv6_loopback(cli):
    echo = UdpEchoService().start()
    try:
        start_pair(cli)
        local = free_tcp_udp_port()
        out = create(cli, local, echo.port, "--local-host", "::1", "--protocol", "udp")
        assert out.returncode == 0, out.stderr
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as user:
            user.settimeout(1.0)

            def echoed():
                user.sendto(b"ping over ::1", ("::1", local))
                try:
                    return user.recvfrom(2048)[0] == b"ping over ::1"
                except socket.timeout:
                    return False
            wait_until(echoed, 20, message="a datagram echoed through the proxy on [::1]")
    finally:
        echo.stop()


@pytest.mark.timeout(120)
def test_api_honours_local_host_and_bad_addresses_are_refused_and_not_saved(cli, web):
    a_admin = start_pair(cli)
    local = free_port()
    status, reply = api_post(a_admin, {"localPort": local, "targetClient": "B", "targetPort": web.port,
                                       "protocol": "tcp", "localHost": "::1"})
    assert status == 201, reply
    assert reply["proxy"]["localHost"] == "::1" and reply["address"] == f"[::1]:{local}"
    assert reply["warning"] is None
    assert fetch(local, host="::1") == WEB_TEXT

    status, reply = api_post(a_admin, {"localPort": free_port(), "targetClient": "B", "targetPort": web.port,
                                       "localHost": "relay.example.com"})
    assert status == 400
    assert reply["error"].startswith("local host 'relay.example.com' is not an IP address; use an IP address of "
                                     "this machine")
    bad = create(cli, free_port(), web.port, "--local-host", "300.1.1.1")
    assert bad.returncode == 1 and bad.stdout == ""
    assert one_line(bad.stderr).startswith("error: local host '300.1.1.1' is not an IP address")
    absent = create(cli, free_port(), web.port, "--local-host", "192.0.2.1", "--protocol", "tcp")  # TEST-NET-1
    assert absent.returncode == 1
    assert "no network interface of this machine has the address 192.0.2.1; choose another with --local-host" \
        in one_line(absent.stderr)
    assert [e["localPort"] for e in saved_proxies(cli)] == [local]
