"""What goes wrong, and how the tunnel behaves: an absent target, a closed port, a stolen client
ID, a silent client, junk on the relay port, a forged data channel, bad control messages."""

from __future__ import annotations

import logging
import os
import socket
import time

import pytest
import websocket

from common import protocol as p
from common.frames import JoinRequest, JoinStatus, pack_data_header

from helpers import (
    HOST,
    TcpService,
    closed_by_peer,
    connect,
    free_port,
    hash_until_eof,
    random_bytes,
    recv_exactly,
    sha256,
    wait_until,
)
from security_support import registered_peer

MiB = 1024 * 1024
PROMPT = 2.0  # seconds within which a doomed user connection must be closed


def assert_closed_promptly(port: int) -> float:
    """Connect a user to ``port`` and assert the tunnel closes it within PROMPT seconds; return how long it took."""
    started = time.monotonic()
    with connect(port) as user:
        try:
            user.sendall(b"anyone there?")
        except (BrokenPipeError, ConnectionResetError):
            pass
        assert closed_by_peer(user, timeout=PROMPT + 3), "the user's connection stayed open"
    elapsed = time.monotonic() - started
    assert elapsed < PROMPT, f"the user's connection was closed only after {elapsed:.2f} s"
    return elapsed


# --- the target is not there --------------------------------------------------------------------

def test_target_client_never_registered_closes_the_user_promptly(server, client_a, tcp_echo, caplog):
    proxy = client_a.create_proxy(0, "ghost", tcp_echo.port, protocol="tcp")
    assert_closed_promptly(proxy.local_port)
    wait_until(lambda: any("'ghost' is not online" in m for m in caplog.messages))
    assert len(server.sessions) == 0
    proxy.close()


def test_target_client_gone_offline_closes_the_user_promptly(server, client_a, client_b, tcp_echo):
    proxy = client_a.create_proxy(0, "B", tcp_echo.port, protocol="tcp")
    with connect(proxy.local_port) as user:  # works while B is there
        user.sendall(b"hi")
        assert recv_exactly(user, 2) == b"hi"
    client_b.stop()
    wait_until(lambda: "B" not in server.registry.ids())
    assert_closed_promptly(proxy.local_port)
    assert client_a.connected  # A itself is fine
    proxy.close()


def test_target_port_closed_on_b_rejection_reaches_a_and_closes_the_user(server, client_a, client_b, caplog):
    closed_port = free_port()
    proxy = client_a.create_proxy(0, "B", closed_port, protocol="tcp")
    assert_closed_promptly(proxy.local_port)

    reason = f"the target client cannot reach port {closed_port}"

    def a_heard_the_reason():
        return any(reason in r.getMessage() for r in caplog.records if r.threadName.startswith(
            ("chuantou-client-A-", f"chuantou-proxy-{proxy.local_port}-")))

    wait_until(a_heard_the_reason, message="A logs B's rejection with its reason")
    wait_until(lambda: len(server.sessions) == 0)
    # A and B both remain usable
    assert sorted(client_a.list_clients()) == ["A", "B"]
    proxy.close()


# --- a client ID taken over ----------------------------------------------------------------------

def test_client_id_taken_over_by_a_new_connection(server, client_a, make_client, tcp_echo):
    first = make_client(server, "dup")
    second = make_client(server, "dup")

    wait_until(lambda: "in use" in (first.control.last_error or ""), message="the replaced client retries, politely")
    assert first.control.state == "reconnecting" and not first.control.finished.is_set()
    assert "dup" in first.control.last_error
    assert not first.connected and second.connected
    assert client_a.list_clients().count("dup") == 1

    proxy = client_a.create_proxy(0, "dup", tcp_echo.port, protocol="tcp")
    with connect(proxy.local_port) as user:
        user.sendall(b"to the new one")
        assert recv_exactly(user, 14) == b"to the new one"
        assert second.status()["activeSessions"] == 1
        assert first.status()["activeSessions"] == 0
    proxy.close()
    assert second.connected and not first.connected  # see test_identity.py for the rest


def test_takeover_on_the_wire_old_connection_is_told_and_closed(server, peers):
    old = registered_peer(peers, server, "same", token=None)
    new = peers(server)
    new.send(p.Register(clientId="same", protocolVersion=p.PROTOCOL_VERSION))
    reply = new.recv()
    assert reply.success and reply.existingKicked and reply.assignedId == "same"

    told = old.recv()
    assert isinstance(told, p.Error) and told.code == "replaced"
    assert old.closed_by_relay(3)
    new.send(p.GetClientList(requestId="q"))
    assert new.recv() == p.ClientList(clients=[p.ClientInfo(id="same")], requestId="q")


# --- heartbeats ----------------------------------------------------------------------------------

@pytest.mark.timeout(30)
def test_heartbeat_timeout_drops_a_silent_client(make_server, make_client, peers):
    server = make_server(heartbeat_timeout=1.0)
    watcher = make_client(server, "watcher", heartbeat_interval=0.2)
    silent = registered_peer(peers, server, "silent", token=None)
    assert sorted(watcher.list_clients()) == ["silent", "watcher"]
    registered = time.monotonic()

    wait_until(lambda: "silent" not in watcher.list_clients(), timeout=5, message="silent client dropped")
    assert time.monotonic() - registered >= 0.9  # dropped for silence, not at once
    assert watcher.list_clients() == ["watcher"]  # heartbeats kept the other one alive just as long
    assert silent.closed_by_relay(3)
    assert watcher.connected


@pytest.mark.timeout(30)
def test_a_silent_client_loses_its_waiting_sessions(make_server, make_client, peers, tcp_echo):
    """A session towards a client that never answers is not left hanging: the user is closed."""
    server = make_server(heartbeat_timeout=1.0, session_join_timeout=1.0)
    a = make_client(server, "A", heartbeat_interval=0.2)
    registered_peer(peers, server, "mute", token=None)  # registered, but never joins anything
    proxy = a.create_proxy(0, "mute", tcp_echo.port, protocol="tcp")
    with connect(proxy.local_port) as user:
        assert closed_by_peer(user, timeout=5)
    wait_until(lambda: len(server.sessions) == 0)
    proxy.close()


# --- junk on the relay port ----------------------------------------------------------------------

@pytest.mark.timeout(90)
def test_garbage_and_silence_on_the_relay_port_leave_a_running_transfer_intact(
        make_server, make_client, services):
    server = make_server(handshake_timeout=1.0)
    a = make_client(server, "A")
    make_client(server, "B")
    received = []

    def sink(conn, service):
        received.append(hash_until_eof(conn))
        conn.sendall(b"done")

    service = services(TcpService(sink, "sink"))
    proxy = a.create_proxy(0, "B", service.port, protocol="tcp")
    upload = random_bytes(48 * MiB)
    half = len(upload) // 2

    with connect(proxy.local_port, timeout=30) as user:
        user.sendall(upload[:half])  # the transfer is running ...
        wait_until(lambda: server.sessions.all() and server.sessions.all()[0].bytes_a_to_b > 0)

        # ... while strangers knock on the relay port
        junk = [
            b"\x00\x01\x02" + random_bytes(4096),                  # binary noise
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + random_bytes(500),  # a TLS ClientHello
            b"SSH-2.0-OpenSSH_9.6\r\n",                           # another protocol's banner
            b"\xfd\x01" + random_bytes(33),                       # a forged data-channel header
            b"GET / HTTP/1.1\r\nHost: x\r\n",                     # half an HTTP request, then silence
            b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n",       # a request head far too large
            b"",                                                  # a connection that says nothing
        ]
        strangers = []
        for data in junk:
            sock = socket.create_connection((HOST, server.port), timeout=5)
            if data:
                sock.sendall(data)
            strangers.append(sock)
        try:
            for sock, data in zip(strangers, junk):
                assert closed_by_peer_draining(sock, timeout=5), f"relay kept a connection that sent {data[:12]!r}"
        finally:
            for sock in strangers:
                sock.close()

        user.sendall(upload[half:])
        user.shutdown(socket.SHUT_WR)
        assert recv_exactly(user, 4) == b"done"

    assert received == [(sha256(upload), len(upload))]
    assert sorted(a.list_clients()) == ["A", "B"]  # control channels undisturbed
    proxy.close()


def closed_by_peer_draining(sock: socket.socket, timeout: float) -> bool:
    """Like closed_by_peer, but reads past any answer (e.g. an HTTP error page) to the close."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            if sock.recv(65536) == b"":
                return True
        except ConnectionResetError:
            return True
        except socket.timeout:
            return False
    return False


def test_relay_answers_plain_http_and_closes(server):
    """Plain HTTP on the relay port gets a whole HTTP answer (whatever the page) and the connection ends;
    malformed requests get the matching error status."""
    host = f"Host: 127.0.0.1:{server.port}\r\n".encode()
    for request, status in ((b"GET / HTTP/1.1\r\n" + host + b"\r\n", None),
                            (b"GET /no/such/page HTTP/1.1\r\n" + host + b"\r\n", b"404"),
                            (b"GET / HTTP/2.0\r\n\r\n", b"505"),
                            (b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n", b"431")):
        with connect(server.port, timeout=5) as sock:
            sock.sendall(request)
            reply = b""
            while True:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                reply += chunk
        head = reply.split(b"\r\n", 1)[0]
        assert head.startswith(b"HTTP/1.1 ") and len(head.split(b" ")[1]) == 3, (request[:30], reply[:80])
        assert head.split(b" ")[1] != b"101"
        if status is not None:
            assert head.split(b" ")[1] == status, (request[:30], head)



def plain_http_status(port: int, request: bytes) -> bytes:
    """Send ``request`` on a fresh connection; the status code of the relay's answer (it then closes)."""
    with connect(port, timeout=5) as sock:
        sock.sendall(request)
        reply = b""
        while chunk := sock.recv(4096):
            reply += chunk
    return reply.split(b"\r\n", 1)[0].split(b" ")[1]


def test_relay_refuses_heads_that_break_the_http_rules(server):
    """The head is parsed by h11: a missing or doubled Host, a folded line, an unsupported transfer
    coding and a head just over 16 KiB in one write are refused, not served."""
    host = f"Host: 127.0.0.1:{server.port}\r\n".encode()
    for request, status in ((b"GET / HTTP/1.1\r\n\r\n", b"400"),  # HTTP/1.1 requires Host
                            (b"GET / HTTP/1.1\r\n" + host + b"Host: evil.example\r\n\r\n", b"400"),
                            (b"GET / HTTP/1.1\r\n" + host + b"X-A:1\r\n\tfolded\r\nbad line\r\n\r\n", b"400"),
                            (b"GET / HTTP/1.1\r\n" + host + b"Transfer-Encoding: gzip\r\n\r\n", b"501"),
                            (b"GET / HTTP/1.1\r\n" + host + b"X-Pad: " + b"a" * 16500 + b"\r\n\r\n", b"431")):
        assert plain_http_status(server.port, request) == status, request[:40]
    assert plain_http_status(server.port, b"GET / HTTP/1.0\r\n\r\n") not in (b"400", b"431")  # 1.0: no Host needed

# --- forged data channels ------------------------------------------------------------------------

def join_status(server, join: JoinRequest) -> tuple[int, bytes]:
    """Present ``join`` on the relay port; return (status byte, what follows it until EOF)."""
    with connect(server.port, timeout=5) as sock:
        sock.sendall(pack_data_header(join))
        status = recv_exactly(sock, 1)[0]
        rest = b""
        while True:
            try:
                chunk = sock.recv(4096)
            except ConnectionResetError:
                break
            if not chunk:
                break
            rest += chunk
    return status, rest


def test_data_channel_with_a_wrong_secret_is_refused(server, client_a, client_b, tcp_echo):
    proxy = client_a.create_proxy(0, "B", tcp_echo.port, protocol="tcp")
    with connect(proxy.local_port) as user:
        user.sendall(b"ping")
        assert recv_exactly(user, 4) == b"ping"
        (session,) = server.sessions.all()

        wrong = os.urandom(16).hex()
        assert join_status(server, JoinRequest("A", session.id, wrong)) == (JoinStatus.BAD_SECRET, b"")
        assert join_status(server, JoinRequest("B", session.id, wrong)) == (JoinStatus.BAD_SECRET, b"")
        # each side has its own secret: B's does not open side A, nor A's side B
        assert join_status(server, JoinRequest("A", session.id, session.secret_b))[0] == JoinStatus.BAD_SECRET
        assert join_status(server, JoinRequest("B", session.id, session.secret_a))[0] == JoinStatus.BAD_SECRET
        # an invented session id is unknown
        assert join_status(server, JoinRequest("A", os.urandom(16).hex(), wrong)) == (JoinStatus.UNKNOWN_SESSION, b"")

        # the real session never noticed
        user.sendall(b"still mine")
        assert recv_exactly(user, 10) == b"still mine"
        assert server.sessions.all() == [session]
    proxy.close()


def test_data_channel_for_a_session_side_already_joined_is_refused(server, client_a, client_b, tcp_echo):
    proxy = client_a.create_proxy(0, "B", tcp_echo.port, protocol="tcp")
    with connect(proxy.local_port) as user:
        user.sendall(b"ping")
        assert recv_exactly(user, 4) == b"ping"
        (session,) = server.sessions.all()
        status, rest = join_status(server, JoinRequest("A", session.id, session.secret_a))
        assert (status, rest) == (JoinStatus.ALREADY_JOINED, b"")
        user.sendall(b"pong")
        assert recv_exactly(user, 4) == b"pong"
    proxy.close()


def test_data_channel_header_trickled_too_slowly_is_dropped(make_server):
    server = make_server(handshake_timeout=0.5)
    with connect(server.port) as sock:
        sock.sendall(b"\xfd\x01A")  # then nothing more
        assert closed_by_peer(sock, timeout=3)


# --- bad control messages ------------------------------------------------------------------------

def test_bad_control_messages_are_answered_with_an_error_and_the_channel_survives(server, peers):
    peer = registered_peer(peers, server, "chatty", token=None)
    for junk in ("not json", '{"type": "teleport", "payload": {}}', '{"type": "connect_request", "payload": {}}',
                 '{"type": "heartbeat", "payload": {"timestamp": "noon"}}', "[]"):
        peer.send(junk)
        reply = peer.recv()
        assert isinstance(reply, p.Error) and reply.code == "bad_message", (junk, reply)
    # a message only the relay sends
    peer.send(p.ClientList(clients=[]))
    assert peer.recv().code == "bad_message"
    # the channel still works
    peer.send(p.Heartbeat(timestamp=5.0))
    assert peer.recv() == p.Heartbeat(timestamp=5.0)
    peer.send(p.GetClientList(requestId="after"))
    assert peer.recv() == p.ClientList(clients=[p.ClientInfo(id="chatty")], requestId="after")


def test_unregistered_control_connection_is_closed_after_the_handshake_timeout(make_server, peers):
    server = make_server(handshake_timeout=0.5)
    peer = peers(server)
    assert peer.closed_by_relay(4)


def test_wrong_protocol_version_is_refused_with_a_clear_message(server, peers):
    peer = peers(server)
    peer.send(p.Register(clientId="future", protocolVersion=p.PROTOCOL_VERSION + 1))
    reply = peer.recv()
    assert isinstance(reply, p.RegisterResponse) and not reply.success
    assert "version" in reply.error and "same chuantou version" in reply.error
    assert peer.closed_by_relay(3)
    assert server.registry.ids() == []


def test_oversized_control_message_ends_only_that_connection(server, client_a, peers):
    peer = registered_peer(peers, server, "big", token=None)
    try:
        peer.send("x" * (p.MAX_MESSAGE_BYTES + 1024))
    except (websocket.WebSocketException, OSError):
        pass
    assert peer.closed_by_relay(5)
    wait_until(lambda: "big" not in server.registry.ids())
    assert client_a.list_clients() == ["A"]


def test_an_answer_that_crosses_the_end_of_its_session_is_no_warning(server, client_b, caplog):
    """B accepts a session the user already left: the relay's "no session is waiting" is a race,
    not something an operator should act on (it came 96 times per 20,000 sessions)."""
    caplog.set_level(logging.DEBUG)
    client_b.control.send(p.AcceptSession(sessionId="ab" * 16))
    wait_until(lambda: any("is waiting for this client" in r.getMessage() for r in caplog.records),
               message="B hears the relay's answer")
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
