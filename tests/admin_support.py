"""Helpers and fixtures shared by the admin page tests (test_admin_api.py, test_admin_browser.py):
a relay on 127.0.0.1 port 0, client and client-app factories, a TCP echo service, the user's
sockets, and a pump that keeps bytes flowing through an echo path.

A test module imports the fixtures it uses (``from admin_support import relay, ...``; pytest
finds fixtures imported into a test module) and sets ``FIXTURE_SETTINGS`` to a
:class:`FixtureSettings`: what differs between the modules (thread names, the sockets' timeout,
how strict the echo's teardown is). Threads started here are named ``svc-...`` so conftest.py's
leak check watches them.
"""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass

import pytest

from chuantou_client import Client
from chuantou_client.app import ClientApp
from chuantou_server import Server


@dataclass(frozen=True)
class FixtureSettings:
    """A test module's settings for the fixtures here, read from its ``FIXTURE_SETTINGS``."""

    echo_thread: str  # the echo service's accept thread; each connection's thread adds "-conn"
    socket_timeout: float  # of the sockets ``user_sockets`` opens
    echo_threads_must_end: bool = False  # ``echo``'s teardown fails if a thread outlives its join


def _settings(request) -> FixtureSettings:
    return request.module.FIXTURE_SETTINGS


# --- helpers ----------------------------------------------------------------------------------

class EchoService:
    """A TCP echo service on 127.0.0.1 with named threads joined at stop()."""

    def __init__(self, thread_name: str):
        self.thread_name = thread_name
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.threads: list[threading.Thread] = []
        self.conns: list[socket.socket] = []
        self._spawn(thread_name, self._accept)

    def _spawn(self, name, target, *args):
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        self.threads.append(thread)
        thread.start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.conns.append(conn)
            self._spawn(f"{self.thread_name}-conn", self._echo, conn)

    @staticmethod
    def _echo(conn):
        try:
            while data := conn.recv(65536):
                conn.sendall(data)
        except OSError:
            pass
        finally:
            conn.close()

    def stop(self) -> list[str]:
        """Close everything and join the threads; the names of any still alive after that."""
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() (close alone does not)
        except OSError:
            pass
        self.listener.close()
        for conn in self.conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in self.threads:
            thread.join(5)
        return [t.name for t in self.threads if t.is_alive()]


class Pump:
    """Keeps bytes flowing through an echo path until stopped, so rates are non-zero: ``size``
    bytes out and back, then a ``pause``, until stop() or the path closes."""

    def __init__(self, sock: socket.socket, thread_name: str, size: int = 32_000, pause: float = 0.02):
        self.sock = sock
        self.size = size
        self.pause = pause
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name=thread_name, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            while not self.stopping.is_set():
                self.sock.sendall(b"x" * self.size)
                got = 0
                while got < self.size:
                    chunk = self.sock.recv(1 << 20)
                    if not chunk:  # the echo path closed
                        return
                    got += len(chunk)
                self.stopping.wait(self.pause)
        except OSError:
            pass

    def stop(self):
        self.stopping.set()
        self.thread.join(5)


# --- fixtures ---------------------------------------------------------------------------------

ADMIN_TOKEN = "admin-support-admin-token-0123"  # the fixture relay's admin page credential
ADMIN_PORTS: set[int] = set()  # ports of fixture relays, whose requests send ADMIN_TOKEN by default
CLIENT_API_KEYS: dict[int, str] = {}  # local API port of a fixture client app -> its API secret


@pytest.fixture
def relay():
    server = Server(host="127.0.0.1", port=0, admin_token=ADMIN_TOKEN).start()
    ADMIN_PORTS.add(server.port)
    yield server
    server.stop()
    ADMIN_PORTS.discard(server.port)


@pytest.fixture
def clients(relay):
    """Factory: clients(client_id) -> a started Client of ``relay``, stopped at teardown."""
    made = []

    def make(client_id: str) -> Client:
        client = Client(f"ws://127.0.0.1:{relay.port}", client_id).start()
        made.append(client)
        return client

    yield make
    for client in reversed(made):
        client.stop()


@pytest.fixture
def echo(request):
    settings = _settings(request)
    service = EchoService(settings.echo_thread)
    yield service
    alive = service.stop()
    if settings.echo_threads_must_end:
        assert not alive, f"echo threads still alive after stop(): {alive}"


@pytest.fixture
def user_sockets(request):
    """Factory: user_sockets(port) -> a TCP connection to 127.0.0.1:port, closed at teardown."""
    timeout = _settings(request).socket_timeout
    opened = []

    def connect(port: int) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        opened.append(sock)
        return sock

    yield connect
    for sock in opened:
        sock.close()


@pytest.fixture
def client_app(relay, tmp_path):
    """A started ClientApp "A" of ``relay`` with its local admin API on a free port (its secret in
    ``tmp_path``, and in CLIENT_API_KEYS for the tests' requests)."""
    secret_file = tmp_path / "client.api-secret"
    app = ClientApp(tmp_path / "client.json", {"server": f"ws://127.0.0.1:{relay.port}", "clientId": "A",
                                                "adminPort": 0}, api_secret_path=secret_file).start()
    CLIENT_API_KEYS[app.admin.port] = secret_file.read_text().strip()
    yield app
    app.stop()
    CLIENT_API_KEYS.pop(app.admin.port, None)
