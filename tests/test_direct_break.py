"""The direct UDP path under attack and when it breaks (issue 15): in the NAT namespaces of
tests/direct_support.py (root, `ip`, `iptables`).

- The path between the two NATs is cut mid-run (iptables DROP on the public network between the
  NATs' addresses; the relay still reaches both): the live direct flow is noticed dead by its
  keepalives within a bounded time and ends with a logged reason (live flows do not move between
  paths), the user's next datagrams open a flow through the relay at once, and once the cut is
  mended and the pair's backoff is over, new flows go direct again.
- A third party on the public network forges datagrams to each side's punched mapping, spoofing
  the peer's mapping as their source (the only way past the NATs' filtering): the user and the
  service receive nothing forged, every forgery is counted as rejected, and the flow goes on.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest

from chuantou_client.direct import Puncher
from common import direct as d
from direct_support import NatTopology
from helpers import wait_until
from test_direct_udp import TOKEN, _nat, _unavailable, needs_netns

KEEPALIVE = 1.0  # direct-path pings; a side ends the flow after 3 (A) or 4 (B) silent ones
RETRY = 1.0  # a failed pair is tried again after this (doubling)
DATAGRAMS = 200
SLACK = 3.0  # for a loaded machine (2 cores shared with other work)
FORGE = Path(__file__).resolve().parent / "forge_support.py"


@pytest.fixture
def cone(tmp_path):
    reason = _unavailable()
    if reason:
        pytest.skip(reason)
    topo = NatTopology(tmp_path).create()
    try:
        relay = topo.start("p", "relay", "--token", TOKEN)
        url = lambda side: f"ws://{topo.relay_ip[side]}:{relay.ready['port']}"  # noqa: E731
        tuning = ("--direct-keepalive", KEEPALIVE, "--direct-retry", RETRY)
        target = topo.start("b", "target", "--url", url("b"), "--token", TOKEN, *tuning)
        gateway = topo.start("a", "gateway", "--url", url("a"), "--token", TOKEN,
                             "--service-port", target.ready["servicePort"], *tuning)
        assert _nat(gateway) == d.EIM and _nat(target) == d.EIM
        yield topo, relay, target, gateway
    finally:
        topo.destroy()


def _udp_paths(status: dict) -> list[str]:
    return [c["path"] for c in status["connections"] if c["protocol"] == "udp"]


def _intact(result: dict) -> None:
    assert (result["intact"], result["corrupt"]) == (DATAGRAMS, 0), result


@needs_netns
def test_a_direct_path_cut_mid_run_ends_the_flow_then_flows_take_the_relay_and_go_direct_once_it_returns(cone):
    topo, relay, target, gateway = cone
    result = gateway.command(f"held {DATAGRAMS}", timeout=60.0)
    _intact(result)
    assert _udp_paths(result) == ["direct"] and _udp_paths(target.status()) == ["direct"]

    topo.cut_between_nats()
    cut_at = time.monotonic()
    wait_until(lambda: not _udp_paths(gateway.status()), timeout=(d.DEAD_AFTER + 1) * KEEPALIVE + SLACK,
               interval=0.1, message="the gateway ends the direct flow whose path went silent")
    noticed = time.monotonic() - cut_at
    wait_until(lambda: not _udp_paths(target.status()), timeout=2 * SLACK, interval=0.1,
               message="the target's side of the dead flow ends too")
    assert "went silent" in gateway.log_tail(200), gateway.log_tail()  # the reason is logged
    assert (d.DEAD_AFTER - 1) * KEEPALIVE <= noticed <= (d.DEAD_AFTER + 1) * KEEPALIVE + SLACK, noticed
    assert gateway.status()["direct"]["pairs"]["B"]["last"] == "relay"  # the memory knows the path died

    # the same user's next datagrams, and a new user's, are carried by the relay within the deadline
    relayed_before = relay.status()["udpBytesRelayed"]
    for command in (f"held {DATAGRAMS}", f"run {DATAGRAMS}"):
        result = gateway.command(command, timeout=60.0)
        _intact(result)
        assert result["firstEcho"] <= d.DEFAULT_DEADLINE + 0.5, result
        assert _udp_paths(result)[-1] == "relay", result["connections"]
    assert relay.status()["udpBytesRelayed"] - relayed_before >= 2 * 2 * DATAGRAMS * 512

    topo.join_nats()  # the path returns: after the pair's (bounded) backoff, new flows go direct
    wait_until(lambda: gateway.status()["direct"]["pairs"]["B"]["retryIn"] == 0, timeout=4 * RETRY + SLACK,
               interval=0.1, message="the failed pair's backoff ends")
    relayed_before = relay.status()["udpBytesRelayed"]
    result = gateway.command(f"run {DATAGRAMS}", timeout=60.0)
    _intact(result)
    assert _udp_paths(result)[-1] == "direct", result["connections"]
    assert result["direct"]["pairs"]["B"]["last"] == "direct"
    assert relay.status()["udpBytesRelayed"] - relayed_before < DATAGRAMS * 512  # not this flow's payload


@needs_netns
def test_a_third_party_that_forges_datagrams_to_a_punched_port_injects_nothing(cone):
    topo, relay, target, gateway = cone
    result = gateway.command(f"held {DATAGRAMS}", timeout=60.0)
    _intact(result)
    assert _udp_paths(result) == ["direct"]
    (a_mapping,) = target.status()["peers"]  # where B sends: A's NAT mapping
    (b_mapping,) = result["peers"]  # where A sends: B's NAT mapping
    assert a_mapping.startswith(topo.nat_ip["a"] + ":") and b_mapping.startswith(topo.nat_ip["b"] + ":")

    for victim, mapping, spoofed_as in ((gateway, a_mapping, b_mapping), (target, b_mapping, a_mapping)):
        rejected = victim.status()["seal"]["rejected"]
        sent = json.loads(topo.run_in("p", str(FORGE), "--to", mapping, "--as", spoofed_as))
        # every spoofed datagram reached the flow's socket as if from the peer, and was dropped
        wait_until(lambda: victim.status()["seal"]["rejected"] - rejected >= sent["spoofed"], timeout=SLACK,
                   interval=0.1, message="the victim counts each forged datagram as rejected")
        assert victim.status()["seal"]["rejected"] - rejected == sent["spoofed"]
    # the user got nothing it did not ask for (a forgery B let through would have been echoed back)
    assert gateway.command("drain 0.5")["received"] == 0
    result = gateway.command(f"held {DATAGRAMS}", timeout=60.0)  # the flow goes on, direct
    _intact(result)
    assert _udp_paths(result) == ["direct"] and relay.status()["udpBytesRelayed"] == 0


# --- the watch itself, on 127.0.0.1 ------------------------------------------------------------

def test_a_direct_puncher_pings_while_its_peer_answers_and_declares_the_path_dead_after_its_silence():
    session, key = "ab" * 16, bytes(16)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as a_sock, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as b_sock:
        for sock in (a_sock, b_sock):
            sock.bind(("127.0.0.1", 0))
            sock.settimeout(1.0)
        a = Puncher(a_sock, session, "A", 1.0, keepalive=0.2)
        a.key, a.targets = key, [b_sock.getsockname()]

        def answer_a_ping() -> None:  # B's side: A's ping in, its pong out, and A takes it
            unpacked = d.unpack_punch(b_sock.recv(2048), key, session, "A")
            assert unpacked is not None and unpacked[0] == d.PING
            b_sock.sendto(d.pack_punch(key, d.PONG, "B", session, unpacked[1]), a_sock.getsockname())
            data, src = a_sock.recvfrom(2048)
            assert a.handle(data, src)

        a.tick(time.monotonic())  # a round of the attempt's pings
        answer_a_ping()
        assert a.direct == b_sock.getsockname()
        assert a.dead_after == pytest.approx(d.DEAD_AFTER * 0.2)
        began = time.monotonic()
        assert a.watch(began) is None  # the keepalive
        answer_a_ping()  # B is alive
        assert a.last_heard >= began
        b_sock.sendto(d.pack_punch(key, d.PING, "B", session, d.new_punch_nonce()), a_sock.getsockname())
        data, src = a_sock.recvfrom(2048)
        heard = a.last_heard
        assert a.handle(data, src) and a.last_heard == heard  # B's own pings prove nothing (replayable)
        assert a.watch(a.last_heard + a.dead_after - 0.01) is None  # quiet, not dead yet: probes
        silent = a.watch(a.last_heard + a.dead_after + 1e-6)  # (x + d) - x can round to just below d
        assert silent is not None and "went silent" in a.dead_reason("B", silent)
        assert Puncher(b_sock, session, "B", 1.0, keepalive=0.2).dead_after > a.dead_after  # A decides first
