"""NAT filtering (issue 15): a client asks the relay's UDP port to answer a fresh socket from
the relay's --probe-port; whether that answer gets in tells how its NAT filters (RFC 5780's
test III, simplified). The relay answers only the probe's source, never with more than it
was sent, and no faster than its per-source rate.

On 127.0.0.1 (no NAT) the answer gets in; behind the namespaces' MASQUERADE routers (Linux
conntrack: port-restricted) it does not.
"""

from __future__ import annotations

import os
import socket
import time

import pytest

from common import direct as d
from direct_support import NatTopology
from helpers import wait_until
from test_direct_udp import TOKEN, _nat, _unavailable

IO = 2.0  # seconds a test socket waits for one answer


def _udp() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    return sock


def _answers(sock: socket.socket, wait: float) -> list[tuple[bytes, tuple]]:
    """Every datagram that arrives within ``wait`` seconds of the last one."""
    got = []
    sock.settimeout(wait)
    while True:
        try:
            got.append(sock.recvfrom(2048))
        except socket.timeout:
            return got


# --- plain data --------------------------------------------------------------------------------

def test_filtering_is_classified_from_whether_the_other_ports_answer_got_in():
    assert d.classify_filtering(d.NO_NAT, True) == d.EIF
    assert d.classify_filtering(d.EIM, True) == d.ADF
    assert d.classify_filtering(d.EIM, False) == d.APDF
    assert d.classify_filtering(d.EDM, False) == d.APDF
    assert d.classify_filtering(d.ONE_PORT, None) == d.FILTER_ONE_PORT
    assert d.classify_filtering(d.NO_ANSWER, None) == d.FILTER_NO_ANSWER
    probe = d.pack_filter_probe(os.urandom(d.NONCE_BYTES))
    assert d.is_filter_probe(probe) and not d.is_probe(probe) and len(probe) == d.PROBE_SIZE


# --- the relay ---------------------------------------------------------------------------------

def test_the_relay_answers_a_filter_probe_from_its_probe_port_to_the_sender_only(make_server):
    server = make_server(probe_port=0)
    nonce = os.urandom(d.NONCE_BYTES)
    probe = d.pack_filter_probe(nonce)
    with _udp() as sender, _udp() as bystander:
        sender.sendto(probe, ("127.0.0.1", server.port))
        sender.settimeout(IO)
        answer, src = sender.recvfrom(2048)
        assert src == ("127.0.0.1", server.probe_port)  # from the other port, not the one asked
        assert d.unpack_probe_answer(answer, nonce) == sender.getsockname()
        assert len(answer) <= len(probe)  # never more than the sender sent
        assert _answers(bystander, 0.2) == []
        # the probe port answers plain probes only: it is no way to make the relay's main port talk
        sender.sendto(probe, ("127.0.0.1", server.probe_port))
        assert _answers(sender, 0.3) == []
        # nor one of the wrong size (the main port's two-byte "who are you" notice aside)
        sender.sendto(probe + b"x" * 100, ("127.0.0.1", server.port))
        assert all(d.unpack_probe_answer(data, nonce) is None and src[1] == server.port
                   for data, src in _answers(sender, 0.3))


def test_a_relay_without_a_probe_port_does_not_answer_filter_probes(server):
    with _udp() as sender:
        sender.sendto(d.pack_filter_probe(os.urandom(d.NONCE_BYTES)), ("127.0.0.1", server.port))
        assert _answers(sender, 0.3) == []


def test_filter_probes_are_rate_limited_per_source(make_server):
    """A flood of probes (say, with a victim's address forged as their source) gets no more
    answers than the relay's per-source rate allows."""
    rate = 5.0
    server = make_server(probe_port=0, udp_registrations_per_second=rate)
    sent = 200
    with _udp() as sender:
        began = time.monotonic()
        for _ in range(sent):
            sender.sendto(d.pack_filter_probe(os.urandom(d.NONCE_BYTES)), ("127.0.0.1", server.port))
        answers = _answers(sender, 0.3)
        elapsed = time.monotonic() - began
    assert answers, "the relay answered none of the probes"
    assert len(answers) <= rate + rate * elapsed + 1, (len(answers), elapsed)
    assert server.udp.drops["rate_limited"] >= sent - len(answers) - rate * elapsed - 1


# --- clients -----------------------------------------------------------------------------------

def test_on_one_host_the_client_sees_no_nat_and_endpoint_independent_filtering(make_server, make_client):
    server = make_server(probe_port=0)
    client = make_client(server, "A")
    nat = wait_until(lambda: (n := client.status()["direct"]["nat"])["filtering"] != "not probed yet" and n,
                     timeout=10.0, message="the client's NAT probe")
    assert (nat["mapping"], nat["filtering"]) == (d.NO_NAT, d.EIF)


def test_without_a_probe_port_filtering_is_said_to_be_untested(server, make_client):
    client = make_client(server, "A")
    nat = wait_until(lambda: (n := client.status()["direct"]["nat"])["filtering"] != "not probed yet" and n,
                     timeout=10.0, message="the client's NAT probe")
    assert nat["filtering"] == d.FILTER_ONE_PORT


@pytest.mark.skipif(_unavailable() is not None, reason=str(_unavailable()))
def test_behind_masquerade_nats_filtering_is_address_and_port_dependent(tmp_path):
    """Linux conntrack lets in only what comes from the address and port a mapping was made
    toward: the answer from the relay's other port dies at the router, cone or symmetric."""
    topo = NatTopology(tmp_path, symmetric_a=True).create()
    try:
        relay = topo.start("p", "relay", "--token", TOKEN)
        url = lambda side: f"ws://{topo.relay_ip[side]}:{relay.ready['port']}"  # noqa: E731
        target = topo.start("b", "target", "--url", url("b"), "--token", TOKEN)
        gateway = topo.start("a", "gateway", "--url", url("a"), "--token", TOKEN,
                             "--service-port", target.ready["servicePort"])
        assert (_nat(target), _nat(gateway)) == (d.EIM, d.EDM)
        assert target.status()["direct"]["nat"]["filtering"] == d.APDF
        assert gateway.status()["direct"]["nat"]["filtering"] == d.APDF
    finally:
        topo.destroy()


@pytest.mark.skipif(_unavailable() is not None, reason=str(_unavailable()))
def test_behind_cone_nats_the_relay_learns_what_went_direct_from_the_clients(tmp_path):
    """The clients' path reports cross the real NATs' control channels: the relay relays none of
    the flow's payload, and reports (every few seconds while the flow runs) what went direct."""
    topo = NatTopology(tmp_path).create()
    try:
        relay = topo.start("p", "relay", "--token", TOKEN)
        url = lambda side: f"ws://{topo.relay_ip[side]}:{relay.ready['port']}"  # noqa: E731
        target = topo.start("b", "target", "--url", url("b"), "--token", TOKEN)
        gateway = topo.start("a", "gateway", "--url", url("a"), "--token", TOKEN,
                             "--service-port", target.ready["servicePort"])
        count = 200
        result = gateway.command(f"run {count}", timeout=60.0)
        assert result["intact"] == count, result
        flow = next(c for c in result["connections"] if c["protocol"] == "udp")
        assert flow["path"] == "direct" and flow["directBytesSent"] >= count * 512
        wait_until(lambda: relay.status()["directBytesReported"] >= 2 * count * 512, timeout=15.0, interval=0.5,
                   message="the gateway's periodic path report")
        assert relay.status()["udpBytesRelayed"] == 0
    finally:
        topo.destroy()
