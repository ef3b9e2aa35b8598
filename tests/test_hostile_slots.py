"""Handshake slots, session caps, descriptors and mass teardown (issue 9 items 2, 4, 5; issue 10
items 4, 5): strangers holding slots or sessions never keep honest clients out, and tearing many
sessions down at once neither takes quadratic time nor starves the relay's other threads."""

from __future__ import annotations

import contextlib
import socket

import pytest

from helpers import HOST, TcpService, connect, echo_handler, recv_exactly, wait_until
from security_support import PROMPT, TOKEN, closed_without_reply, echo_roundtrip, logged

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
    a = make_client(relay, "A", token=TOKEN)
    make_client(relay, "B", token=TOKEN)
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
