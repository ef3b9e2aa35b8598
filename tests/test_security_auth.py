"""Authentication by challenge: the right token registers, every wrong one is refused with a
clear error and a closed channel, live IDs cannot be stolen with another credential, identity
comes from the connection, and neither tokens nor session secrets leak into logs, repr() or
error messages."""

from __future__ import annotations

import json
import logging

import pytest

from chuantou_client import Client
from common import auth
from common import protocol as p
from common.errors import ChuantouError

from helpers import TcpService, UdpEchoService, connect, echo_handler, relay_url, udp_roundtrip
from security_support import (
    OTHER_TOKEN,
    PROMPT,
    TOKEN,
    echo_roundtrip,
    log_lines,
    peers,  # noqa: F401 (fixture)
    registered_peer,
    udp_socket,
)

pytestmark = pytest.mark.timeout(30)

AUTH_FAILED = "authentication failed"


@pytest.fixture
def relay(make_server):
    return make_server(token=TOKEN)


# --- success -------------------------------------------------------------------------------------

def test_the_right_token_registers_and_the_tunnel_works(relay, make_client, tcp_echo, peers):
    peer = peers(relay)
    assert peer.challenge.authRequired and peer.challenge.protocolVersion == p.PROTOCOL_VERSION
    assert len(bytes.fromhex(peer.challenge.nonce)) >= 16
    assert peers(relay).challenge.nonce != peer.challenge.nonce  # fresh per connection

    a = make_client(relay, "A", token=TOKEN)
    make_client(relay, "B", token=TOKEN)
    assert sorted(a.list_clients()) == ["A", "B"]
    proxy = a.create_proxy(0, "B", tcp_echo.port, protocol="tcp")
    assert echo_roundtrip(proxy.local_port) == b"hello through the tunnel"
    proxy.close()


def test_an_open_relay_says_so_and_registers_without_a_proof(make_server, peers):
    relay = make_server()
    peer = peers(relay)
    assert peer.challenge.authRequired is False
    assert peer.register("anyone").success


# --- each failure ----------------------------------------------------------------------------------

def test_a_wrong_token_is_refused_with_a_plain_error_and_the_channel_is_closed(relay, peers):
    peer = peers(relay)
    reply = peer.register("A", token=OTHER_TOKEN)
    assert reply == p.RegisterResponse(success=False, error=AUTH_FAILED)  # nothing about which part was wrong
    assert peer.closed_by_relay(PROMPT)
    assert relay.registry.ids() == []


def test_a_wrong_token_fails_client_start_at_once_without_retrying(relay, make_client):
    with pytest.raises(ChuantouError, match=AUTH_FAILED) as caught:
        make_client(relay, "A", token=OTHER_TOKEN, connect_timeout=5)
    assert OTHER_TOKEN not in str(caught.value) and TOKEN not in str(caught.value)
    assert relay.registry.ids() == []


def test_no_token_is_refused_with_a_hint_to_pass_one(relay, peers, make_client):
    peer = peers(relay)
    reply = peer.register("A")
    assert not reply.success
    assert reply.error.startswith("authentication failed: this relay requires a token")
    assert "--token" in reply.error
    assert peer.closed_by_relay(PROMPT)
    with pytest.raises(ChuantouError, match="requires a token"):
        make_client(relay, "A", connect_timeout=5)
    assert relay.registry.ids() == []


@pytest.mark.parametrize("proof", ["", "00" * 32, "not hex at all", "é" * 64, "\ud800" * 8, "x" * 5000],
                         ids=["empty", "zeros", "not-hex", "non-ascii", "lone-surrogate", "huge"])
def test_a_malformed_proof_is_refused_like_a_wrong_one(relay, peers, proof):
    peer = peers(relay)
    reply = peer.register("A", proof=proof)
    assert not reply.success and reply.error.startswith(AUTH_FAILED)
    assert peer.closed_by_relay(PROMPT)
    assert registered_peer(peers, relay, "after").challenge  # the relay still serves others


def test_a_proof_is_bound_to_its_nonce_and_client_id(relay, peers):
    first = peers(relay)
    replayed = auth.register_proof(TOKEN, first.challenge.nonce, "A")
    second = peers(relay)  # another connection, another nonce: the old proof is useless
    assert not second.register("A", proof=replayed).success
    third = peers(relay)  # a proof for ID "A" does not register "M"
    assert not third.register("M", proof=auth.register_proof(TOKEN, third.challenge.nonce, "A")).success
    assert first.register("A", proof=replayed).success  # on its own connection it works
    assert relay.registry.ids() == ["A"]


def test_a_token_bound_to_a_client_id_registers_only_that_id(make_server, peers):
    bound = "bound-token-" + "b" * 20
    relay = make_server(token=TOKEN, client_tokens={"B": bound})
    assert peers(relay).register("B", bound).success
    other = peers(relay)
    assert other.register("B", TOKEN) == p.RegisterResponse(success=False, error=AUTH_FAILED)  # not even the relay's
    assert other.closed_by_relay(PROMPT)
    elsewhere = peers(relay)
    assert not elsewhere.register("C", bound).success  # the bound token is good for B only
    assert peers(relay).register("C", TOKEN).success
    assert relay.registry.ids() == ["B", "C"]


# --- taking over a live client ID ------------------------------------------------------------------

def test_takeover_with_another_credential_is_refused_and_the_live_client_keeps_working(
        make_server, make_client, peers, tcp_echo):
    first, second = "first-token-" + "1" * 20, "second-token-" + "2" * 20
    relay = make_server(extra_tokens=[first, second])
    live_b = make_client(relay, "B", token=first)
    a = make_client(relay, "A", token=first)

    thief = peers(relay)
    reply = thief.register("B", second)
    assert not reply.success and "different credential" in reply.error and "'B'" in reply.error
    assert thief.closed_by_relay(PROMPT)
    with pytest.raises(ChuantouError, match="different credential"):
        make_client(relay, "B", token=second, connect_timeout=5)

    assert relay.registry.get("B").credential == auth.fingerprint(first)
    assert live_b.connected and live_b.control.state == "connected"
    proxy = a.create_proxy(0, "B", tcp_echo.port, protocol="tcp")
    assert echo_roundtrip(proxy.local_port) == b"hello through the tunnel"
    assert live_b.connected and relay.registry.ids() == ["A", "B"]
    proxy.close()


def test_takeover_with_the_same_credential_replaces_the_old_connection(relay, make_client, peers, tcp_echo):
    old = registered_peer(peers, relay, "B")
    new = peers(relay)
    reply = new.register("B", TOKEN)
    assert reply.success and reply.existingKicked and reply.assignedId == "B"
    told = old.recv_until(p.Error)
    assert told.code == "replaced"
    assert old.closed_by_relay(PROMPT)
    assert relay.registry.get("B") is not None and relay.registry.ids() == ["B"]


# --- identity comes from the connection ------------------------------------------------------------

def test_from_client_id_in_a_connect_request_is_ignored(relay, peers):
    target = registered_peer(peers, relay, "T")
    registered_peer(peers, relay, "B")  # the client M pretends to be
    mallory = registered_peer(peers, relay, "M")
    mallory.send(json.dumps({"type": "connect_request", "payload": {  # session fields A has no business setting
        "toClientId": "T", "remotePort": 22, "requestId": "r1", "fromClientId": "B",
        "sessionId": "ab" * 16, "secret": "cd" * 16}}))
    created = mallory.recv_until(p.CreateSession)
    forwarded = target.recv_until(p.ConnectOffer)
    assert forwarded.fromClientId == "M"
    assert forwarded.sessionId == created.sessionId != "ab" * 16  # the relay chose the session ...
    assert forwarded.secret not in ("cd" * 16, created.secret)  # ... and a secret per side
    (session,) = relay.sessions.all()
    assert (session.client_a, session.client_b) == ("M", "T")


# --- secrets stay secret ---------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_tokens_and_session_secrets_appear_in_no_log_repr_or_error(relay, make_client, services, caplog,
                                                                     monkeypatch):
    caplog.set_level(logging.DEBUG)
    created = []
    original_create = relay.sessions.create
    monkeypatch.setattr(relay.sessions, "create", lambda *args: created.append(original_create(*args)) or created[-1])

    a = make_client(relay, "A", token=TOKEN)
    b = make_client(relay, "B", token=TOKEN)
    echo = services(TcpService(echo_handler, "echo"))
    udp_echo = services(UdpEchoService())
    proxy = a.create_proxy(0, "B", echo.port, protocol="tcp")
    udp_proxy = a.create_proxy(0, "B", udp_echo.port, protocol="udp")
    assert echo_roundtrip(proxy.local_port) == b"hello through the tunnel"
    with udp_socket() as user:
        assert udp_roundtrip(user, udp_proxy.local_port, b"datagram") == b"datagram"
    refused = a.create_proxy(0, "B", 1, protocol="tcp")  # B cannot connect: a rejection with a reason
    with connect(refused.local_port) as user:
        user.settimeout(PROMPT)
        try:
            assert user.recv(1) == b""
        except ConnectionResetError:
            pass
    errors = []
    for token in (OTHER_TOKEN, None):
        try:
            Client(relay_url(relay), "C", token=token, connect_timeout=5).start()
        except ChuantouError as exc:
            errors.append(str(exc))
    assert len(errors) == 2
    assert len(created) >= 3  # TCP, UDP and the refused one
    secrets = {TOKEN} | {s for session in created for s in (session.secret_a, session.secret_b)}

    texts = {"log": "\n".join(log_lines(caplog)), "errors": "\n".join(errors)}
    texts["repr"] = " ".join(repr(x) for x in (relay, a, b, proxy, *created, *relay.registry.connections(),
                                               a.control, relay.sessions, relay.udp))
    texts["status"] = json.dumps([a.status(), b.status(), relay.status(), a.connections()], default=str)
    for where, text in texts.items():
        leaked = [s[:6] + "..." for s in secrets if s in text]
        assert not leaked, f"secrets found in {where}: {leaked}"
    assert any("registered" in line for line in texts["log"].splitlines())  # the log did capture the session
    for p_ in (proxy, udp_proxy, refused):
        p_.close()



# --- peers' text cannot forge log lines -------------------------------------------------------------

FORGED = "no\n12:00:00 INFO chuantou.server: client admin registered\x1b[2J"


def test_a_reason_with_newlines_and_escapes_forges_no_log_line(relay, peers, caplog):
    target = registered_peer(peers, relay, "T")
    asker = registered_peer(peers, relay, "A")
    asker.send(p.ConnectRequest(toClientId="T", remotePort=22, requestId="r1"))
    asker.recv_until(p.CreateSession)
    offer = target.recv_until(p.ConnectOffer)
    target.send(p.RejectSession(sessionId=offer.sessionId, reason=FORGED))
    closed = asker.recv_until(p.SessionClosed)
    assert "\n" not in closed.reason and "\x1b" not in closed.reason and "\\x0a12:00:00" in closed.reason
    relay_lines = [r.getMessage() for r in caplog.records if r.name.startswith("chuantou")]
    assert any("\\x0a12:00:00 INFO" in line for line in relay_lines), relay_lines[-5:]
    assert not any("\n" in line or "\x1b" in line for line in relay_lines)


def test_the_cli_log_filter_escapes_whatever_reaches_a_message():
    from common.logsafe import EscapeControlChars

    record = logging.LogRecord("chuantou.server", logging.INFO, __file__, 1, "path %s", (FORGED,), None)
    assert EscapeControlChars().filter(record)
    assert record.getMessage() == "path no\\x0a12:00:00 INFO chuantou.server: client admin registered\\x1b[2J"
