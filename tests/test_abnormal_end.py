"""A cut-off session must never look finished (issue 10 item 1).

Only a FIN that the far end really sent reaches the other end as a FIN; every abnormal end (the
relay or client B killed, the relay closing the session, a reset by either end) reaches it as a
reset. The parts that die run in their own processes and are killed with SIGKILL.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys

import pytest

from common.net import reset_connection
from helpers import (IO_TIMEOUT, TcpService, connect, free_port, hash_until_eof, pattern, recv_exactly, sha256,
                     wait_until)

TOKEN = "abnormal-end-test-token-0123"
CHUNK = 64 * 1024

RELAY_SCRIPT = """
import sys, threading
from chuantou_server import Server
server = Server(host="127.0.0.1", port=0, token=sys.argv[1]).start()
print(server.port, flush=True)
threading.Event().wait()
"""

CLIENT_SCRIPT = """
import sys, threading
from chuantou_client import Client
client = Client(sys.argv[1], sys.argv[2], token=sys.argv[3], path="relay").start(timeout=20)  # the relay sees the end
print("ready", flush=True)
threading.Event().wait()
"""


class Child:
    """A relay or client in a process of its own, to be killed with SIGKILL."""

    def __init__(self, script: str, *args):
        self.proc = subprocess.Popen([sys.executable, "-c", script, *map(str, args)], stdout=subprocess.PIPE,
                                     text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
        self.first_line = self.proc.stdout.readline().strip()
        assert self.first_line, "the child process did not start"

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.kill()
        self.proc.stdout.close()


@pytest.fixture
def children():
    started = []

    def start(script, *args) -> Child:
        child = Child(script, *args)
        started.append(child)
        return child

    yield start
    for child in started:
        child.close()


def endless_stream(conn: socket.socket, service: TcpService) -> None:
    """Sends until the connection breaks: a download that the test cuts off."""
    block = pattern(CHUNK)
    while True:
        conn.sendall(block)


def fixed_download(size: int):
    def handler(conn: socket.socket, service: TcpService) -> None:
        conn.sendall(pattern(size))
        conn.shutdown(socket.SHUT_WR)
        conn.recv(1)  # until the user closes too
    return handler


def data_then_reset(conn: socket.socket, service: TcpService) -> None:
    conn.sendall(pattern(256 * 1024))
    reset_connection(conn)


def what_the_peer_did(conn: socket.socket, service: TcpService) -> None:
    """Reads until the end and records how it ended: 'eof' or 'reset'."""
    conn.settimeout(IO_TIMEOUT)
    try:
        while conn.recv(CHUNK):
            pass
        service.results.append("eof")
    except ConnectionResetError:
        service.results.append("reset")


def read_to_the_end(sock: socket.socket) -> tuple[str, int]:
    """Read until EOF or error; return ('eof' | 'reset', bytes read)."""
    total = 0
    try:
        while True:
            data = sock.recv(1 << 20)
            if not data:
                return "eof", total
            total += len(data)
    except ConnectionResetError:
        return "reset", total


def start_service(handler) -> TcpService:
    return TcpService(handler, name="svc-abnormal").start()


def tunnel(client_a, target_port: int) -> int:
    port = free_port()
    client_a.create_proxy(port, "B", target_port, protocol="tcp")
    return port


def begin_download(port: int) -> socket.socket:
    user = connect(port, timeout=30)
    recv_exactly(user, 1 << 20)  # the transfer is under way
    return user


@pytest.mark.timeout(90)
def test_relay_killed_mid_transfer_reaches_the_user_as_a_reset(children, make_client):
    service = start_service(endless_stream)
    try:
        relay = children(RELAY_SCRIPT, TOKEN)
        url = f"ws://127.0.0.1:{relay.first_line}"
        make_client(url, "B", token=TOKEN)
        client_a = make_client(url, "A", token=TOKEN)
        user = begin_download(tunnel(client_a, service.port))
        relay.kill()
        how, _ = read_to_the_end(user)
        user.close()
        assert how == "reset", "a download cut off by the relay's death looked complete to the user"
    finally:
        service.stop()


@pytest.mark.timeout(90)
def test_client_b_killed_mid_transfer_reaches_the_user_as_a_reset(children, make_server, make_client):
    server = make_server(token=TOKEN)
    service = start_service(endless_stream)
    try:
        client_b = children(CLIENT_SCRIPT, f"ws://127.0.0.1:{server.port}", "B", TOKEN)
        client_a = make_client(server, "A", token=TOKEN)
        user = begin_download(tunnel(client_a, service.port))
        client_b.kill()
        how, _ = read_to_the_end(user)
        user.close()
        assert how == "reset", "a download cut off by client B's death looked complete to the user"
    finally:
        service.stop()


@pytest.mark.timeout(60)
def test_a_finished_download_ends_cleanly_with_every_byte(client_a, client_b):
    size = 8 * 1024 * 1024
    service = start_service(fixed_download(size))
    try:
        user = connect(tunnel(client_a, service.port), timeout=30)
        digest, total = hash_until_eof(user)
        user.close()
        assert (digest, total) == (sha256(pattern(size)), size)
    finally:
        service.stop()


@pytest.mark.timeout(60)
def test_the_relay_closing_a_session_reaches_both_ends_as_a_reset(server, client_a, client_b):
    service = start_service(what_the_peer_did)
    try:
        user = connect(tunnel(client_a, service.port), timeout=30)
        user.sendall(b"hello")
        wait_until(lambda: any(s.joined for s in server.sessions.all()), timeout=10)
        # B connects to the service once A has proved its key, a moment after the relay joined them
        wait_until(lambda: client_b.connections(), timeout=10, message="B's session reaches the service")
        session = server.sessions.all()[0]
        server.close_session(session, "closed by the operator")
        how, _ = read_to_the_end(user)
        user.close()
        assert how == "reset"
        wait_until(lambda: service.results, timeout=10)
        assert service.results == ["reset"]
    finally:
        service.stop()


@pytest.mark.timeout(60)
def test_a_reset_by_the_service_reaches_the_user_as_a_reset(client_a, client_b):
    service = start_service(data_then_reset)
    try:
        user = connect(tunnel(client_a, service.port), timeout=30)
        user.sendall(b"x")
        how, _ = read_to_the_end(user)
        user.close()
        assert how == "reset"
    finally:
        service.stop()


@pytest.mark.timeout(60)
def test_a_reset_by_the_user_reaches_the_service_as_a_reset_and_a_fin_as_a_fin(client_a, client_b):
    service = start_service(what_the_peer_did)
    try:
        port = tunnel(client_a, service.port)
        user = connect(port, timeout=30)
        user.sendall(b"some bytes")
        _wait_for_b_session(client_b)
        user.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        user.close()
        wait_until(lambda: len(service.results) == 1, timeout=10)
        user = connect(port, timeout=30)
        user.sendall(b"some bytes")
        user.shutdown(socket.SHUT_WR)
        wait_until(lambda: len(service.results) == 2, timeout=10)
        user.close()
        assert service.results == ["reset", "eof"]
    finally:
        service.stop()


def _wait_for_b_session(client_b) -> None:
    wait_until(lambda: len(client_b.sessions) > 0, timeout=10,
               message="client B never joined the session")
