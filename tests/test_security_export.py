"""Export control on the target (B): --allow narrows the ports other clients may reach, "none"
makes a pure gateway, --allow-host opens another host of B's network; a refusal is logged on B
with its reason, A hears only "not allowed by the target" (B's allow-list is not A's business)
and A's user connection is closed. No session reaches B's own proxies or local API."""

from __future__ import annotations

import socket
import time

import pytest

from helpers import TcpService, connect, echo_handler, greeting_handler, recv_exactly, wait_until
from security_support import PROMPT, HostTcpService, closed_without_reply, echo_roundtrip, logged, udp_socket

pytestmark = pytest.mark.timeout(30)

OTHER_HOST = "127.0.0.2"


def assert_refused(server, a, proxy, caplog, reason: str, target: str = "B") -> None:
    """A user of ``proxy`` is closed promptly, B logs its ``reason`` and A only a generic refusal
    that does not list what B allows, and the relay forgets the session."""
    started = time.monotonic()
    with connect(proxy.local_port) as user:
        user.sendall(b"let me in")
        closed, got = closed_without_reply(user, PROMPT)
    assert closed and got == b"", f"the user's connection was not closed (got {got!r})"
    assert time.monotonic() - started < PROMPT
    wait_until(lambda: logged(caplog, reason, f"chuantou-client-{target}-"), message=f"B logs {reason!r}")
    a_side = ("chuantou-client-A-", f"chuantou-proxy-{proxy.local_port}-")
    wait_until(lambda: logged(caplog, "is not allowed by the target client", a_side),
               message="A logs a generic refusal")
    assert not logged(caplog, "it allows", a_side) and not logged(caplog, "--allow", a_side)
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
        assert_refused(server, a, sneaky, caplog, f"host {host} is not allowed on this client", target="B2")
        sneaky.close()
    refused.close()
    allowed.close()


def test_allow_list_applies_to_udp_as_well(server, make_client, udp_echo, caplog):
    a = make_client(server, "A")
    make_client(server, "B", allow="22")
    proxy = a.create_proxy(0, "B", udp_echo.port, protocol="udp")
    with udp_socket() as user:
        user.sendto(b"knock", ("127.0.0.1", proxy.local_port))
        wait_until(lambda: logged(caplog, f"port {udp_echo.port} is not allowed on this client (it allows 22)",
                                  "chuantou-client-B-"),
                   message="B refuses the UDP session with its reason")
        wait_until(lambda: not server.sessions.all(), message="the refused UDP session is gone")
        user.settimeout(0.2)
        with pytest.raises(OSError):
            user.recvfrom(100)  # nothing came back
    assert udp_echo.sizes == []
    proxy.close()


SELF = "one of this client's own ports"


def test_no_session_reaches_a_proxy_of_the_target_whatever_the_address(server, make_client, tcp_echo, caplog):
    a = make_client(server, "A")
    b = make_client(server, "B", allow_hosts=["localhost", "0.0.0.0", "127.0.0.2"])
    own = b.create_proxy(0, "A", tcp_echo.port, protocol="tcp")  # B's own proxy, on 127.0.0.1
    wildcard = b.create_proxy(0, "A", tcp_echo.port, protocol="tcp", local_host="0.0.0.0")
    for host, port in ((None, own.local_port), ("localhost", own.local_port), ("0.0.0.0", own.local_port),
                       ("127.0.0.2", wildcard.local_port)):
        loop = a.create_proxy(0, "B", port, protocol="tcp", target_host=host)
        assert_refused(server, a, loop, caplog, SELF)
        loop.close()
    assert echo_roundtrip(own.local_port) == b"hello through the tunnel"  # B's proxy itself still works
    own.close()
    wildcard.close()


def test_no_session_reaches_the_local_api_of_the_target(server, make_client, caplog):
    """The attack of issue 9.9: a session to B's API port would let A rewrite B's proxies."""
    a = make_client(server, "A")
    b = make_client(server, "B")
    with socket.create_server(("127.0.0.1", 0)) as api:  # stands for the API's listening socket
        b.protect_socket(api)
        proxy = a.create_proxy(0, "B", api.getsockname()[1], protocol="tcp")
        assert_refused(server, a, proxy, caplog, SELF)
        proxy.close()


def test_no_udp_session_reaches_a_udp_proxy_of_the_target(server, make_client, udp_echo, caplog):
    a = make_client(server, "A")
    b = make_client(server, "B")
    own = b.create_proxy(0, "A", udp_echo.port, protocol="udp")
    loop = a.create_proxy(0, "B", own.local_port, protocol="udp")
    with udp_socket() as user:
        user.sendto(b"knock", ("127.0.0.1", loop.local_port))
        wait_until(lambda: logged(caplog, SELF, "chuantou-client-B-"), message="B refuses the loop")
        wait_until(lambda: not server.sessions.all(), message="the refused UDP session is gone")
    assert udp_echo.sizes == []
    loop.close()
    own.close()


def test_an_unreachable_service_is_reported_to_a_without_b_s_error(server, make_client, caplog):
    a = make_client(server, "A")
    make_client(server, "B")
    with socket.create_server(("127.0.0.1", 0)) as placeholder:
        closed_port = placeholder.getsockname()[1]
    proxy = a.create_proxy(0, "B", closed_port, protocol="tcp")
    with connect(proxy.local_port) as user:
        closed, _ = closed_without_reply(user, PROMPT)
    assert closed
    a_side = ("chuantou-client-A-", f"chuantou-proxy-{proxy.local_port}-")
    wait_until(lambda: logged(caplog, f"the target client cannot reach port {closed_port}", a_side))
    assert not logged(caplog, "Connection refused", a_side)
    assert logged(caplog, "Connection refused", "chuantou-client-B-")
    proxy.close()


def fill_accept_queue(address) -> list[socket.socket]:
    """Connect to a listener that never accepts until a connect no longer completes."""
    filler = []
    for _ in range(16):
        sock = socket.socket()
        sock.settimeout(0.5)
        filler.append(sock)
        try:
            sock.connect(address)
        except (TimeoutError, socket.timeout):
            return filler
    raise AssertionError("the accept queue never filled")


def test_b_caps_sessions_being_set_up_and_tells_a_it_is_busy(server, make_client, tcp_echo, caplog):
    """A flood of requests cannot make B open connections (and threads) without bound."""
    echo = tcp_echo
    a = make_client(server, "A")
    b = make_client(server, "B", max_pending_connects=2)
    with socket.socket() as stuck:  # a service whose accept queue is full: connects to it hang
        stuck.bind(("127.0.0.1", 0))
        stuck.listen(0)
        filler = fill_accept_queue(stuck.getsockname())
        proxy = a.create_proxy(0, "B", stuck.getsockname()[1], protocol="tcp")
        users = [connect(proxy.local_port) for _ in range(6)]
        try:
            wait_until(lambda: logged(caplog, "are already being set up on this client", "chuantou-client-B-"),
                       message="B refuses the excess")
            wait_until(lambda: logged(caplog, "busy setting up other sessions",
                                      ("chuantou-client-A-", f"chuantou-proxy-{proxy.local_port}-")),
                       message="A hears that B is busy")
            assert b.pending_connects.limit_log.count("maxPendingConnects") >= 1
        finally:
            for sock in users + filler:
                sock.close()
        proxy.close()
    # joined sessions do not hold a setup slot: many more than the cap run at once
    wait_until(lambda: b.pending_connects.in_progress == 0, timeout=10, message="the hung connects gave up")
    live = a.create_proxy(0, "B", echo.port, protocol="tcp")
    held = []
    try:
        for i in range(6):
            held.append(connect(live.local_port))
            held[-1].sendall(b"u%d" % i)
            assert recv_exactly(held[-1], 2) == b"u%d" % i
        assert b.status()["activeSessions"] == 6
    finally:
        for sock in held:
            sock.close()
    live.close()
