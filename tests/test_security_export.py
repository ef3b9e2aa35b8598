"""Export control on the target (B): --allow narrows the ports other clients may reach, "none"
makes a pure gateway, --allow-host opens another host of B's network; a refusal reaches A's
log with B's reason and A's user connection is closed."""

from __future__ import annotations

import time

import pytest

from helpers import TcpService, connect, echo_handler, greeting_handler, recv_exactly, wait_until
from security_support import PROMPT, HostTcpService, closed_without_reply, echo_roundtrip, logged, udp_socket

pytestmark = pytest.mark.timeout(30)

OTHER_HOST = "127.0.0.2"


def assert_refused(server, a, proxy, caplog, reason: str) -> None:
    """A user of ``proxy`` is closed promptly, A logs B's ``reason``, the relay forgets the session."""
    started = time.monotonic()
    with connect(proxy.local_port) as user:
        user.sendall(b"let me in")
        closed, got = closed_without_reply(user, PROMPT)
    assert closed and got == b"", f"the user's connection was not closed (got {got!r})"
    assert time.monotonic() - started < PROMPT
    wait_until(lambda: logged(caplog, reason, ("chuantou-client-A-", f"chuantou-proxy-{proxy.local_port}-")),
               message=f"A logs B's reason {reason!r}")
    wait_until(lambda: not [s for s in server.sessions.all() if s.port == proxy.target_port])
    assert a.connected


def test_allow_list_lets_listed_ports_through_and_refuses_others(server, make_client, services, caplog):
    allowed = services(TcpService(echo_handler, "allowed"))
    other = services(TcpService(echo_handler, "other"))
    a = make_client(server, "A")
    make_client(server, "B", allow=f"22,{allowed.port}-{allowed.port}")

    ok = a.create_proxy(0, "B", allowed.port, protocol="tcp")
    assert echo_roundtrip(ok.local_port) == b"hello through the tunnel"

    refused = a.create_proxy(0, "B", other.port, protocol="tcp")
    assert_refused(server, a, refused, caplog,
                   f"port {other.port} is not allowed on this client (it allows 22,{allowed.port})")
    assert echo_roundtrip(ok.local_port, b"still fine") == b"still fine"
    ok.close()
    refused.close()


def test_allow_none_makes_a_pure_gateway(server, make_client, tcp_echo, caplog):
    a = make_client(server, "A")
    b = make_client(server, "B", allow="none")
    assert "exposes nothing" in b.export.describe()
    proxy = a.create_proxy(0, "B", tcp_echo.port, protocol="tcp")
    assert_refused(server, a, proxy, caplog, f"port {tcp_echo.port} is not allowed on this client (it allows none)")
    # B can still use the relay as a gateway itself
    back = b.create_proxy(0, "A", tcp_echo.port, protocol="tcp")
    assert echo_roundtrip(back.local_port) == b"hello through the tunnel"
    proxy.close()
    back.close()


def test_another_host_is_refused_unless_allowed_with_allow_host(server, make_client, services, caplog):
    there = services(HostTcpService(greeting_handler(b"db box\n"), OTHER_HOST, "db"))
    a = make_client(server, "A")
    make_client(server, "B")  # default: 127.0.0.1 only
    make_client(server, "B2", allow_hosts=[OTHER_HOST])

    refused = a.create_proxy(0, "B", there.port, protocol="tcp", target_host=OTHER_HOST)
    assert_refused(server, a, refused, caplog, f"host {OTHER_HOST} is not allowed on this client")
    assert logged(caplog, f"add --allow-host {OTHER_HOST}")

    allowed = a.create_proxy(0, "B2", there.port, protocol="tcp", target_host=OTHER_HOST)
    with connect(allowed.local_port) as user:
        assert recv_exactly(user, 7) == b"db box\n"
        user.sendall(b"select 1")
        assert recv_exactly(user, 8) == b"select 1"
    # allowing another host does not open names or addresses that are not listed
    for host in ("localhost", "127.0.0.3", "0.0.0.0"):
        sneaky = a.create_proxy(0, "B2", there.port, protocol="tcp", target_host=host)
        assert_refused(server, a, sneaky, caplog, f"host {host} is not allowed on this client")
        sneaky.close()
    refused.close()
    allowed.close()


def test_allow_list_applies_to_udp_as_well(server, make_client, udp_echo, caplog):
    a = make_client(server, "A")
    make_client(server, "B", allow="22")
    proxy = a.create_proxy(0, "B", udp_echo.port, protocol="udp")
    with udp_socket() as user:
        user.sendto(b"knock", ("127.0.0.1", proxy.local_port))
        wait_until(lambda: logged(caplog, f"port {udp_echo.port} is not allowed on this client (it allows 22)"),
                   message="B refuses the UDP session with its reason")
        wait_until(lambda: not server.sessions.all(), message="the refused UDP session is gone")
        user.settimeout(0.2)
        with pytest.raises(OSError):
            user.recvfrom(100)  # nothing came back
    assert udp_echo.sizes == []
    proxy.close()
