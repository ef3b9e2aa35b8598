"""Fixtures: a relay on 127.0.0.1 port 0, client factories, local services, and an autouse
check that every thread a test started (the library's ``chuantou-...`` and the test's own
``svc-...``) is gone once its fixtures are torn down."""

from __future__ import annotations

import logging
import threading

import pytest
import websocket

from chuantou_client import Client
from chuantou_server import Server
from common.threads import tune_for_many_threads

from helpers import (
    SERVICE_THREAD_PREFIX,
    HttpService,
    TcpService,
    UdpEchoService,
    echo_handler,
    relay_url,
    text_route,
    wait_until,
    ws_echo,
)
from security_support import ControlPeer

tune_for_many_threads()  # the tests run relays and clients in this process, tuned as the CLIs tune theirs

LIBRARY_THREAD_PREFIX = "chuantou-"
LEAK_DEADLINE = 5.0


class _CrashCollector(logging.Handler):
    """Collects log records that carry an exception: a library thread died of something unexpected."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        if record.exc_info:
            self.records.append(record)


@pytest.fixture(autouse=True)
def no_leaked_threads():
    """Fail the test if a thread it started outlives its fixtures, or a library thread crashed."""
    before = set(threading.enumerate())
    crashes = _CrashCollector()
    logger = logging.getLogger("chuantou")
    logger.addHandler(crashes)
    try:
        yield

        def leftovers():
            return sorted(
                t.name for t in threading.enumerate()
                if t not in before and t.is_alive()
                and t.name.startswith((LIBRARY_THREAD_PREFIX, SERVICE_THREAD_PREFIX))
            )

        try:
            wait_until(lambda: not leftovers(), timeout=LEAK_DEADLINE)
        except AssertionError:
            pytest.fail(f"threads still alive {LEAK_DEADLINE:g} s after teardown: {leftovers()}")
        if crashes.records:
            text = "; ".join(f"{r.threadName}: {r.getMessage()} ({r.exc_info[1]!r})" for r in crashes.records)
            pytest.fail(f"library threads failed with an exception: {text}")
    finally:
        logger.removeHandler(crashes)


# --- relay and clients -------------------------------------------------------------------------

@pytest.fixture
def make_server():
    """Factory: make_server(**Server kwargs) -> a started Server on 127.0.0.1 (port 0 unless given)."""
    servers = []

    def make(**kwargs) -> Server:
        kwargs.setdefault("host", "127.0.0.1")
        kwargs.setdefault("port", 0)
        server = Server(**kwargs)
        servers.append(server)
        return server.start()

    yield make
    for server in reversed(servers):
        server.stop()


@pytest.fixture
def server(make_server) -> Server:
    return make_server()


@pytest.fixture
def make_client():
    """Factory: make_client(server_or_url, client_id=None, **Client kwargs) -> a started Client.

    Its sessions cross the relay (``path="relay"``) unless the test asks otherwise: on one host
    every TCP session and UDP flow would go direct (issue 15), and most tests mean the relay."""
    clients = []

    def make(server_or_url, client_id: str | None = None, **kwargs) -> Client:
        url = server_or_url if isinstance(server_or_url, str) else relay_url(server_or_url)
        kwargs.setdefault("path", "relay")
        client = Client(url, client_id, **kwargs)
        clients.append(client)
        return client.start()

    yield make
    for client in reversed(clients):
        client.stop()


@pytest.fixture
def client_a(server, make_client) -> Client:
    return make_client(server, "A")


@pytest.fixture
def client_b(server, make_client) -> Client:
    return make_client(server, "B")


@pytest.fixture
def peers():
    """Factory: peers(server, **options) -> a bare control channel (security_support.ControlPeer)
    past the relay's challenge, closed at teardown."""
    opened: list[ControlPeer] = []

    def open_peer(server, **options) -> ControlPeer:
        peer = ControlPeer(server, **options)
        opened.append(peer)
        return peer

    yield open_peer
    for peer in opened:
        peer.close()


# --- local services ----------------------------------------------------------------------------

@pytest.fixture
def services():
    """Factory: services(service) starts it and stops it at teardown (asserting its threads ended)."""
    started = []

    def start(service):
        started.append(service)
        return service.start()

    yield start
    alive = []
    for service in reversed(started):
        alive += service.stop()
    assert not alive, f"service threads did not end: {alive}"


@pytest.fixture
def tcp_echo(services) -> TcpService:
    return services(TcpService(echo_handler, "echo"))


@pytest.fixture
def udp_echo(services) -> UdpEchoService:
    return services(UdpEchoService())


@pytest.fixture
def http_service(services) -> HttpService:
    return services(HttpService({("GET", "/"): text_route("This is clientB service")}, name="http"))


@pytest.fixture
def ws_echo_service(services) -> HttpService:
    return services(HttpService(ws_session=ws_echo, name="ws-echo"))


@pytest.fixture
def ws_clients():
    """Factory: ws_clients(ws) registers a user-side websocket-client connection to close at teardown."""
    opened: list[websocket.WebSocket] = []

    def track(ws: websocket.WebSocket) -> websocket.WebSocket:
        opened.append(ws)
        return ws

    yield track
    for ws in opened:
        try:
            ws.close(timeout=1)
        except Exception:  # already closed by the other end
            pass
        ws.shutdown()
