"""UDP hardening: registration replay, the early-datagram queue, the registration rate per
source, no amplification, a relay restart under a steady stream, and quiet normal ends."""

from __future__ import annotations

import logging
import os
import socket
import time

import pytest

from common import frames
from common.frames import JoinRequest, JoinStatus
from helpers import UdpEchoService, udp_roundtrip, wait_until
from security_support import TOKEN, make_self_signed, wss_url
from udp_support import UdpTap, fetch_challenge, register_by_hand, relay_answer


def udp_socket(host: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
    sock.bind((host, 0))
    return sock


@pytest.fixture
def tap_factory():
    taps = []

    def make(relay_port: int) -> UdpTap:
        tap = UdpTap(("127.0.0.1", relay_port))
        taps.append(tap)
        return tap.start()

    yield make
    for tap in taps:
        tap.stop()


def udp_session(server):
    (session,) = [s for s in server.sessions.all() if s.protocol == "udp"]
    return session


# --- 9.14 registration replay ----------------------------------------------------------------

@pytest.mark.timeout(90)
@pytest.mark.parametrize("tls_only", [False, True], ids=["plain", "tls-only"])
def test_a_registration_copied_off_the_wire_and_resent_from_elsewhere_takes_over_nothing(
        make_server, make_client, services, tap_factory, tmp_path, tls_only):
    echo = services(UdpEchoService())
    if tls_only:
        cert = make_self_signed(tmp_path, "relay")
        relay = make_server(token=TOKEN, tls_cert=cert.cert, tls_key=cert.key, tls_only=True)
        url, options = wss_url(relay), {"token": TOKEN, "ca_file": cert.cert}
    else:
        relay = make_server()
        url, options = relay, {}
    tap = tap_factory(relay.port)
    relay.reconfigure(public_port=tap.port)  # clients send their UDP through the tap, which records it
    a = make_client(url, "A", **options)
    make_client(url, "B", **options)
    proxy = a.create_proxy(0, "B", echo.port, protocol="udp")
    with udp_socket() as user, udp_socket("127.0.0.2") as attacker:
        assert udp_roundtrip(user, proxy.local_port, b"warm up") == b"warm up"
        session = udp_session(relay)
        bound = (session.udp_a, session.udp_b)
        copies = tap.registrations()
        assert copies, "the tap saw the clients' registrations"
        for copy in copies:
            attacker.sendto(copy, ("127.0.0.1", relay.port))
        attacker.settimeout(1.0)
        answers = []
        try:
            while True:
                answers.append(attacker.recvfrom(65535)[0])
        except socket.timeout:
            pass
        assert all(frames.unpack_udp_ack(x) is None for x in answers), "a replay got no ack, only challenges"
        assert (session.udp_a, session.udp_b) == bound, "no side moved to the attacker"
        for i in range(20):
            assert udp_roundtrip(user, proxy.local_port, b"still mine %d" % i) == b"still mine %d" % i
        attacker.settimeout(0.3)
        with pytest.raises(socket.timeout):
            attacker.recvfrom(65535)  # the attacker receives none of the user's datagrams
    proxy.close()


@pytest.mark.timeout(60)
def test_a_flow_follows_a_nat_rebinding_by_proving_its_secret_from_the_new_address(
        make_server, make_client, services, tap_factory):
    echo = services(UdpEchoService())
    relay = make_server()
    tap = tap_factory(relay.port)
    relay.reconfigure(public_port=tap.port)
    # the relay path is what is tested: a direct path would leave the relay's addresses alone
    a = make_client(relay, "A", udp_keepalive=0.5, path="relay")
    make_client(relay, "B", udp_keepalive=0.5, path="relay")  # B only answers: its keepalive is what moves it
    proxy = a.create_proxy(0, "B", echo.port, protocol="udp")
    with udp_socket() as user:
        assert udp_roundtrip(user, proxy.local_port, b"before the rebinding") == b"before the rebinding"
        session = udp_session(relay)
        before = (session.udp_a, session.udp_b)
        tap.rebind()  # both clients now reach the relay from new addresses
        assert udp_roundtrip(user, proxy.local_port, b"after the rebinding", resend_every=0.3) == \
            b"after the rebinding"
        assert udp_session(relay) is session  # the same session, moved
        assert session.udp_a != before[0] and session.udp_b != before[1]
    proxy.close()


def test_a_side_moves_only_with_a_fresh_proof_from_its_new_address(server):
    session = server.sessions.create("A", "B", 9, "udp")
    relay = ("127.0.0.1", server.port)
    join = JoinRequest("A", session.id, session.secret_a)
    with udp_socket() as first, udp_socket() as second, udp_socket("127.0.0.2") as thief:
        assert register_by_hand(first, relay, join) == JoinStatus.JOINED
        assert session.udp_a == first.getsockname()
        # the first address's challenge is worthless elsewhere: the thief gets a challenge back
        stolen = frames.pack_udp_register(join, fetch_challenge(first, relay, join))
        thief.sendto(stolen, relay)
        assert frames.unpack_udp_challenge(relay_answer(thief)) is not None
        assert session.udp_a == first.getsockname()
        # without the secret the thief cannot answer its own challenge
        forged = JoinRequest("A", session.id, os.urandom(16).hex())
        assert register_by_hand(thief, relay, forged) == JoinStatus.BAD_SECRET
        # the owner moving (NAT rebinding) proves the secret from the new address: it follows
        assert register_by_hand(second, relay, join) == JoinStatus.JOINED
        assert session.udp_a == second.getsockname()


# --- 9.6 the early queue ---------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_the_early_queue_is_bounded_per_session_and_overall(make_server, caplog):
    server = make_server(udp_early_queue_bytes=100_000, udp_early_queue_total_bytes=150_000)
    relay = ("127.0.0.1", server.port)
    sessions = [server.sessions.create("A", "B", 9, "udp") for _ in range(3)]
    senders = [udp_socket() for _ in sessions]
    try:
        for session, sender in zip(sessions, senders):
            assert register_by_hand(sender, relay, JoinRequest("A", session.id, session.secret_a)) == JoinStatus.JOINED
            for _ in range(40):  # 40 x 10 kB = 400 kB each, before B registers
                sender.sendto(b"q" * 10_000, relay)
        wait_until(lambda: server.udp.limits.count("udpEarlyQueueTotalBytes") > 0, timeout=10,
                   message="the overall bound bites")
        assert server.udp.limits.count("udpEarlyQueueBytes") > 0
        assert server.udp.early_total <= 150_000
        assert any("udpEarlyQueueBytes" in m for m in caplog.messages)

        # a stranger claiming side B of the first session gets a challenge, never the queue
        with udp_socket("127.0.0.2") as stranger:
            stranger.sendto(frames.pack_udp_register(JoinRequest("B", sessions[0].id, "00" * 16)), relay)
            answer = relay_answer(stranger)
            assert frames.unpack_udp_challenge(answer) is not None
            stranger.settimeout(0.3)
            with pytest.raises(socket.timeout):
                stranger.recvfrom(65535)

        # B proves its secret: it receives what was queued, at most the per-session bound
        with udp_socket() as b_side:
            join_b = JoinRequest("B", sessions[0].id, sessions[0].secret_b)
            assert register_by_hand(b_side, relay, join_b) == JoinStatus.JOINED
            b_side.settimeout(0.5)
            got = 0
            try:
                while True:
                    got += len(b_side.recvfrom(65535)[0])
            except socket.timeout:
                pass
            assert 0 < got <= 100_000
        wait_until(lambda: server.udp.early_total <= 50_000, message="the flushed queue no longer counts")
    finally:
        for sender in senders:
            sender.close()


# --- 9.7 registration floods and amplification ------------------------------------------------

@pytest.mark.timeout(60)
def test_registration_floods_are_rate_limited_per_source_and_never_amplified(
        make_server, make_client, services):
    echo = services(UdpEchoService())
    relay = make_server(udp_registrations_per_second=50)
    a = make_client(relay, "A")
    make_client(relay, "B")
    proxy = a.create_proxy(0, "B", echo.port, protocol="udp")
    relay_addr = ("127.0.0.1", relay.port)
    with udp_socket() as user, udp_socket("127.0.0.2") as flooder:
        assert udp_roundtrip(user, proxy.local_port, b"warm up") == b"warm up"
        session = udp_session(relay)
        hello = frames.pack_udp_register(JoinRequest("A", session.id, "00" * 16))
        started = time.monotonic()
        for _ in range(5000):
            flooder.sendto(hello, relay_addr)
        for size in (40, 1000):  # payload from a stranger: at most a notice, never bigger
            for _ in range(200):
                flooder.sendto(b"x" * size, relay_addr)
        wait_until(lambda: relay.udp.limits.count("udpRegistrationsPerSecond") > 0, timeout=10,
                   message="the rate limit bites")
        elapsed = time.monotonic() - started
        flooder.settimeout(0.5)
        replies = []
        try:
            while True:
                replies.append(flooder.recvfrom(65535)[0])
        except socket.timeout:
            pass
        registration_replies = [r for r in replies if r != frames.UDP_WHO_ARE_YOU]
        assert len(registration_replies) <= 50 + 50 * (elapsed + 1.5)
        assert all(len(r) <= len(hello) for r in registration_replies)  # no reply bigger than its request
        assert len(frames.UDP_WHO_ARE_YOU) <= 2
        assert session.udp_a is not None and session.udp_b is not None
        for i in range(20):  # the live flow from another source is untouched
            assert udp_roundtrip(user, proxy.local_port, b"live %d" % i) == b"live %d" % i
    proxy.close()


# --- 10.3 relay restart under a steady stream --------------------------------------------------

@pytest.mark.timeout(90)
def test_udp_resumes_after_a_relay_restart_while_the_user_keeps_sending_from_the_same_port(
        make_server, make_client, services):
    echo = services(UdpEchoService())
    first = make_server()
    port = first.port
    # the relay path is what is tested (a direct flow would not need the relay until its keepalive)
    a = make_client(first, "A", reconnect_max_delay=0.5, path="relay")
    b = make_client(first, "B", reconnect_max_delay=0.5, path="relay")
    proxy = a.create_proxy(0, "B", echo.port, protocol="udp")
    with udp_socket() as user:
        assert udp_roundtrip(user, proxy.local_port, b"before") == b"before"
        first.stop()
        second = make_server(port=port)
        wait_until(lambda: a.connected and b.connected, timeout=15, message="the clients are back")
        back = time.monotonic()
        # the same user port keeps sending; the flow must notice its session is gone and reopen one
        assert udp_roundtrip(user, proxy.local_port, b"after", timeout=20, resend_every=0.2) == b"after"
        resumed = time.monotonic() - back
        print(f"UDP resumed {resumed:.2f} s after the clients re-registered")
        assert resumed < 10
        assert len([s for s in second.sessions.all() if s.protocol == "udp"]) == 1
    proxy.close()


# --- 10.6 quiet normal ends ------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_a_normal_end_of_a_udp_flow_is_no_warning_and_no_last_error(make_server, make_client, services, caplog):
    echo = services(UdpEchoService())
    server = make_server(udp_idle_timeout=1.0)
    a = make_client(server, "A", udp_idle_timeout=1.0)
    b = make_client(server, "B", udp_idle_timeout=1.0)
    proxy = a.create_proxy(0, "B", echo.port, protocol="udp")
    caplog.set_level(logging.DEBUG)
    with udp_socket() as user:
        for i in range(3):
            assert udp_roundtrip(user, proxy.local_port, b"flow %d" % i) == b"flow %d" % i
            wait_until(lambda: len(server.sessions) == 0 and proxy.active_connections == 0
                       and b.status()["activeSessions"] == 0, timeout=10, message="the flow ended everywhere")
        assert proxy.last_error is None
        assert udp_roundtrip(user, proxy.local_port, b"last") == b"last"
        proxy.close()  # closing a proxy with a live flow is a normal end too
        wait_until(lambda: len(server.sessions) == 0 and b.status()["activeSessions"] == 0, timeout=10,
                   message="the closed proxy's flow ended everywhere")
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == []
