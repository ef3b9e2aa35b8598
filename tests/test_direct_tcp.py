"""The direct path for TCP (issue 15): simultaneous open between two clients behind their own
NATs, timed through the relay, sealed like a relayed session, with the relay as the fallback.

In network namespaces built by the test (tests/direct_support.py: each client behind an
iptables MASQUERADE router that drops what arrives unasked; ``--random-fully`` on A's router
makes it symmetric); they need root, `ip` and `iptables`. The processes are in
tests/direct_tcp_support.py. Loopback cases: test_direct_tcp_loopback.py.
"""

from __future__ import annotations

import shutil

import pytest

import direct_tcp_support as support
from common import direct as d
from direct_support import NatTopology
from helpers import wait_until
from netns_support import netns_unavailable

TOKEN = "direct-tcp-test-token-0123456789"
MIB = 16


def _unavailable() -> str | None:
    reason = netns_unavailable()
    if reason is None and shutil.which("iptables") is None:
        reason = "iptables is not installed"
    return reason


needs_netns = pytest.mark.skipif(_unavailable() is not None, reason=str(_unavailable()))


@pytest.fixture(params=[False, True], ids=["cone", "symmetric"])
def nats(request, tmp_path):
    reason = _unavailable()
    if reason:
        pytest.skip(reason)
    topo = NatTopology(tmp_path, symmetric_a=request.param).create()
    try:
        relay = support.start(topo, "p", "relay", "--token", TOKEN)
        url = lambda side: f"ws://{topo.relay_ip[side]}:{relay.ready['port']}"  # noqa: E731
        target = support.start(topo, "b", "target", "--url", url("b"), "--token", TOKEN)
        gateway = support.start(topo, "a", "gateway", "--url", url("a"), "--token", TOKEN,
                                "--service-port", target.ready["servicePort"])
        yield request.param, relay, target, gateway
    finally:
        topo.destroy()


def _tcp_paths(status: dict) -> list[str]:
    return [c["path"] for c in status["connections"] if c["protocol"] == "tcp"]


@needs_netns
@pytest.mark.timeout(180)
def test_a_tcp_session_goes_direct_behind_cone_nats_and_falls_back_to_the_relay_behind_a_symmetric_one(nats):
    symmetric, relay, target, gateway = nats
    result = gateway.command(f"tcp {MIB}", timeout=120.0)
    assert result["intact"] and not result["errors"], result  # 16 MiB each way, sha256 equal
    pair = result["direct"]["pairs"]["B"]
    if not symmetric:
        assert pair["last"] == "direct", result["direct"]
        assert _tcp_paths(target.status()) in (["direct"], [])  # B's side: direct too (or ended already)
        wait_until(lambda: _tcp_paths(target.status()) == [], message="B's side of the session never ended")
        wait_until(lambda: relay.command("traffic")["sessions"] == 0, message="the relay still holds the session")
        traffic = relay.command("traffic")
        assert traffic["tcpBytesRelayed"] == 0  # not one byte crossed it
        # but the relay knows what went direct: the clients reported it (payload bytes, 16 MiB each way)
        assert min(traffic["tcpDirectReported"]) >= MIB << 20, traffic
        again = gateway.command("tcp 1", timeout=60.0)  # the pair that went direct goes direct first again
        assert again["intact"] and again["direct"]["pairs"]["B"]["successes"] == 2, again
        assert relay.command("traffic")["tcpBytesRelayed"] == 0
        return
    # the attempt failed: the user waited at most the deadline (plus setup), then the relay carried it
    assert result["firstByte"] <= d.DEFAULT_DEADLINE + 0.5, result
    assert pair["last"] == "relay" and pair["failures"] == 1 and pair["retryIn"] > 0, pair  # retried later
    assert relay.command("traffic")["tcpBytesRelayed"] >= 2 * MIB << 20
    again = gateway.command("tcp 1", timeout=60.0)  # within the backoff: straight to the relay, no waiting
    assert again["intact"] and again["firstByte"] < d.DEFAULT_DEADLINE / 2, again
    assert again["direct"]["pairs"]["B"]["failures"] == 1, again["direct"]  # not tried again yet
