"""Start, stop, restart: the relay restarted under running clients, a client restarted under a
running proxy, and nothing (thread, socket, port) left behind by stop()."""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from chuantou_client import ChuantouError, Client
from chuantou_server import Server
from common import identity

from helpers import (
    HOST,
    TcpService,
    UdpEchoService,
    closed_by_peer,
    connect,
    echo_roundtrip,
    echo_handler,
    free_port,
    recv_exactly,
    relay_url,
    udp_roundtrip,
    wait_until,
)


def library_threads() -> list[str]:
    return sorted(t.name for t in threading.enumerate() if t.name.startswith("chuantou-") and t.is_alive())


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def own_socket_inodes() -> set[str]:
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    return inodes


def own_sockets_on(ports) -> list[str]:
    """This process's TCP listeners and UDP sockets bound to any of ``ports`` (from /proc/self/net).

    Other programs on the machine may use the same port numbers for their own connections;
    only sockets this process holds count.
    """
    own = own_socket_inodes()
    found = []
    for table in ("tcp", "tcp6", "udp", "udp6"):
        try:
            with open(f"/proc/self/net/{table}") as f:
                rows = f.read().splitlines()[1:]
        except FileNotFoundError:
            continue
        for row in rows:
            fields = row.split()
            port, state, inode = int(fields[1].rsplit(":", 1)[1], 16), fields[3], fields[9]
            if port in ports and inode in own and (table.startswith("udp") or state == "0A"):
                found.append(f"{table} port {port}")
    return found


# --- restarts ------------------------------------------------------------------------------------

@pytest.mark.timeout(40)
def test_server_restarted_on_the_same_port_clients_reconnect_and_the_proxy_works_again(
        make_server, make_client, tcp_echo):
    first = make_server()
    port = first.port
    a = make_client(first, "A", reconnect_max_delay=0.5)
    b = make_client(first, "B", reconnect_max_delay=0.5)
    proxy = a.create_proxy(0, "B", tcp_echo.port, protocol="tcp")
    assert echo_roundtrip(proxy.local_port, b"echo?") == b"echo?"

    first.stop()
    wait_until(lambda: not a.connected and not b.connected, message="clients notice the relay is gone")
    # while the relay is down the proxy keeps listening, and a user is turned away promptly
    try:
        with connect(proxy.local_port) as user:
            assert closed_by_peer(user, timeout=3)
    except ConnectionResetError:
        pass  # turned away so promptly that the proxy's reset reached us before connect() returned

    second = make_server(port=port)
    wait_until(lambda: a.connected and b.connected and second.registry.ids() == ["A", "B"], timeout=10,
               message="both clients re-registered with the new relay")
    assert a.control.reconnects >= 1 and b.control.reconnects >= 1
    assert echo_roundtrip(proxy.local_port, b"after the restart") == b"after the restart"
    assert a.proxies == [proxy]
    proxy.close()


@pytest.mark.timeout(30)
def test_target_client_restarted_proxy_works_again(server, client_a, make_client, tcp_echo):
    key = identity.generate()  # a restart keeps the key (in its file): its peers' pins still match
    b = make_client(server, "B", identity=key)
    proxy = client_a.create_proxy(0, "B", tcp_echo.port, protocol="tcp")
    assert echo_roundtrip(proxy.local_port, b"echo?") == b"echo?"
    b.stop()
    wait_until(lambda: "B" not in server.registry.ids())
    assert [t for t in library_threads() if t.startswith("chuantou-client-B-")] == []

    make_client(server, "B", identity=key)
    assert echo_roundtrip(proxy.local_port, b"B is back") == b"B is back"
    proxy.close()


@pytest.mark.timeout(30)
def test_gateway_client_restarted_gets_its_proxy_port_back(server, make_client, client_b, tcp_echo):
    key = identity.generate()
    a = make_client(server, "A", identity=key)
    proxy = a.create_proxy(0, "B", tcp_echo.port)
    port = proxy.local_port
    assert echo_roundtrip(port, b"echo?") == b"echo?"
    a.stop()
    assert proxy.closed
    assert own_sockets_on([port]) == []
    a2 = make_client(server, "A", identity=key)
    proxy2 = a2.create_proxy(port, "B", tcp_echo.port)
    assert echo_roundtrip(port, b"same port") == b"same port"
    proxy2.close()


# --- stop() leaves nothing behind ----------------------------------------------------------------

@pytest.mark.timeout(60)
def test_after_stop_no_thread_no_socket_and_no_listening_port_is_left():
    echo = TcpService(echo_handler, "echo").start()
    udp_echo = UdpEchoService().start()
    fds_before = open_fds()
    threads_before = library_threads()
    assert threads_before == []

    server = Server(host=HOST, port=0).start()
    a = Client(relay_url(server), "A").start()
    b = Client(relay_url(server), "B").start()
    try:
        proxy = a.create_proxy(0, "B", echo.port)  # TCP and UDP
        udp_proxy = a.create_proxy(0, "B", udp_echo.port, protocol="udp")
        held = connect(proxy.local_port)  # a connection still open at stop()
        held.sendall(b"open")
        assert recv_exactly(held, 4) == b"open"
        assert echo_roundtrip(proxy.local_port, b"echo?") == b"echo?"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as user:
            assert udp_roundtrip(user, udp_proxy.local_port, b"dgram") == b"dgram"
        ports = [server.port, proxy.local_port, udp_proxy.local_port]
        assert len(own_sockets_on(ports)) == 5  # the checker sees what it should: TCP+UDP, TCP+UDP, UDP
        assert open_fds() > fds_before
        assert library_threads()
    finally:
        b.stop()
        a.stop()
        server.stop()

    try:
        assert library_threads() == [], "stop() returned with threads still running"
        assert closed_by_peer(held, timeout=3), "the user's connection outlived stop()"
        held.close()
        assert own_sockets_on(ports) == []
        wait_until(lambda: open_fds() <= fds_before, timeout=3,
                   message=f"file descriptors back to {fds_before} (now {open_fds()})")
    finally:
        echo.stop()
        udp_echo.stop()


def test_start_and_stop_are_idempotent_and_context_managers_clean_up():
    with Server(host=HOST, port=0) as server:
        assert server.start() is server
        with Client(relay_url(server), "A") as a:
            assert a.start() is a
            assert a.connected and a.list_clients() == ["A"]
        assert not a.connected
        a.stop()
    server.stop()
    assert library_threads() == []


def test_stop_without_start_is_harmless():
    Server(host=HOST, port=0).stop()
    Client("ws://127.0.0.1:1", "never").stop()
    assert library_threads() == []


@pytest.mark.timeout(30)
def test_stop_with_traffic_in_flight_returns_promptly(server, client_a, client_b, tcp_echo):
    proxy = client_a.create_proxy(0, "B", tcp_echo.port, protocol="tcp")
    users = [connect(proxy.local_port) for _ in range(5)]
    try:
        for user in users:
            user.sendall(b"x" * 1000)
            assert recv_exactly(user, 1000) == b"x" * 1000
        started = time.monotonic()
        client_a.stop()
        client_b.stop()
        server.stop()
        assert time.monotonic() - started < 5
        assert library_threads() == []
        for user in users:
            assert closed_by_peer(user, timeout=3)
    finally:
        for user in users:
            user.close()


@pytest.mark.timeout(30)
def test_stop_does_not_wait_for_connections_still_silent_in_their_handshake():
    server = Server(host="127.0.0.1", port=0, handshake_timeout=60.0).start()
    silent = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(3)]
    half = socket.create_connection(("127.0.0.1", server.port))
    half.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")  # a request head that never ends
    try:
        assert wait_until(lambda: server.handshakes.pending == 4, 5)
        started = time.monotonic()
        server.stop()
        assert time.monotonic() - started < 3.0  # not the 60 s handshake deadline
        assert not [t for t in threading.enumerate() if t.name.startswith("chuantou-")]
    finally:
        for sock in silent + [half]:
            sock.close()


def test_client_start_raises_a_clear_error_when_the_relay_is_unreachable(make_client):
    port = free_port()
    started = time.monotonic()
    with pytest.raises(ChuantouError) as caught:
        make_client(f"ws://127.0.0.1:{port}", "lonely", connect_timeout=1.0)
    assert time.monotonic() - started < 5
    message = str(caught.value)
    assert f"ws://127.0.0.1:{port}" in message and "server is running" in message
    assert library_threads() == [], "a failed start() must not leave threads behind"


def test_server_start_on_a_busy_port_raises_a_clear_error(server):
    with pytest.raises(ChuantouError, match=f"cannot listen on 127.0.0.1:{server.port}.*--port"):
        Server(host=HOST, port=server.port).start()


def test_proxy_close_releases_its_port_and_ends_its_connections(server, client_a, client_b, tcp_echo):
    proxy = client_a.create_proxy(0, "B", tcp_echo.port)
    with connect(proxy.local_port) as user:
        user.sendall(b"hi")
        assert recv_exactly(user, 2) == b"hi"
        proxy.close()
        proxy.close()  # twice is fine
        assert closed_by_peer(user, timeout=3)
    assert own_sockets_on([proxy.local_port]) == []
    assert client_a.proxies == []
    wait_until(lambda: len(server.sessions) == 0)
    assert client_a.connected and client_a.list_clients() == ["A", "B"]
