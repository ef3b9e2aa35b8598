"""Tearing down many sessions at once must be prompt (issue 13, sessions at scale).

- A pipe whose writer is stuck on a sealed (TLS) stream, its peer not reading, aborts at once:
  an abort shut the stream down through its own SHUT_WR, which queued close_notify behind the
  stuck writer's lock and waited 0.1 s for it, so a client aborting thousands of such sessions
  (``stop()``, a lost link to the relay, the relay's session_closed on the control reader)
  spent 0.1 s on each, serially.
- 200 sessions through a real relay: once the users close them, the clients' threads are back
  to idle within a deadline; ``stop()`` with 200 open sessions returns within a bound.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest

from common.pipe import STUCK_WRITE, Pipe
from common.threads import ThreadGroup
from common.tls import TlsStream, client_context, server_context

from helpers import connect, echo_handler, TcpService, wait_until
from security_support import make_self_signed

STUCK_PIPES = 30
SESSIONS = 200


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    return make_self_signed(tmp_path_factory.mktemp("mass-teardown"), "peer")


def small_tcp_pair() -> tuple[socket.socket, socket.socket]:
    """A loopback TCP pair with small buffers, so that a writer into it blocks after a few KiB."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        left = socket.socket()
        left.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        left.settimeout(10)
        left.connect(listener.getsockname())
        right, _ = listener.accept()
        right.settimeout(10)
    return left, right


def tls_over(left: socket.socket, right: socket.socket, cert) -> tuple[TlsStream, TlsStream]:
    deadline = time.monotonic() + 10
    result = {}
    thread = threading.Thread(
        target=lambda: result.setdefault("server", TlsStream.handshake(
            right, server_context(cert.cert, cert.key), True, deadline)),
        name="svc-tls-handshake", daemon=True)
    thread.start()
    client = TlsStream.handshake(left, client_context(insecure=True), False, deadline)
    thread.join(10)
    client.settimeout(None)  # as a session's: blocking
    return client, result["server"]


class StuckPipe:
    """A Pipe from a plain socket into a TLS stream whose peer never reads: once the small
    buffers are full, the a -> b writer blocks in sendall."""

    def __init__(self, group: ThreadGroup, cert):
        self.feed, plain = socket.socketpair()
        carrier, far = small_tcp_pair()
        self.tls, self.far_tls = tls_over(carrier, far, cert)
        self.far = far
        self.pipe = Pipe(plain, self.tls)
        self.done = threading.Event()
        group.spawn("stuck", self._run, group)
        self.feed.setblocking(False)
        chunk = b"x" * 65536
        try:
            for _ in range(64):  # a few MiB offered; the pipe takes what the buffers hold
                self.feed.send(chunk)
        except BlockingIOError:
            pass

    def _run(self, group: ThreadGroup) -> None:
        try:
            self.pipe.run(group, "stuck-b")
        finally:
            self.done.set()

    def stuck(self) -> bool:
        since = self.pipe._writing_since[0]
        return bool(since) and time.monotonic() - since > STUCK_WRITE

    def close(self) -> None:
        for sock in (self.feed, self.far):
            sock.close()


@pytest.mark.timeout(60)
def test_aborting_pipes_stuck_writing_into_a_tls_stream_is_prompt(cert):
    group = ThreadGroup("chuantou-test-stuck")
    pipes = [StuckPipe(group, cert) for _ in range(STUCK_PIPES)]
    try:
        wait_until(lambda: all(p.stuck() for p in pipes), timeout=15,
                   message="every pipe's writer blocked on its TLS stream")
        t0 = time.monotonic()
        for p in pipes:
            p.pipe.abort()
        took = time.monotonic() - t0
        # before the fix: 0.1 s each (30 pipes: 3 s), all of it in the aborting thread
        assert took < 1.0, f"aborting {STUCK_PIPES} pipes with stuck TLS writers took {took:.2f} s"
        wait_until(lambda: all(p.done.is_set() for p in pipes), timeout=5,
                   message="every stuck pipe ended after its abort")
        assert all(p.pipe.aborted for p in pipes)
    finally:
        for p in pipes:
            p.pipe.abort()
        group.join_all(timeout=5)
        for p in pipes:
            p.close()


# --- 200 sessions through a real relay ------------------------------------------------------------

def library_threads(prefix: str) -> int:
    return sum(1 for t in threading.enumerate() if t.name.startswith(prefix) and t.is_alive())


def client_threads(client) -> int:
    """The client's threads and its proxies' (the pumps of its sessions as A run in the proxy's group)."""
    return library_threads(f"chuantou-client-{client.client_id}-") + sum(
        library_threads(proxy.threads.prefix + "-") for proxy in client.proxies)


def open_sessions(port: int, count: int) -> list[socket.socket]:
    users = []
    for i in range(count):
        user = connect(port, timeout=30)
        users.append(user)
        user.sendall(b"%06d" % i)
    for i, user in enumerate(users):  # every session answered: all are up through the relay
        got = b""
        while len(got) < 6:
            chunk = user.recv(6 - len(got))
            assert chunk, f"session {i} ended before its echo"
            got += chunk
        assert got == b"%06d" % i
    return users


@pytest.fixture
def many(make_server, make_client, services):
    caps = SESSIONS + 50
    relay = make_server(max_sessions=caps, max_sessions_per_client=caps, max_sessions_per_target=caps)
    b = make_client(relay, "B")
    a = make_client(relay, "A")
    echo = services(TcpService(echo_handler, "echo"))
    proxy = a.create_proxy(0, "B", echo.port, protocol="tcp")
    return relay, a, b, proxy


@pytest.mark.timeout(120)
def test_threads_return_to_idle_after_200_sessions_close(many):
    _, a, b, proxy = many
    idle = {c.client_id: client_threads(c) for c in (a, b)}
    users = open_sessions(proxy.local_port, SESSIONS)
    assert client_threads(a) >= idle["A"] + SESSIONS  # a pump pair per session
    for user in users:
        user.close()
    wait_until(lambda: all(client_threads(c) <= idle[c.client_id] + 2 for c in (a, b)), timeout=20,
               message="A's and B's threads back to idle after the sessions closed")
    wait_until(lambda: len(a.sessions) == 0 and len(b.sessions) == 0, timeout=5)


@pytest.mark.timeout(120)
def test_stop_with_200_open_sessions_is_prompt(many):
    _, a, b, proxy = many
    users = open_sessions(proxy.local_port, SESSIONS)
    try:
        for client in (b, a):
            t0 = time.monotonic()
            client.stop()
            took = time.monotonic() - t0
            assert took < 10.0, f"{client.client_id}.stop() with {SESSIONS} open sessions took {took:.1f} s"
            wait_until(lambda: client_threads(client) == 0, timeout=2,
                       message=f"{client.client_id}'s threads all ended with its stop()")
    finally:
        for user in users:
            user.close()
