"""A silent link is noticed, and the sessions behind it end as resets (issue 10 item 2).

The relay and client B run in network namespaces of their own, joined by a veth link that the
test blackholes (an iptables DROP at both ends, or one end taken down) while a download runs or
a connection sits idle. Client A and the user stay in the test's namespace, on a second link to
the relay. Each test gives the relay and the clients short timeouts and leaves one mechanism to
do the work, so a regression in it shows:

- data channels' own liveness (TCP keepalive and TCP_USER_TIMEOUT, ``data_channel_timeout``)
  with heartbeats too slow to matter;
- heartbeats alone (data channel liveness off): the relay drops the silent client, and a client
  whose control channel is declared dead settles its sessions itself, since the relay's resets
  cannot reach it;
- both, with the link to client A cut instead.

In each, the user's connection must end with a reset (not a clean end, not a hang) within
DEADLINE; B (or A) must end its session, resetting the service, before the link is back; and
once it is back, the tunnel carries a new session.
"""

from __future__ import annotations

import inspect
import select
import socket
import time

import pytest

from chuantou_client import Client
from chuantou_server import Server, ServerConfig
from chuantou_server import app as server_app
from common.net import keep_alive
from helpers import connect, free_port, recv_exactly, wait_until
from netns_support import Topology, netns_unavailable

TOKEN = "silent-link-test-token-0123"
LIVENESS = 5.0  # dataChannelTimeout / heartbeat timeout where a mechanism is on
SLOW = 120.0  # a mechanism "off" by being far slower than the test
DEADLINE = 15.0  # LIVENESS plus probes, a heartbeat tick and the relay's housekeeping tick, with margin
RECOVERY = 20.0  # after the link is back: reconnect (backoff, TCP retransmission) and a new session


@pytest.fixture
def topology(tmp_path):
    reason = netns_unavailable()
    if reason:
        pytest.skip(reason)
    topo = Topology(tmp_path)
    try:
        yield topo.create()
    finally:
        topo.destroy()


class Tunnel:
    """The relay (namespace r), client B and its service (namespace b), client A here, and A's proxy."""

    def __init__(self, topology: Topology, make_client, *, heartbeat_timeout: float, data_channel_timeout: float,
                 heartbeat_interval: float = 1.0):
        timeouts = ("--heartbeat-timeout", heartbeat_timeout, "--data-channel-timeout", data_channel_timeout)
        self.relay = topology.start(topology.relay_ns, "relay", "--token", TOKEN, *timeouts)
        port = self.relay.ready["port"]
        self.b = topology.start(topology.b_ns, "target", "--url", f"ws://{topology.b_relay.addr}:{port}",
                                "--token", TOKEN, "--heartbeat-interval", heartbeat_interval, *timeouts)
        self.a = make_client(f"ws://{topology.a_relay.addr}:{port}", "A", token=TOKEN,
                             heartbeat_interval=heartbeat_interval,
                             heartbeat_timeout=heartbeat_timeout, data_channel_timeout=data_channel_timeout,
                             connect_timeout=3.0, reconnect_max_delay=1.0)
        self.port = free_port()
        self.a.create_proxy(self.port, "B", self.b.ready["servicePort"], protocol="tcp")

    def download(self) -> socket.socket:
        """A user's download, under way."""
        user = connect(self.port, timeout=DEADLINE)
        user.sendall(b"stream\n")
        recv_exactly(user, 1 << 20)
        return user

    def upload(self) -> socket.socket:
        """A user's upload, under way: the service has taken 1 MiB."""
        user = self.idle_connection()
        user.sendall(b"u" * (1 << 20))
        self.wait_b(lambda s: s["received"] and s["received"][-1] >= 1 << 20, DEADLINE, "the service took 1 MiB")
        return user

    def idle_connection(self) -> socket.socket:
        """A user's connection that went through once and now sits idle."""
        user = connect(self.port, timeout=DEADLINE)
        user.sendall(b"idle\n")
        assert recv_exactly(user, 5) == b"idle\n"
        self.wait_b(lambda s: s["activeSessions"] == 1, DEADLINE, "B holds the session")
        return user

    def wait_b(self, predicate, timeout: float, what: str) -> dict:
        last = {}

        def check():
            last.update(self.b.status())
            return predicate(last)
        try:
            wait_until(check, timeout, 0.2, what)
        except AssertionError:
            raise AssertionError(f"not true within {timeout:g} s: {what}; B's status {last}; "
                                 f"B's log:\n{self.b.log_tail()}") from None
        return last

    def b_settled(self, started: float) -> None:
        """B ended its session before the link is back, and ended the service's connection with a reset."""
        remaining = max(0.5, started + DEADLINE - time.monotonic())
        self.wait_b(lambda s: s["activeSessions"] == 0 and "open" not in s["service"], remaining,
                    "B has no session left and the service's connection has ended")
        ends = self.b.status()["service"]
        assert ends == ["reset"], f"the service's connection of a cut session ended as {ends}"

    def recovered(self) -> None:
        """After the link is back: nothing left over, and a new session goes through."""
        self.wait_b(lambda s: s["connected"], RECOVERY, "B registered with the relay")
        wait_until(lambda: self.a.connected, RECOVERY, 0.1, "A registered with the relay")
        assert self.b.status()["activeSessions"] == 0
        assert self.relay.status()["sessions"] == 0, "the relay kept the cut session"

        def echo():
            try:
                user = connect(self.port, timeout=5.0)
            except OSError:
                return False
            with user:
                user.sendall(b"idle\n")
                try:
                    return recv_exactly(user, 5) == b"idle\n"
                except OSError:
                    return False
        wait_until(echo, RECOVERY, 0.2, "a new session through the tunnel once the link is back")


def how_it_ends(user: socket.socket, timeout: float, upload: bool = False) -> tuple[str, float]:
    """Read (and with ``upload`` keep sending) until the connection ends; return ('reset' | 'eof' |
    'hang' | 'error: ...', seconds it took). One thread does both, so the error a reset leaves on
    the socket is seen here, not taken by a sender elsewhere (after which recv reads a plain 0)."""
    started = time.monotonic()
    deadline = started + timeout
    block = b"u" * 65536
    user.setblocking(False)
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return "hang", timeout
            readable, writable, _ = select.select([user], [user] if upload else [], [], remaining)
            if readable and not user.recv(1 << 20):
                return "eof", time.monotonic() - started
            if writable:
                user.send(block)
    except (ConnectionResetError, BrokenPipeError):
        return "reset", time.monotonic() - started
    except OSError as exc:
        return f"error: {exc}", time.monotonic() - started
    finally:
        user.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("direction", ["download", "upload"])
def test_a_transfer_behind_a_silent_link_ends_as_a_reset_by_data_channel_liveness(topology, make_client, direction):
    """Download: B's unacknowledged data times out (TCP_USER_TIMEOUT) and the relay's keepalive
    probes go unanswered; upload: the other way round."""
    tunnel = Tunnel(topology, make_client, heartbeat_timeout=SLOW, data_channel_timeout=LIVENESS)
    user = tunnel.download() if direction == "download" else tunnel.upload()
    started = time.monotonic()
    topology.drop(topology.b_relay, topology.b_client)
    how, took = how_it_ends(user, DEADLINE, upload=direction == "upload")
    assert how == "reset", f"the {direction} behind a silent link ended as {how!r} after {took:.1f} s"
    tunnel.b_settled(started)
    topology.undrop()
    tunnel.recovered()


@pytest.mark.timeout(120)
def test_an_idle_connection_behind_a_dead_link_ends_as_a_reset_by_heartbeats(topology, make_client):
    tunnel = Tunnel(topology, make_client, heartbeat_timeout=LIVENESS, data_channel_timeout=0)
    user = tunnel.idle_connection()
    started = time.monotonic()
    topology.link_down(topology.b_relay)
    how, took = how_it_ends(user, DEADLINE)
    assert how == "reset", f"an idle connection behind a dead link ended as {how!r} after {took:.1f} s"
    tunnel.b_settled(started)
    topology.link_up(topology.b_relay)
    tunnel.recovered()


@pytest.mark.timeout(120)
def test_a_dead_link_to_client_a_resets_the_user_and_the_service(topology, make_client):
    tunnel = Tunnel(topology, make_client, heartbeat_timeout=LIVENESS, data_channel_timeout=LIVENESS)
    user = tunnel.idle_connection()
    started = time.monotonic()
    topology.link_down(topology.a_relay)
    how, took = how_it_ends(user, DEADLINE)
    assert how == "reset", f"a connection whose client A lost the relay ended as {how!r} after {took:.1f} s"
    tunnel.b_settled(started)
    topology.link_up(topology.a_relay)
    tunnel.recovered()


# --- the defaults, without namespaces --------------------------------------------------------------

ABOUT_30_S = 31.0  # "a silent link is noticed within about 30 s", with the relay's 0.5 s housekeeping tick


def _default(cls, name: str):
    return inspect.signature(cls).parameters[name].default


def test_the_defaults_notice_a_silent_link_within_about_30_s():
    client_heartbeat = _default(Client, "heartbeat_interval") + _default(Client, "heartbeat_timeout")
    assert client_heartbeat <= ABOUT_30_S, "a client checks its relay's silence once per heartbeat interval"
    assert _default(ServerConfig, "heartbeat_timeout") + 0.5 <= ABOUT_30_S
    assert server_app.CONFIG_KEYS["heartbeatTimeout"].default == _default(ServerConfig, "heartbeat_timeout")
    for timeout in (_default(Client, "data_channel_timeout"), _default(ServerConfig, "data_channel_timeout"),
                    server_app.CONFIG_KEYS["dataChannelTimeout"].default):
        assert 0 < timeout <= ABOUT_30_S


@pytest.mark.parametrize("timeout", [5.0, 30.0])
def test_keep_alive_gives_up_on_a_silent_peer_within_its_timeout(timeout):
    with socket.socket() as sock:
        keep_alive(sock, timeout)
        get = lambda name: sock.getsockopt(socket.IPPROTO_TCP, getattr(socket, name))  # noqa: E731
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert get("TCP_KEEPIDLE") + get("TCP_KEEPINTVL") * get("TCP_KEEPCNT") <= timeout  # an idle channel
        assert get("TCP_USER_TIMEOUT") == timeout * 1000  # one whose sent data goes unacknowledged
