"""The direct TCP path breaks mid-run (issue 15): in the NAT namespaces of tests/direct_support.py
(root, `ip`, `iptables`), the traffic between the two NATs is dropped (the relay still reaches
both) while a user's connection talks over a direct session.

The live connection is noticed dead within a few seconds (the direct socket's keepalive and
TCP_USER_TIMEOUT, chuantou_client/directreport.py) and ends as an error, never as a clean end;
new connections go through the relay at once (the pair is remembered failed); once the path
returns and the pair's backoff is over, new connections go direct again.
"""

from __future__ import annotations

import time

import pytest

import direct_tcp_support as support
from chuantou_client.directreport import liveness
from direct_support import NatTopology
from helpers import wait_until
from test_direct_tcp import TOKEN, _tcp_paths, _unavailable, needs_netns

KEEPALIVE = 1.0  # the direct path's keepalive: a direct TCP connection is dead after 3 s of silence
RETRY = 1.0  # a failed pair is tried again after this (doubling)
SLACK = 3.0  # for a loaded machine (2 cores shared with other work)


@pytest.fixture
def cone_tcp(tmp_path):
    reason = _unavailable()
    if reason:
        pytest.skip(reason)
    topo = NatTopology(tmp_path).create()
    try:
        relay = support.start(topo, "p", "relay", "--token", TOKEN)
        url = lambda side: f"ws://{topo.relay_ip[side]}:{relay.ready['port']}"  # noqa: E731
        tuning = ("--direct-keepalive", KEEPALIVE, "--direct-retry", RETRY)
        target = support.start(topo, "b", "target", "--url", url("b"), "--token", TOKEN, *tuning)
        gateway = support.start(topo, "a", "gateway", "--url", url("a"), "--token", TOKEN,
                                "--service-port", target.ready["servicePort"], *tuning)
        yield topo, relay, target, gateway
    finally:
        topo.destroy()


@needs_netns
@pytest.mark.timeout(180)
def test_a_direct_tcp_path_cut_mid_run_fails_the_live_connection_then_new_ones_relay_and_go_direct_again(cone_tcp):
    topo, relay, target, gateway = cone_tcp
    for mode in ("chatty", "idle"):  # one talks on (TCP_USER_TIMEOUT), one is silent (keepalive probes)
        held = gateway.command(f"hold {mode}", timeout=30.0)
        assert held["ended"] is None and held["rounds"] >= 1, held
    assert _tcp_paths(held) == ["direct", "direct"], held["connections"]
    assert relay.command("traffic")["tcpBytesRelayed"] == 0

    topo.cut_between_nats()
    cut_at = gateway.command("held")[0]["now"]
    bound = liveness(KEEPALIVE) + 2 + SLACK  # the silence, a probe interval, and a loaded machine
    wait_until(lambda: all(c["ended"] for c in gateway.command("held")), timeout=bound, interval=0.2,
               message="a live direct connection did not notice its path died")
    for chatter in gateway.command("held"):
        assert chatter["ended"] == "reset", chatter  # an error for the user, never a clean end
        assert chatter["endedAt"] - cut_at <= bound, chatter
    assert "went silent" in gateway.log_tail(300), gateway.log_tail()  # the reason is logged
    pair = gateway.status()["direct"]["pairs"]["B"]
    assert pair["last"] == "relay" and pair["failures"] >= 1, pair  # the memory knows the path died
    wait_until(lambda: not _tcp_paths(target.status()), timeout=liveness(KEEPALIVE) + 2 + SLACK, interval=0.2,
               message="B's side of the dead session did not end")
    wait_until(lambda: relay.command("traffic")["sessions"] == 0, message="the relay still holds the dead session")

    # new connections are relayed, at once (no attempt while the pair backs off) or after the deadline
    result = gateway.command("tcp 1", timeout=60.0)
    assert result["intact"] and not result["errors"], result
    assert result["firstByte"] <= 1.0 + 0.5, result
    assert relay.command("traffic")["tcpBytesRelayed"] >= 2 << 20

    topo.join_nats()  # the path returns: after the pair's (bounded) backoff, new connections go direct
    wait_until(lambda: gateway.status()["direct"]["pairs"]["B"]["retryIn"] == 0, timeout=8 * RETRY + SLACK,
               interval=0.1, message="the failed pair's backoff never ends")
    relayed = relay.command("traffic")["tcpBytesRelayed"]
    began = time.monotonic()
    result = gateway.command("tcp 1", timeout=60.0)
    assert result["intact"] and not result["errors"], result
    pair = result["direct"]["pairs"]["B"]
    assert pair["last"] == "direct" and pair["failures"] == 0, (pair, time.monotonic() - began)
    assert relay.command("traffic")["tcpBytesRelayed"] == relayed  # none of it crossed the relay
