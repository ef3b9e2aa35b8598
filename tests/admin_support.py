"""Helpers and fixtures shared by the admin page tests (test_admin_api.py, test_admin_browser.py,
test_client_api_auth.py): a relay with an admin token on 127.0.0.1 port 0, client and client-app
factories, the user's sockets, and a pump that keeps bytes flowing through an echo path (the echo
itself is conftest's ``tcp_echo``).

A test module imports the fixtures it uses (``from admin_support import relay, ...``; pytest
finds fixtures imported into a test module). Threads started here are named ``svc-...`` so
conftest.py's leak check watches them.
"""

from __future__ import annotations

import socket
import threading

import pytest

from chuantou_client import Client
from chuantou_client.app import ClientApp

from helpers import connect, echo_bytes, relay_url


# --- helpers ----------------------------------------------------------------------------------

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
                echo_bytes(self.sock, self.size)
                self.stopping.wait(self.pause)
        except OSError:  # the echo path closed (ConnectionError) or broke
            pass

    def stop(self):
        self.stopping.set()
        self.thread.join(5)


# --- fixtures ---------------------------------------------------------------------------------

ADMIN_TOKEN = "admin-support-admin-token-0123"  # the fixture relay's admin page credential
ADMIN_PORTS: set[int] = set()  # ports of fixture relays, whose requests send ADMIN_TOKEN by default
CLIENT_API_KEYS: dict[int, str] = {}  # local API port of a fixture client app -> its API secret


@pytest.fixture
def relay(make_server):
    """A relay whose admin page answers requests carrying ADMIN_TOKEN (sent by default, see ADMIN_PORTS)."""
    server = make_server(admin_token=ADMIN_TOKEN)
    ADMIN_PORTS.add(server.port)
    yield server
    ADMIN_PORTS.discard(server.port)


@pytest.fixture
def clients(relay, make_client):
    """Factory: clients(client_id) -> a started Client of ``relay``, stopped at teardown."""

    def make(client_id: str) -> Client:
        return make_client(relay, client_id)

    return make


@pytest.fixture
def user_sockets():
    """Factory: user_sockets(port) -> a TCP connection to 127.0.0.1:port, closed at teardown."""
    opened = []

    def open_user(port: int) -> socket.socket:
        sock = connect(port)
        opened.append(sock)
        return sock

    yield open_user
    for sock in opened:
        sock.close()


@pytest.fixture
def client_app(relay, tmp_path):
    """A started ClientApp "A" of ``relay`` with its local admin API on a free port (its secret in
    ``tmp_path``, and in CLIENT_API_KEYS for the tests' requests)."""
    secret_file = tmp_path / "client.api-secret"
    app = ClientApp(tmp_path / "client.json", {"server": relay_url(relay), "clientId": "A", "adminPort": 0},
                    api_secret_path=secret_file).start()
    CLIENT_API_KEYS[app.admin.port] = secret_file.read_text().strip()
    yield app
    app.stop()
    CLIENT_API_KEYS.pop(app.admin.port, None)
