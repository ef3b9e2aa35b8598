"""The relay's inner seams: its settings as one ServerConfig, the atomic join of a data channel,
and a handler's bug logged as a bug (not as a dropped connection)."""

from __future__ import annotations

import dataclasses
import logging
import socket
import threading

import pytest

from chuantou_server import Server, ServerConfig
from chuantou_server import admin as server_admin
from common.errors import ChuantouError
from common.frames import JoinRequest, JoinStatus, pack_data_header

from helpers import HOST, http_get, recv_exactly, wait_until

TOKEN = "structure-test-token-0123456789"
RACES = 40  # sessions raced for; the old check-then-attach let both channels read JOINED within a few


# --- ServerConfig ----------------------------------------------------------------------------------

def test_keyword_arguments_and_a_config_build_the_same_settings():
    by_kwargs = Server("127.0.0.1", 0, 7.0, token=TOKEN, client_tokens={"B": TOKEN + "b"}, extra_tokens=["x" * 20])
    config = ServerConfig("127.0.0.1", 0, 7.0, token=TOKEN, client_tokens={"B": TOKEN + "b"},
                          extra_tokens=("x" * 20,))
    assert by_kwargs.config == config
    assert Server(config=config).config is config
    assert by_kwargs.auth_required and not Server(port=0).auth_required
    with pytest.raises(TypeError):
        Server(config=config, port=1)
    with pytest.raises(TypeError):
        Server(no_such_setting=1)


def test_a_config_is_frozen_keeps_secrets_out_of_its_repr_and_cannot_be_changed_through_its_mappings():
    tokens = {"B": TOKEN}
    config = ServerConfig(token=TOKEN, client_tokens=tokens, admin_token="admin-" + TOKEN)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.port = 1  # type: ignore[misc]
    tokens["C"] = "added later"
    assert dict(config.client_tokens) == {"B": TOKEN}
    with pytest.raises(TypeError):
        config.client_tokens["D"] = "x"  # type: ignore[index]
    assert TOKEN not in repr(config) and "admin-" not in repr(config)


def test_a_config_refuses_what_it_can_tell_is_wrong_without_any_socket():
    with pytest.raises(ChuantouError, match="tls_only needs a certificate"):
        ServerConfig(tls_only=True)
    with pytest.raises(ChuantouError, match="must not be a client registration token"):
        ServerConfig(token=TOKEN, admin_token=TOKEN)


def test_reconfigure_changes_only_what_the_relay_reads_each_time(make_server):
    relay = make_server()
    assert not relay.auth_required
    relay.reconfigure(token=TOKEN, public_port=1234)
    assert relay.auth_required and relay.config.public_port == 1234
    with pytest.raises(ValueError, match="max_sessions cannot change"):
        relay.reconfigure(max_sessions=1)


# --- the atomic join (issue 11 item 6) -------------------------------------------------------------

def _race_for_side_a(relay: Server) -> list[int]:
    """Two data channels for side A of one fresh session, sent at the same moment; their status bytes."""
    session = relay.sessions.create("A", "B", 1, "tcp")
    header = pack_data_header(JoinRequest("A", session.id, session.secret_a))
    barrier = threading.Barrier(2)
    statuses: list[int] = []
    channels = [socket.create_connection((HOST, relay.port), timeout=5.0) for _ in range(2)]

    def join(channel: socket.socket) -> None:
        barrier.wait(timeout=5.0)
        channel.sendall(header)
        statuses.append(recv_exactly(channel, 1)[0])

    threads = [threading.Thread(target=join, args=(c,), name=f"test-join-{i}") for i, c in enumerate(channels)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10.0)
    finally:
        relay.close_session(session, "test over", notify=False)
        for channel in channels:
            channel.close()
    return statuses


def test_two_channels_racing_for_one_side_get_exactly_one_joined(make_server):
    relay = make_server()
    for _ in range(RACES):
        statuses = _race_for_side_a(relay)
        assert sorted(statuses) == [JoinStatus.JOINED, JoinStatus.ALREADY_JOINED], statuses
    wait_until(lambda: len(relay.sessions) == 0 and relay.handshakes.pending == 0)


# --- a bug in a handler ----------------------------------------------------------------------------

def test_a_bug_in_a_handler_is_logged_as_an_error_with_its_traceback(make_server, monkeypatch, caplog):
    relay = make_server(admin_token="admin-" + TOKEN)

    def broken(*args):
        raise ValueError("a bug in the admin page")

    monkeypatch.setattr(server_admin, "handle", broken)
    with caplog.at_level(logging.DEBUG, logger="chuantou"):
        with pytest.raises(OSError):  # the relay closes the connection without an answer
            http_get(relay.port, "/api/status")
        wait_until(lambda: any(r.exc_info for r in caplog.records if r.levelno >= logging.ERROR))
    bugs = [r for r in caplog.records if r.levelno >= logging.ERROR and r.exc_info]
    assert "failed in its handler" in bugs[0].getMessage()
    assert isinstance(bugs[0].exc_info[1], ValueError)
    assert not any("dropped" in r.getMessage() for r in caplog.records)
    _forget_expected_crash(ValueError)


def _forget_expected_crash(kind: type) -> None:
    """The autouse thread check fails a test whose library threads logged an exception; this one
    was the point of the test."""
    for handler in logging.getLogger("chuantou").handlers:
        records = getattr(handler, "records", None)
        if isinstance(records, list):
            records[:] = [r for r in records if not (r.exc_info and isinstance(r.exc_info[1], kind))]
