"""The relay's control channel under hostile load (issue 9 items 1, 3, 8): a WebSocket that
floods without reading its replies, a pile of unregistered WebSockets from one address, and
stop() with many peers that do not read."""

from __future__ import annotations

import threading
import time

import pytest

from helpers import wait_until
from hostile_control_support import (
    masked_text_frame,
    push_for,
    read_response_head,
    rss_bytes,
    rude_peers,  # noqa: F401 (fixture)
    upgrade_request,
)
from security_support import TOKEN, long_transfer

pytestmark = pytest.mark.timeout(90)

MiB = 1024 * 1024
ATTACKER = "127.0.0.2"


def open_flooder(rude_peers, relay, source: str = ATTACKER):
    """An upgraded control channel that never reads: the relay's replies pile up unread."""
    sock = rude_peers(relay.port, source)
    sock.sendall(upgrade_request(relay.port))
    status, _ = read_response_head(sock)
    assert status == 101
    return sock


class _Drop(threading.Event):
    at = 0.0


def watch_for_drop(relay, deadline: float = 15.0) -> _Drop:
    """An event set (with the time in ``at``) once the relay holds no unregistered connection."""
    dropped = _Drop()

    def watch() -> None:
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            if not [c for c in relay._live_connections() if c.client_id is None]:
                dropped.at = time.monotonic()
                dropped.set()
                return
            time.sleep(0.02)  # polling with a deadline, not synchronisation

    threading.Thread(target=watch, name="test-watch-for-drop", daemon=True).start()
    return dropped


def flood(sock, seconds: float, max_bytes: int) -> int:
    """Many small bad frames (each earns an error reply we leave unread), then 60 KB frames."""
    sent = push_for(sock, masked_text_frame(b"x"), seconds / 4, 64 * 1024)  # ~11k replies: more than the buffers hold
    big = masked_text_frame(b"{" + b"a" * 60_000)
    return sent + push_for(sock, big, seconds * 3 / 4, max_bytes)


def test_a_flood_that_never_reads_its_replies_does_not_grow_relay_memory(make_server, rude_peers):
    relay = make_server(token=TOKEN, handshake_timeout=60.0)  # the deadline must not end the attack early
    sock = open_flooder(rude_peers, relay)
    before = rss_bytes()
    sent = flood(sock, seconds=8.0, max_bytes=256 * MiB)
    grown = rss_bytes() - before
    # unbounded, the relay takes (and keeps) whatever the peer manages to send: 50-250 MiB here
    assert grown < 32 * MiB, f"relay memory grew by {grown / MiB:.0f} MiB while the peer sent {sent / MiB:.0f} MiB"
    assert sent < 32 * MiB, f"the relay kept reading: the peer sent {sent / MiB:.0f} MiB"
    (conn,) = relay._live_connections()
    assert conn.ws.sock.paused > 0, "the relay stopped reading from the flooding peer"
    started = time.monotonic()
    relay.stop()  # its serving thread is blocked sending to the peer: stop must not wait for it
    assert time.monotonic() - started < 5.0


def test_the_registration_deadline_closes_a_flooding_peer_on_time(make_server, make_client, rude_peers):
    relay = make_server(token=TOKEN, handshake_timeout=2.0)
    sock = open_flooder(rude_peers, relay)
    opened = time.monotonic()
    flood(sock, seconds=1.5, max_bytes=16 * MiB)
    dropped = watch_for_drop(relay)  # the moment of the drop, whatever the honest registration costs
    # meanwhile the housekeeper is free: an honest client registers
    assert make_client(relay, "honest", token=TOKEN, connect_timeout=5).connected
    assert dropped.wait(10), "the flooding peer was never dropped"
    took = dropped.at - opened
    assert took < relay.config.handshake_timeout + 3, f"dropped only after {took:.1f} s"
    wait_until(lambda: relay.unregistered.pending == 0, message="its place under the unregistered cap is free")


def test_unregistered_websockets_are_capped_per_source_and_honest_clients_still_register(
        make_server, make_client, services, rude_peers):
    per_source = 16
    relay = make_server(token=TOKEN, max_unregistered_per_source=per_source)
    with long_transfer(relay, make_client, services, size=16 * MiB) as transfer:
        held, refused = [], []
        for _ in range(300):
            sock = rude_peers(relay.port, ATTACKER)
            sock.sendall(upgrade_request(relay.port))
            status, head = read_response_head(sock)
            (held if status == 101 else refused).append(head)
            if status != 101:
                sock.close()
        assert len(held) == per_source
        assert all(b"503 Service Unavailable" in head for head in refused)
        body = refused[-1].decode()
        assert "too many unregistered control connections from 127.0.0.2" in body
        assert "maxUnregisteredPerSource" in body
        assert relay.unregistered.limit_log.count("unregistered_per_source") == len(refused)
        # another address registers, and a registered connection no longer counts
        honest = make_client(relay, "honest", token=TOKEN, connect_timeout=5)
        assert honest.connected
        assert relay.unregistered.pending_from(ATTACKER) == per_source
        assert relay.unregistered.pending == per_source
        assert transfer.relayed > 0


def test_the_overall_cap_on_unregistered_websockets(make_server, rude_peers, caplog):
    relay = make_server(token=TOKEN, max_unregistered=4, max_unregistered_per_source=100)
    statuses = []
    for i in range(6):
        sock = rude_peers(relay.port, f"127.0.0.{10 + i}")
        sock.sendall(upgrade_request(relay.port))
        status, head = read_response_head(sock)
        statuses.append(status)
    assert statuses == [101] * 4 + [503] * 2
    assert b"maxUnregistered" in head
    assert any("too many unregistered control connections" in r.getMessage() for r in caplog.records)


def test_config_keys_for_the_unregistered_caps():
    from chuantou_server import app as server_app
    from common import config

    settings = config.validate({"maxUnregistered": 10, "maxUnregisteredPerSource": 2}, server_app.CONFIG_KEYS,
                               "server.json")
    relay = server_app.make_server({**settings, "noAuth": True})
    assert (relay.unregistered.total, relay.unregistered.per_source) == (10, 2)
    with pytest.raises(config.ConfigError, match="maxUnregisteredPerSource"):
        config.validate({"maxUnregisteredPerSource": 0}, server_app.CONFIG_KEYS, "server.json")


def test_stop_is_bounded_with_many_peers_that_do_not_read(make_server, make_client, rude_peers):
    relay = make_server(token=TOKEN, handshake_timeout=60.0, max_unregistered_per_source=1000)
    registered = [make_client(relay, f"c{i}", token=TOKEN) for i in range(5)]
    wait_until(lambda: len(relay.registry) == len(registered))
    flooders = [open_flooder(rude_peers, relay, f"127.0.1.{i + 1}") for i in range(4)]
    for sock in flooders:
        flood(sock, seconds=1.0, max_bytes=16 * MiB)  # error replies fill their windows
    started = time.monotonic()
    relay.stop()
    took = time.monotonic() - started
    assert took < 5.0, f"stop() took {took:.1f} s"
    assert len(relay.threads) == 0


def test_join_all_with_thousands_of_threads_is_quick():
    import threading

    from common.threads import ThreadGroup

    group = ThreadGroup("chuantou-test-many")
    release = threading.Event()
    for i in range(2000):
        group.spawn(f"t{i}", release.wait, 30)
    release.set()
    started = time.monotonic()
    assert group.join_all(timeout=10) == []
    assert time.monotonic() - started < 3.0
