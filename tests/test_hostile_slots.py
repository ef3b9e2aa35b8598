"""Handshake slots, session caps, descriptors and mass teardown (issue 9 items 2, 4, 5; issue 10
items 4, 5): strangers holding slots or sessions never keep honest clients out, and tearing many
sessions down at once neither takes quadratic time nor starves the relay's other threads."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from common import protocol as p
from common.frames import JoinRequest, JoinStatus, pack_data_header

from helpers import HOST, TcpService, connect, echo_handler, echo_roundtrip, recv_exactly, wait_until
from security_support import PROMPT, TOKEN, closed_without_reply, logged, registered_peer

pytestmark = pytest.mark.timeout(90)


@contextlib.contextmanager
def silent_sockets(relay, sources, per_source: int):
    """Connections that never send a byte, ``per_source`` from each address of ``sources``."""
    socks = []
    try:
        for source in sources:
            for _ in range(per_source):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(sock)
                sock.bind((source, 0))
                sock.settimeout(5)
                sock.connect((HOST, relay.port))
        yield socks
    finally:
        for sock in socks:
            sock.close()


# --- 9.2: handshake slots -------------------------------------------------------------------------

def test_silent_sockets_from_four_addresses_do_not_keep_data_channels_or_registrations_out(
        make_server, make_client, services):
    per_source, sources = 16, ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"]
    relay = make_server(token=TOKEN, handshake_timeout=60, max_pending_handshakes=per_source * len(sources),
                        max_pending_handshakes_per_source=per_source)
    echo = services(TcpService(echo_handler, "echo"))
    # no pooled channels: every session here opens fresh data channels into the full slots (and
    # a pool refill taking a stranger's slot would make the count below move)
    a = make_client(relay, "A", token=TOKEN, pool_count=0)
    make_client(relay, "B", token=TOKEN, pool_count=0)
    proxy = a.create_proxy(0, "B", echo.port, protocol="tcp")
    with silent_sockets(relay, sources, per_source):
        wait_until(lambda: relay.handshakes.pending == per_source * len(sources),
                   message="the strangers fill every slot")
        for i in range(3):  # each session needs two data channels from 127.0.0.1
            assert echo_roundtrip(proxy.local_port, b"while the slots are full %d" % i) == \
                b"while the slots are full %d" % i
        late = make_client(relay, "late", token=TOKEN, connect_timeout=10)
        assert late.connected
        assert relay.handshakes.evicted >= 1  # the first data channel took a stranger's slot
        assert relay.handshakes.pending <= relay.handshakes.total
        held = [relay.handshakes.held_by(s) for s in sources]
        assert max(held) - min(held) <= 1, f"eviction takes from the heaviest source first: {held}"
    proxy.close()


def test_a_source_beyond_its_share_cannot_evict_others(make_server):
    relay = make_server(token=TOKEN, handshake_timeout=60, max_pending_handshakes=20,
                        max_pending_handshakes_per_source=100)
    with silent_sockets(relay, ["127.0.0.2"], 10), silent_sockets(relay, ["127.0.0.3"], 10):
        wait_until(lambda: relay.handshakes.pending == 20)
        with silent_sockets(relay, ["127.0.0.3"], 5) as extra:
            for sock in extra:  # 127.0.0.3 already holds its half: the newcomers are refused
                assert closed_without_reply(sock, PROMPT) == (True, b"")
        assert relay.handshakes.held_by("127.0.0.2") == 10
        assert relay.handshakes.evicted == 0


# --- 9.4 / 9.5: session caps ----------------------------------------------------------------------

def open_users(port: int, count: int) -> list[socket.socket]:
    """``count`` user connections through a proxy, each proved live by one echo."""
    users = []
    for i in range(count):
        user = connect(port)
        users.append(user)
        user.sendall(b"u%05d" % i)
        assert recv_exactly(user, 6) == b"u%05d" % i
    return users


def test_pending_sessions_per_client_are_capped_and_the_excess_refused_at_once(
        make_server, make_client, peers, caplog):
    relay = make_server(token=TOKEN, max_pending_sessions_per_client=3, session_join_timeout=60)
    a = make_client(relay, "A", token=TOKEN)
    registered_peer(peers, relay, "B")  # a target that takes connect_requests and never joins
    proxy = a.create_proxy(0, "B", 9, protocol="tcp")
    users = [connect(proxy.local_port) for _ in range(3)]
    try:
        wait_until(lambda: relay.sessions.unjoined_by("A") == 3, message="three sessions wait for B")
        with connect(proxy.local_port) as fourth:
            assert closed_without_reply(fourth, PROMPT) == (True, b"")
        wait_until(lambda: logged(caplog, "sessions waiting to be joined, the relay's limit per client"),
                   message="A logs the relay's clear error")
        assert len(relay.sessions) == 3
        assert relay.caps.limit_log.count("pending") == 1
    finally:
        for user in users:
            user.close()
    proxy.close()


@pytest.mark.parametrize("cap", ["max_sessions", "max_sessions_per_target"])
def test_sessions_overall_and_per_target_are_capped(make_server, make_client, services, caplog, cap):
    relay = make_server(token=TOKEN, **{cap: 2})
    echo = services(TcpService(echo_handler, "echo"))
    make_client(relay, "B", token=TOKEN)
    proxies = [make_client(relay, name, token=TOKEN).create_proxy(0, "B", echo.port, protocol="tcp")
               for name in ("A1", "A2")]
    users = open_users(proxies[0].local_port, 1) + open_users(proxies[1].local_port, 1)
    try:
        with connect(proxies[1].local_port) as third:  # another requester: the cap is not per client
            assert closed_without_reply(third, PROMPT) == (True, b"")
        text = "its limit" if cap == "max_sessions" else "open sessions, the relay's limit per target"
        wait_until(lambda: logged(caplog, text), message="A2 logs the relay's clear error")
        for user in users:  # the first two keep working
            user.sendall(b"still")
            assert recv_exactly(user, 5) == b"still"
        users.pop().close()
        wait_until(lambda: len(relay.sessions) == 1)
        assert echo_roundtrip(proxies[1].local_port) == b"hello through the tunnel"  # room again
    finally:
        for user in users:
            user.close()
    for proxy in proxies:
        proxy.close()


def test_tcp_idle_timeout_closes_only_idle_sessions(make_server, make_client, services):
    relay = make_server(token=TOKEN, tcp_idle_timeout=1.0)
    echo = services(TcpService(echo_handler, "echo"))
    a = make_client(relay, "A", token=TOKEN)
    make_client(relay, "B", token=TOKEN)
    proxy = a.create_proxy(0, "B", echo.port, protocol="tcp")
    idle, busy = open_users(proxy.local_port, 2)
    try:
        started = time.monotonic()
        closed = threading.Event()
        while not closed.is_set() and time.monotonic() - started < 8:
            busy.sendall(b"tick")  # the busy one talks every 0.2 s (pacing, not synchronisation)
            assert recv_exactly(busy, 4) == b"tick"
            idle.settimeout(0.2)
            try:
                if idle.recv(1) == b"":
                    closed.set()
            except socket.timeout:
                pass
            except OSError:  # a reset is a close too
                closed.set()
        assert closed.is_set(), "the idle session was not closed"
        assert 0.9 <= time.monotonic() - started < 6
        busy.sendall(b"alive")
        assert recv_exactly(busy, 5) == b"alive"
        assert len(relay.sessions) == 1
    finally:
        idle.close()
        busy.close()
    proxy.close()


def test_tcp_idle_timeout_is_off_by_default(make_server):
    relay = make_server(token=TOKEN)
    assert relay.config.tcp_idle_timeout == 0


# --- 10.5: the descriptor limit ---------------------------------------------------------------------

RELAY_AT_A_LIMIT = r"""
import logging, resource, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[1]), resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(threadName)s %(levelname)s %(message)s")
from chuantou_server import Server
relay = Server(host="127.0.0.1", port=0, token=sys.argv[3], handshake_timeout=60,
               descriptor_reserve=int(sys.argv[2])).start()
print(relay.port, flush=True)
sys.stdin.read()  # until the test closes our stdin
relay.stop()
"""


@contextlib.contextmanager
def relay_with_fd_limit(tmp_path, limit: int, reserve: int):
    """A relay in a subprocess whose RLIMIT_NOFILE is ``limit``; yields (port, a function reading its log)."""
    log_path = tmp_path / "relay.log"
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen([sys.executable, "-c", RELAY_AT_A_LIMIT, str(limit), str(reserve), TOKEN],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log_file, text=True,
                                cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        port = int(proc.stdout.readline())
        yield port, log_path.read_text
    finally:
        proc.stdin.close()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class RelayAt:
    """What helpers need of a relay: its port."""

    def __init__(self, port: int):
        self.port = port


def test_at_the_descriptor_limit_a_data_channel_is_refused_at_once_with_busy(tmp_path):
    with relay_with_fd_limit(tmp_path, limit=90, reserve=0) as (port, relay_log):
        with silent_sockets(RelayAt(port), ["127.0.0.2"], 120) as silent:
            def told_busy() -> int:
                count = 0
                for sock in silent:
                    sock.settimeout(0)
                    try:
                        count += sock.recv(1, socket.MSG_PEEK) == bytes([JoinStatus.BUSY])
                    except OSError:
                        pass
                return count
            wait_until(lambda: told_busy() >= 20, timeout=30, message="connections beyond the limit are told busy")
            started = time.monotonic()
            with socket.create_connection((HOST, port), timeout=PROMPT) as channel:
                channel.sendall(pack_data_header(JoinRequest("A", "ab" * 16, "cd" * 16)))
                assert recv_exactly(channel, 1) == bytes([JoinStatus.BUSY])
            assert time.monotonic() - started < PROMPT
        text = relay_log()
    assert text.count("out of file descriptors (") == 1, "logged once per interval, not ten times a second"
    assert "accept failed" not in text


def test_the_descriptor_reserve_refuses_new_sessions_at_once_and_keeps_room_for_registrations(
        tmp_path, make_client, services):
    echo = services(TcpService(echo_handler, "echo"))
    with relay_with_fd_limit(tmp_path, limit=120, reserve=40) as (port, relay_log):
        url = f"ws://{HOST}:{port}"
        a = make_client(url, "A", token=TOKEN)
        make_client(url, "B", token=TOKEN)
        proxy = a.create_proxy(0, "B", echo.port, protocol="tcp")
        users, refused = [], 0
        try:
            for i in range(60):  # 120 descriptors, 40 kept back: about 30 sessions fit
                user = connect(proxy.local_port)
                started = time.monotonic()
                user.sendall(b"user %02d" % i)
                user.settimeout(PROMPT)
                try:
                    got = user.recv(7)
                except OSError:
                    got = b""
                if got == b"user %02d" % i:
                    users.append(user)
                    continue
                assert time.monotonic() - started < PROMPT, "a refused session is refused at once"
                refused += 1
                user.close()
                if refused == 3:
                    break
            assert refused == 3 and 10 <= len(users) <= 45, (refused, len(users))
            late = make_client(url, "late", token=TOKEN, connect_timeout=10)  # the reserve serves it
            assert late.connected
            for user in users:  # the sessions that fit keep working
                user.sendall(b"still")
                assert recv_exactly(user, 5) == b"still"
        finally:
            for user in users:
                user.close()
        proxy.close()
        assert relay_log().count("out of file descriptors for new sessions") == 1


# --- 10.4: mass teardown ------------------------------------------------------------------------------

GATEWAY = r"""
import resource, sys, threading
resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
from chuantou_client import Client
client = Client(sys.argv[1], "A", token=sys.argv[2], path="relay").start()  # the relay holds the sessions
proxy = client.create_proxy(0, "B", int(sys.argv[3]), protocol="tcp")
print(proxy.local_port, flush=True)
threading.Event().wait()
"""
TEARDOWN_SESSIONS = 600
TEARDOWN_BOUND = 10.0  # seconds; about 1 s here when the machine is quiet


@pytest.mark.timeout(180)
def test_a_killed_gateway_with_many_sessions_is_cleaned_up_quickly_and_heartbeats_are_answered(
        make_server, make_client, services, peers):
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 8 * TEARDOWN_SESSIONS:
        pytest.skip(f"needs {8 * TEARDOWN_SESSIONS} descriptors")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    relay = make_server(token=TOKEN, heartbeat_timeout=60)
    echo = services(TcpService(echo_handler, "echo"))
    make_client(relay, "B", token=TOKEN)
    probe = registered_peer(peers, relay, "probe")
    gateway = subprocess.Popen([sys.executable, "-c", GATEWAY, f"ws://{HOST}:{relay.port}", TOKEN, str(echo.port)],
                               stdout=subprocess.PIPE, text=True,
                               cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    users = []
    try:
        proxy_port = int(gateway.stdout.readline())
        users = open_users(proxy_port, TEARDOWN_SESSIONS)
        wait_until(lambda: len(relay.sessions) == TEARDOWN_SESSIONS)
        started = time.monotonic()
        gateway.kill()
        worst = 0.0
        while len(relay.sessions) and time.monotonic() - started < TEARDOWN_BOUND:
            sent = time.monotonic()
            probe.send(p.Heartbeat(timestamp=sent))
            probe.recv_until(p.Heartbeat, timeout=TEARDOWN_BOUND)
            worst = max(worst, time.monotonic() - sent)
        took = time.monotonic() - started
        assert not len(relay.sessions), f"{len(relay.sessions)} sessions left after {took:.1f} s"
        assert worst < 3.0, f"a heartbeat took {worst:.2f} s to be answered during the {took:.1f} s teardown"
    finally:
        gateway.kill()
        gateway.wait()
        for user in users:
            user.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
