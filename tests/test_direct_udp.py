"""The direct path for UDP (issue 15, first slice): NAT discovery and hole punching between two
clients behind their own NATs, with the relay as the fallback.

In network namespaces built by the test (tests/direct_support.py); they need root, `ip` and
`iptables`. TCP proxies always cross the relay in this slice (no simultaneous open yet).
"""

from __future__ import annotations

import shutil

import pytest

from common import direct as d
from direct_support import NatTopology
from helpers import wait_until
from netns_support import netns_unavailable

TOKEN = "direct-path-test-token-0123456789"
DATAGRAMS = 1000


def _unavailable() -> str | None:
    reason = netns_unavailable()
    if reason is None and shutil.which("iptables") is None:
        reason = "iptables is not installed"
    return reason


needs_netns = pytest.mark.skipif(_unavailable() is not None, reason=str(_unavailable()))


def _start(tmp_path, symmetric_a: bool):
    topo = NatTopology(tmp_path, symmetric_a=symmetric_a).create()
    relay = topo.start("p", "relay", "--token", TOKEN)
    url = lambda side: f"ws://{topo.relay_ip[side]}:{relay.ready['port']}"  # noqa: E731
    target = topo.start("b", "target", "--url", url("b"), "--token", TOKEN)
    gateway = topo.start("a", "gateway", "--url", url("a"), "--token", TOKEN,
                         "--service-port", target.ready["servicePort"])
    return topo, relay, target, gateway


def _nat(proc) -> str:
    """The NAT mapping the client found, once its probe is done."""
    def probed():
        mapping = proc.status()["direct"]["nat"]["mapping"]
        return mapping if mapping != "not probed yet" else None
    return wait_until(probed, timeout=10.0, interval=0.1, message="the client never finished its NAT probe")


@pytest.fixture
def cone(tmp_path):
    reason = _unavailable()
    if reason:
        pytest.skip(reason)
    topo, *procs = _start(tmp_path, symmetric_a=False)
    try:
        yield procs
    finally:
        topo.destroy()


@pytest.fixture
def symmetric(tmp_path):
    reason = _unavailable()
    if reason:
        pytest.skip(reason)
    topo, *procs = _start(tmp_path, symmetric_a=True)
    try:
        yield procs
    finally:
        topo.destroy()


@needs_netns
def test_behind_two_cone_nats_a_flow_goes_direct_and_the_relay_carries_none_of_it(cone):
    relay, target, gateway = cone
    assert _nat(gateway) == d.EIM and _nat(target) == d.EIM
    result = gateway.command(f"run {DATAGRAMS}", timeout=60.0)
    assert (result["intact"], result["corrupt"]) == (DATAGRAMS, 0), result
    flows = [c for c in result["connections"] if c["protocol"] == "udp"]
    assert [c["path"] for c in flows] == ["direct"], flows
    assert [c["path"] for c in target.status()["connections"]] == ["direct"]
    assert relay.status()["udpBytesRelayed"] == 0  # not one payload byte of the flow crossed the relay
    assert result["direct"]["pairs"]["B"]["last"] == "direct"


@needs_netns
def test_behind_a_symmetric_nat_the_flow_falls_back_to_the_relay_within_the_deadline(symmetric):
    relay, target, gateway = symmetric
    assert _nat(gateway) == d.EDM and _nat(target) == d.EIM
    result = gateway.command(f"run {DATAGRAMS}", timeout=60.0)
    assert (result["intact"], result["corrupt"]) == (DATAGRAMS, 0), result
    assert result["firstEcho"] <= d.DEFAULT_DEADLINE + 0.5, result  # the user waited at most the deadline
    flows = [c for c in result["connections"] if c["protocol"] == "udp"]
    assert [c["path"] for c in flows] == ["relay"], flows
    assert relay.status()["udpBytesRelayed"] >= 2 * DATAGRAMS * 512
    pair = result["direct"]["pairs"]["B"]
    assert pair["last"] == "relay" and pair["failures"] == 1 and pair["retryIn"] > 0  # retried later, not never
