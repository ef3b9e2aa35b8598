"""Who holds a client ID, and clients that do not give up: a replaced client retries without
taking its ID back (so two holders of one token do not take turns) and gets it back when the
other leaves; an ID stays reserved for the token that registered it while it is offline; a
client that registered once survives a relay that refuses it for a while; and ``start`` with a
wrong token exits 1 with the reason."""

from __future__ import annotations

import time

import pytest

from chuantou_server import app as server_app
from chuantou_server import registry
from common import auth, config
from common import protocol as p
from common.errors import ChuantouError

from cli_support import cli  # noqa: F401 (fixture)
from helpers import HOST, free_port, wait_until
from security_support import (
    OTHER_TOKEN,
    PROMPT,
    TOKEN,
    echo_roundtrip,
    peers,  # noqa: F401 (fixture)
    registered_peer,
)

pytestmark = pytest.mark.timeout(60)

FIRST = "first-token-" + "1" * 20  # two people's tokens on one relay
SECOND = "second-token-" + "2" * 20
QUICK = 0.3  # reconnect_max_delay for clients that should come back fast


@pytest.fixture
def relay(make_server):
    return make_server(token=TOKEN)


def record_claims(monkeypatch, reg: registry.ClientRegistry) -> list:
    """Every claim's outcome from now on: None (granted) or why it was refused."""
    outcomes = []
    original = reg.claim

    def claim(*args, **kwargs):
        result = original(*args, **kwargs)
        outcomes.append(result.refused)
        return result

    monkeypatch.setattr(reg, "claim", claim)
    return outcomes


def offline(server, client_id: str):
    wait_until(lambda: client_id not in server.registry.ids(), message=f"{client_id} offline on the relay")
    return time.monotonic()


# --- one shared token, two holders of one ID -------------------------------------------------------

def test_a_replaced_client_retries_without_flapping_and_gets_its_id_back(relay, make_client, monkeypatch,
                                                                          tcp_echo):
    claims = record_claims(monkeypatch, relay.registry)
    first = make_client(relay, "dup", token=TOKEN, reconnect_max_delay=QUICK)
    second = make_client(relay, "dup", token=TOKEN, reconnect_max_delay=QUICK)  # kicks the first
    holder = relay.registry.get("dup")

    wait_until(lambda: claims.count(registry.IN_USE) >= 5, message="the replaced client keeps asking, politely")
    assert claims[:2] == [None, None] and set(claims[2:]) == {registry.IN_USE}, claims  # never took it back
    assert relay.registry.get("dup") is holder and second.connected and second.control.reconnects == 0
    assert not first.connected and first.control.state == "reconnecting" and not first.control.finished.is_set()
    assert "in use" in first.control.last_error

    second.stop()
    wait_until(lambda: first.connected, message="the first client gets its ID back once the other leaves")
    a = make_client(relay, "A", token=TOKEN)
    proxy = a.create_proxy(0, "dup", tcp_echo.port, protocol="tcp")
    assert echo_roundtrip(proxy.local_port) == b"hello through the tunnel"
    proxy.close()


def test_a_registration_that_asks_not_to_take_over_waits_for_the_live_holder(relay, peers):
    live = registered_peer(peers, relay, "B")
    polite = peers(relay)
    polite.send(p.Register(clientId="B", protocolVersion=p.PROTOCOL_VERSION, takeover=False,
                           auth=auth.register_proof(TOKEN, polite.challenge.nonce, "B")))
    reply = polite.recv_until(p.RegisterResponse)
    assert not reply.success and reply.code == p.ID_IN_USE and "'B'" in reply.error
    assert polite.closed_by_relay(PROMPT)
    live.send(p.GetClientList(requestId="q"))
    assert live.recv_until(p.ClientList).clients == [p.ClientInfo(id="B")]  # the live one was not kicked

    live.close()
    offline(relay, "B")
    again = peers(relay)
    again.send(p.Register(clientId="B", protocolVersion=p.PROTOCOL_VERSION, takeover=False,
                          auth=auth.register_proof(TOKEN, again.challenge.nonce, "B")))
    assert again.recv_until(p.RegisterResponse).success


# --- per-person tokens: an ID stays with the token that registered it -------------------------------

def test_another_token_cannot_take_an_id_while_its_owner_is_offline(make_server, make_client, peers):
    relay = make_server(extra_tokens=[FIRST, SECOND])  # the default reservation: 24 h
    registered_peer(peers, relay, "B", FIRST).close()  # the owner's network blips
    offline(relay, "B")

    thief = peers(relay)
    reply = thief.register("B", SECOND)
    assert not reply.success and reply.code == p.ID_TAKEN
    assert "reserved" in reply.error and "24 h" in reply.error and "--client-id" in reply.error
    assert thief.closed_by_relay(PROMPT)
    with pytest.raises(ChuantouError, match="reserved"):
        make_client(relay, "B", token=SECOND, connect_timeout=5)

    owner = make_client(relay, "B", token=FIRST)  # the owner comes back
    assert owner.connected and relay.registry.get("B").credential == auth.fingerprint(FIRST)


def test_after_the_reservation_time_another_token_may_take_the_id(make_server, peers):
    reservation = 1.5
    relay = make_server(extra_tokens=[FIRST, SECOND], id_reservation_time=reservation)
    registered_peer(peers, relay, "B", FIRST).close()
    went_offline = offline(relay, "B")
    assert peers(relay).register("B", SECOND).code == p.ID_TAKEN  # still reserved

    wait_until(lambda: peers(relay).register("B", SECOND).success, timeout=10, interval=0.2,
               message="the ID is free once its reservation ends")
    assert time.monotonic() - went_offline >= reservation - 0.5
    assert relay.registry.get("B").credential == auth.fingerprint(SECOND)


def test_reserved_ids_per_token_are_capped_oldest_first(make_server, peers):
    relay = make_server(extra_tokens=[FIRST, SECOND], max_reserved_ids_per_token=2)
    for client_id in ("B1", "B2", "B3"):
        registered_peer(peers, relay, client_id, FIRST).close()
        offline(relay, client_id)
    assert relay.registry.reserved_for("B1") is None  # dropped: one token cannot grow the table forever
    assert relay.registry.reserved_for("B3") == auth.fingerprint(FIRST)
    assert relay.registry.limit_log.count("reserved_ids") == 1
    assert peers(relay).register("B1", SECOND).success
    assert not peers(relay).register("B3", SECOND).success


def test_an_owner_whose_id_was_taken_keeps_retrying_and_gets_it_back(make_server, make_client, peers):
    relay = make_server(extra_tokens=[FIRST, SECOND])
    owner = make_client(relay, "B", token=FIRST, reconnect_max_delay=3.0)
    port = relay.port
    relay.stop()  # a restarted relay has forgotten who held which ID
    wait_until(lambda: (owner.control.next_attempt_at or 0) - time.time() > 1.2, timeout=15,
               message="the owner's next attempt is a while away")
    relay = make_server(port=port, extra_tokens=[FIRST, SECOND], id_reservation_time=0.5)
    intruder = registered_peer(peers, relay, "B", SECOND)  # gets there first

    wait_until(lambda: "different credential" in (owner.control.last_error or ""), timeout=15,
               message="the owner is refused while the intruder holds its ID")
    assert owner.control.state == "reconnecting" and not owner.control.finished.is_set()
    intruder.close()
    wait_until(lambda: owner.connected, timeout=15, message="the owner gets its ID back")
    assert relay.registry.get("B").credential == auth.fingerprint(FIRST)


def test_the_reservation_is_configured_in_server_json():
    settings = config.validate({"idReservationTime": 600, "maxReservedIdsPerToken": 10}, server_app.CONFIG_KEYS,
                               "server.json")
    relay = server_app.make_server(settings)  # built, not started: no sockets
    assert (relay.registry.reservation_time, relay.registry.max_reserved_per_credential) == (600, 10)
    defaults = config.validate({}, server_app.CONFIG_KEYS, "server.json")
    assert server_app.make_server(defaults).registry.reservation_time == 24 * 3600
    with pytest.raises(config.ConfigError, match="key 'idReservationTime' must be a number of seconds >= 0"):
        config.validate({"idReservationTime": -1}, server_app.CONFIG_KEYS, "server.json")


# --- a relay that refuses a registered client for a while -------------------------------------------

def test_clients_come_back_after_the_relay_ran_with_another_token_for_a_while(make_server, make_client, tcp_echo):
    relay = make_server(token=TOKEN)
    a = make_client(relay, "A", token=TOKEN, reconnect_max_delay=QUICK)
    b = make_client(relay, "B", token=TOKEN, reconnect_max_delay=QUICK)
    port = relay.port
    relay.stop()
    wrong = make_server(port=port, token=OTHER_TOKEN)
    wait_until(lambda: all("authentication failed" in (c.control.last_error or "") for c in (a, b)), timeout=10,
               message="both clients are refused by the relay with the wrong token")
    assert {a.control.state, b.control.state} == {"reconnecting"}
    assert not (a.control.finished.is_set() or b.control.finished.is_set())

    wrong.stop()
    make_server(port=port, token=TOKEN)
    wait_until(lambda: a.connected and b.connected, timeout=10, message="both clients register again")
    proxy = a.create_proxy(0, "B", tcp_echo.port, protocol="tcp")
    assert echo_roundtrip(proxy.local_port) == b"hello through the tunnel"
    proxy.close()


def test_a_wrong_token_at_the_first_start_is_final(relay, make_client):
    with pytest.raises(ChuantouError, match="authentication failed"):
        make_client(relay, "A", token=OTHER_TOKEN, connect_timeout=5)


# --- the command line --------------------------------------------------------------------------------

@pytest.mark.timeout(120)
def test_start_with_a_wrong_token_exits_1_with_the_reason(cli):
    relay = cli.start_relay()
    admin = free_port()
    wrong = "wrong-token-" + "w" * 20
    start = cli.client("start", "--admin-port", admin, "--token", wrong, "--server", f"ws://{HOST}:{relay}",
                       "--client-id", "A")
    assert start.returncode == 1, start.stdout + start.stderr
    assert start.stderr.startswith("error: ") and "authentication failed" in start.stderr
    assert wrong not in start.stdout + start.stderr
    assert not cli.files("client").pid_file.exists()  # nothing left running in a state that cannot recover
    assert cli.client("status").returncode == 1

    status = cli.start_client(relay, "A", admin)  # the right token: start works as before
    assert status["state"] == "connected"
