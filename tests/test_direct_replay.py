"""A replayed punch packet cannot keep a dead direct path alive (issue 15), in the NAT
namespaces of tests/direct_support.py (root, `ip`, `iptables`).

An observer on the public network records a genuine ping and pong each way of a live direct
UDP flow (tests/replay_support.py capture: AF_PACKET in the public namespace). The path between
the NATs is then cut, and the observer replays what it recorded, from each peer's NAT mapping
to the other's (spoofed source, raw socket), ten times a second, for longer than either side
takes to notice. Each side still declares the path dead within its dead_after (3 or 4
keepalives) plus slack, the replayed pongs are counted as answering nothing, and the next
flow goes through the relay. With the first punch format (every ping of a session identical,
any genuine ping or pong refreshing the path) the replays kept the flow direct.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from common import direct as d
from helpers import wait_until
import test_direct_break
from test_direct_break import DATAGRAMS, KEEPALIVE, SLACK, _intact, _udp_paths
from test_direct_udp import needs_netns

REPLAY = Path(__file__).resolve().parent / "replay_support.py"
cone = test_direct_break.cone  # the fixture: relay, target and gateway behind two cone NATs


@needs_netns
def test_replayed_pings_and_pongs_from_the_peers_address_do_not_keep_a_cut_direct_path_alive(cone):
    topo, relay, target, gateway = cone
    result = gateway.command(f"held {DATAGRAMS}", timeout=60.0)
    _intact(result)
    assert _udp_paths(result) == ["direct"] and _udp_paths(target.status()) == ["direct"]
    (a_mapping,) = target.status()["peers"]  # where B sends: A's NAT mapping
    (b_mapping,) = result["peers"]
    ends = ("--a", a_mapping, "--b", b_mapping)
    recorded = json.loads(topo.run_in("p", str(REPLAY), "capture", *ends, "--timeout", str(4 * KEEPALIVE + SLACK)))
    assert all(set(kinds) == {"P", "O"} for kinds in recorded.values()), recorded

    unanswered = {"a": gateway.status()["direct"].get("unansweredPongs", 0),
                  "b": target.status()["direct"].get("unansweredPongs", 0)}
    topo.cut_between_nats()
    cut_at = time.monotonic()
    replayer = subprocess.Popen(["ip", "netns", "exec", topo.ns["p"], sys.executable, str(REPLAY), "replay", *ends,
                                 "--packets", json.dumps(recorded), "--every", "0.1", "--for", "60"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    try:
        wait_until(lambda: not _udp_paths(gateway.status()), timeout=(d.DEAD_AFTER + 1) * KEEPALIVE + SLACK,
                   interval=0.1, message="the gateway ends the cut direct flow despite the replays")
        noticed = time.monotonic() - cut_at
        wait_until(lambda: not _udp_paths(target.status()), timeout=2 * SLACK, interval=0.1,
                   message="the target ends its side too despite the replays")
        assert replayer.poll() is None, replayer.communicate()  # it replayed all along
        assert noticed <= (d.DEAD_AFTER + 1) * KEEPALIVE + SLACK, noticed
        assert "went silent" in gateway.log_tail(200)
        # each side received the other's replayed pong and took it for what it is
        assert gateway.status()["direct"]["unansweredPongs"] > unanswered["a"]
        assert target.status()["direct"]["unansweredPongs"] > unanswered["b"]

        # the next flow (replays still arriving) takes the relay within the deadline
        relayed_before = relay.status()["udpBytesRelayed"]
        result = gateway.command(f"run {DATAGRAMS}", timeout=60.0)
        _intact(result)
        assert result["firstEcho"] <= d.DEFAULT_DEADLINE + 0.5, result
        assert _udp_paths(result)[-1] == "relay", result["connections"]
        assert relay.status()["udpBytesRelayed"] - relayed_before >= 2 * DATAGRAMS * 512
    finally:
        replayer.terminate()
        out, err = replayer.communicate(timeout=10)
    assert replayer.returncode == 0 and json.loads(out)["sent"] > 0, err
