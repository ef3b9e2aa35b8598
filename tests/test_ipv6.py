"""IPv6: a relay on ::1 and on dual-stack ::, clients with ws://[::1]:PORT URLs, and IPv6 and
IPv4 services behind them, for TCP and UDP; the CLI's addresses for such a relay."""

from __future__ import annotations

import os
import socket

import pytest

from chuantou_server import cli as server_cli
from cli_support import TOKEN, cli, wait_connected  # noqa: F401 (cli is a fixture)
from helpers import UdpEchoService, echo_handler, echo_roundtrip, free_port

from udp_support import FamilyTcpService, HostUdpEchoService, ipv6_loopback_available

pytestmark = pytest.mark.skipif(not ipv6_loopback_available(), reason="this machine has no IPv6 loopback (::1)")


def v6_url(server) -> str:
    return f"ws://[::1]:{server.port}"


def udp_user(host: str) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.bind((host, 0))
    return sock


def udp_echo_via(user: socket.socket, host: str, port: int, payload: bytes, timeout: float = 8.0) -> bytes:
    """Send until the echo comes (the first datagrams may wait for the session)."""
    import time
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        user.sendto(payload, (host, port))
        user.settimeout(0.5)
        try:
            data, _ = user.recvfrom(65535)
        except socket.timeout:
            continue
        if data == payload:
            return data
    raise AssertionError(f"no echo of {payload!r} via {host}:{port}")


@pytest.fixture
def v4_services(services):
    return services(FamilyTcpService(echo_handler, "127.0.0.1")), services(UdpEchoService())


@pytest.fixture
def v6_services(services):
    return services(FamilyTcpService(echo_handler, "::1")), services(HostUdpEchoService("::1"))


@pytest.mark.timeout(60)
def test_relay_on_ipv6_loopback_carries_tcp_and_udp_to_an_ipv4_service(make_server, make_client, v4_services):
    tcp_echo, udp_echo = v4_services
    relay = make_server(host="::1")
    a = make_client(v6_url(relay), "A")
    make_client(v6_url(relay), "B")
    tcp = a.create_proxy(0, "B", tcp_echo.port, protocol="tcp")
    udp = a.create_proxy(0, "B", udp_echo.port, protocol="udp")
    payload = os.urandom(100_000)
    assert echo_roundtrip(tcp.local_port, payload) == payload
    with udp_user("127.0.0.1") as user:
        for i in range(5):
            assert udp_echo_via(user, "127.0.0.1", udp.local_port, b"v6 relay %d" % i) == b"v6 relay %d" % i
    assert udp.last_error is None
    tcp.close()
    udp.close()


@pytest.mark.timeout(60)
def test_ipv6_services_are_reachable_through_an_ipv4_relay(make_server, make_client, v6_services):
    tcp_echo, udp_echo = v6_services
    relay = make_server()
    a = make_client(relay, "A")
    make_client(relay, "B", allow_hosts=("::1",))
    tcp = a.create_proxy(0, "B", tcp_echo.port, protocol="tcp", target_host="::1")
    udp = a.create_proxy(0, "B", udp_echo.port, protocol="udp", target_host="::1")
    assert echo_roundtrip(tcp.local_port, b"to a v6 service") == b"to a v6 service"
    with udp_user("127.0.0.1") as user:
        assert udp_echo_via(user, "127.0.0.1", udp.local_port, b"udp to ::1") == b"udp to ::1"
    tcp.close()
    udp.close()


@pytest.mark.timeout(60)
def test_dual_stack_relay_serves_an_ipv4_and_an_ipv6_client_together(make_server, make_client, v4_services):
    tcp_echo, udp_echo = v4_services
    relay = make_server(host="::")
    a = make_client(f"ws://127.0.0.1:{relay.port}", "A")  # IPv4 into the dual-stack relay
    make_client(v6_url(relay), "B")
    tcp = a.create_proxy(0, "B", tcp_echo.port, protocol="tcp")
    udp = a.create_proxy(0, "B", udp_echo.port, protocol="udp")
    assert echo_roundtrip(tcp.local_port, b"dual stack") == b"dual stack"
    with udp_user("127.0.0.1") as user:
        assert udp_echo_via(user, "127.0.0.1", udp.local_port, b"dual udp") == b"dual udp"
    tcp.close()
    udp.close()


@pytest.mark.timeout(60)
def test_a_proxy_can_listen_on_ipv6_loopback(make_server, make_client, v4_services):
    tcp_echo, udp_echo = v4_services
    relay = make_server(host="::1")
    a = make_client(v6_url(relay), "A")
    make_client(v6_url(relay), "B")
    proxy = a.create_proxy(0, "B", udp_echo.port, protocol="udp", local_host="::1")
    with udp_user("::1") as user:
        assert udp_echo_via(user, "::1", proxy.local_port, b"from a v6 user") == b"from a v6 user"
    proxy.close()


def test_the_cli_names_an_ipv6_relay_with_brackets_and_asks_it_on_its_own_address(make_server):
    assert server_cli.local_address("::1") == "::1"
    assert server_cli.local_address("::") == "::1"
    assert server_cli.local_address("0.0.0.0") == "127.0.0.1"
    assert server_cli.local_url("ws", "::1", 8200) == "ws://[::1]:8200"
    assert server_cli.local_url("ws", "0.0.0.0", 8200) == "ws://127.0.0.1:8200"
    relay = make_server(host="::1", token="t" * 16, admin_token="a" * 16)
    status = server_cli.fetch_status({"host": "::1", "port": relay.port, "tls": False}, "a" * 16)
    assert status["port"] == relay.port


def free_v6_port() -> int:
    """A port free for TCP and UDP on ::1."""
    for _ in range(50):
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as tcp, \
                socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as udp:
            tcp.bind(("::1", 0))
            port = tcp.getsockname()[1]
            try:
                udp.bind(("::1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no port free for TCP and UDP on ::1")


@pytest.mark.timeout(120)
def test_cli_start_and_status_of_a_relay_on_ipv6_loopback_and_a_client_of_it(cli):
    port = free_v6_port()
    start = cli.server("start", "--host", "::1", "--port", port, "--token", TOKEN)
    assert start.returncode == 0, start.stderr
    assert f"on this machine: ws://[::1]:{port}" in start.stdout
    assert "127.0.0.1" not in start.stdout
    status = cli.server("status")
    assert status.returncode == 0, status.stdout + status.stderr
    assert f"port:       {port}" in status.stdout

    admin = free_port()
    result = cli.client("start", "--admin-port", admin, "--token", TOKEN, "--server", f"ws://[::1]:{port}",
                        "--client-id", "v6")
    assert result.returncode == 0, result.stdout + result.stderr
    wait_connected(admin)
    status = cli.server("status")
    assert "clients:    1" in status.stdout
