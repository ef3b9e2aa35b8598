"""The relay splices two plain TCP data channels through kernel pipes (issue 13, throughput).

Through a real relay: bulk bytes both ways arrive whole (sha256), a half-close passes, a reset
reaches the other end as a reset, the session's byte counters move while bytes are still
flowing, and TLS data channels (wss) keep the plain pump. Then the pump alone over TCP pairs on
127.0.0.1: abort wakes a writer stuck on a peer that stopped reading, and a direction whose pipe
cannot be opened still carries every byte.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading

import pytest

from chuantou_server import relay
from common import splicepipe
from common.net import reset_connection
from common.pipe import Pipe
from common.splicepipe import SplicePipe
from common.threads import ThreadGroup

from helpers import (TcpService, connect, exchange, exchange_handler, hash_until_eof, pattern, random_bytes,
                     recv_exactly, recv_until_eof, reply_after_eof_handler, send_and_close_write, sha256,
                     wait_until)
from security_support import TOKEN, make_self_signed, wss_url

MiB = 1024 * 1024

pytestmark = pytest.mark.skipif(not splicepipe.splice_supported(), reason="no os.splice / F_SETPIPE_SZ here")


@pytest.fixture
def relay_pipes(monkeypatch):
    """Every pipe the relay builds, in order."""
    made: list[Pipe] = []
    build = relay.make_pipe

    def recording(*args, **kwargs):
        pipe = build(*args, **kwargs)
        made.append(pipe)
        return pipe

    monkeypatch.setattr(relay, "make_pipe", recording)
    return made


def only_pipe(made: list[Pipe]) -> Pipe:
    wait_until(lambda: made, timeout=10, message="the relay never joined the session")
    assert len(made) == 1
    return made[0]


@pytest.mark.timeout(120)
def test_64_mib_each_way_are_spliced_with_equal_sha256(server, client_a, client_b, services, relay_pipes):
    pipes_before = splicepipe.pipes_open()
    upload, download = random_bytes(64 * MiB), random_bytes(64 * MiB)
    service = services(TcpService(exchange_handler(download), "exchange"))
    proxy = client_a.create_proxy(0, "B", service.port, protocol="tcp")
    with connect(proxy.local_port, timeout=60) as user:
        received = exchange(user, upload)
    assert received == (sha256(download), len(download)), "the download differs"
    wait_until(lambda: service.results, timeout=10)
    assert service.results == [{"received": (sha256(upload), len(upload))}], "the upload differs"
    pipe = only_pipe(relay_pipes)
    assert isinstance(pipe, SplicePipe) and pipe.spliced == [True, True]
    assert pipe.sent[0] > len(upload) and pipe.sent[1] > len(download)  # plus the sealed records' overhead
    wait_until(lambda: len(server.sessions) == 0, timeout=10)
    wait_until(lambda: splicepipe.pipes_open() == pipes_before, timeout=10, message="the session kept its pipes")
    proxy.close()


@pytest.mark.timeout(60)
def test_a_half_close_passes_and_the_reply_still_flows(server, client_a, client_b, services, relay_pipes):
    upload, reply_size = random_bytes(8 * MiB), 8 * MiB
    service = services(TcpService(reply_after_eof_handler(reply_size), "after-eof"))
    proxy = client_a.create_proxy(0, "B", service.port, protocol="tcp")
    with connect(proxy.local_port, timeout=30) as user:
        send_and_close_write(user, upload)  # the service answers only once it has seen this FIN
        reply = recv_until_eof(user)
    assert reply == hashlib.sha256(upload).digest() + pattern(reply_size)
    assert only_pipe(relay_pipes).spliced == [True, True]
    proxy.close()


def _download_then_reset(conn: socket.socket, service: TcpService) -> None:
    conn.sendall(pattern(4 * MiB))
    reset_connection(conn)


def _how_it_ended(sock: socket.socket) -> str:
    try:
        while sock.recv(MiB):
            pass
        return "eof"
    except ConnectionResetError:
        return "reset"


@pytest.mark.timeout(60)
def test_a_reset_by_the_service_reaches_the_user_as_a_reset(server, client_a, client_b, services, relay_pipes):
    service = services(TcpService(_download_then_reset, "reset"))
    proxy = client_a.create_proxy(0, "B", service.port, protocol="tcp")
    with connect(proxy.local_port, timeout=30) as user:
        user.sendall(b"x")
        assert _how_it_ended(user) == "reset"
    pipe = only_pipe(relay_pipes)
    assert pipe.spliced[1], "the download was not spliced"
    wait_until(lambda: pipe.aborted and len(server.sessions) == 0, timeout=10)
    proxy.close()


def _read_some_then_wait(first: int, release: threading.Event):
    """Reads ``first`` bytes, waits for ``release``, then hashes the rest (sha256 of all in results)."""

    def handler(conn: socket.socket, service: TcpService) -> None:
        head = recv_exactly(conn, first)
        release.wait(30)
        digest, size = hash_until_eof(conn)
        service.results.append((hashlib.sha256(head).hexdigest(), digest, size))

    return handler


@pytest.mark.timeout(60)
def test_the_relays_counters_advance_while_bytes_are_flowing(server, client_a, client_b, services, relay_pipes):
    release = threading.Event()
    first, rest = 4 * MiB, 12 * MiB
    upload = random_bytes(first + rest)
    service = services(TcpService(_read_some_then_wait(first, release), "slow"))
    proxy = client_a.create_proxy(0, "B", service.port, protocol="tcp")
    with connect(proxy.local_port, timeout=30) as user:
        sender = threading.Thread(target=send_and_close_write, args=(user, upload), name="svc-splice-upload")
        sender.start()
        try:
            pipe = only_pipe(relay_pipes)
            (session,) = wait_until(lambda: server.sessions.all(), timeout=10)
            # the service holds still after `first` bytes: the transfer is under way, not done
            wait_until(lambda: session.bytes_a_to_b >= first, timeout=20, message="the relay's counter stood still")
            assert not service.results and pipe.spliced[0]
        finally:
            release.set()
            sender.join(30)
        wait_until(lambda: service.results, timeout=20)
        assert service.results == [(sha256(upload[:first]), sha256(upload[first:]), rest)]
        assert recv_until_eof(user) == b""
    proxy.close()


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    return make_self_signed(tmp_path_factory.mktemp("splice-tls"), "relay")


@pytest.mark.timeout(90)
def test_tls_data_channels_keep_the_plain_pump_and_every_byte(make_server, make_client, cert, services,
                                                              relay_pipes):
    tls_relay = make_server(token=TOKEN, tls_cert=cert.cert, tls_key=cert.key, tls_only=True)
    a = make_client(wss_url(tls_relay), "A", token=TOKEN, ca_file=cert.cert)
    make_client(wss_url(tls_relay), "B", token=TOKEN, ca_file=cert.cert)
    upload, download = random_bytes(16 * MiB), random_bytes(16 * MiB)
    service = services(TcpService(exchange_handler(download), "exchange"))
    proxy = a.create_proxy(0, "B", service.port, protocol="tcp")
    with connect(proxy.local_port, timeout=60) as user:
        assert exchange(user, upload) == (sha256(download), len(download))
    wait_until(lambda: service.results, timeout=10)
    assert service.results == [{"received": (sha256(upload), len(upload))}]
    assert type(only_pipe(relay_pipes)) is Pipe
    proxy.close()


# --- the pump alone, over TCP pairs on 127.0.0.1 ----------------------------------------------

def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """(outer, inner): the outer end with a 10 s timeout (the test's), the inner one blocking (the pump's)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        outer = socket.create_connection(listener.getsockname(), timeout=10)
        inner, _ = listener.accept()
    inner.settimeout(None)
    return outer, inner


@pytest.fixture
def spliced():
    """user <-> [a | SplicePipe | b] <-> service, the pipe running on its own thread."""
    user, a = tcp_pair()
    service, b = tcp_pair()
    group = ThreadGroup("chuantou-test-splice")
    done = threading.Event()
    pipe = SplicePipe(a, b, on_done=lambda _: done.set())
    group.spawn("run", pipe.run, group, "pump")
    yield user, pipe, service, done
    pipe.abort()
    user.close()
    service.close()
    assert group.join_all(timeout=5) == []


@pytest.mark.timeout(30)
def test_abort_wakes_a_writer_stuck_on_a_peer_that_stopped_reading(spliced):
    user, pipe, service, done = spliced
    block = os.urandom(MiB)

    def flood():
        try:
            while True:
                user.sendall(block)
        except OSError:
            pass

    sender = threading.Thread(target=flood, name="svc-splice-flood")
    sender.start()
    wait_until(lambda: pipe.spliced[0] and pipe._writing_since[0], timeout=10,
               message="the pump never blocked writing to the service")
    pipe.abort()
    assert done.wait(10), "abort did not end a pump stuck writing"
    assert pipe.aborted
    sender.join(15)
    assert not sender.is_alive()
    with pytest.raises(ConnectionResetError):
        while service.recv(MiB):
            pass


@pytest.mark.timeout(30)
@pytest.mark.parametrize("shortage", ["no pipes left to grant", "no descriptors"])
def test_a_direction_without_a_pipe_falls_back_to_the_plain_pump(monkeypatch, shortage):
    if shortage == "no pipes left to grant":
        monkeypatch.setattr(splicepipe, "MAX_PIPES", splicepipe.pipes_open())
    else:
        def no_descriptors():
            raise OSError(24, "Too many open files")
        monkeypatch.setattr(splicepipe.os, "pipe", no_descriptors)
    pipes_before = splicepipe.pipes_open()
    user, a = tcp_pair()
    service, b = tcp_pair()
    group = ThreadGroup("chuantou-test-splice")
    pipe = SplicePipe(a, b)
    group.spawn("run", pipe.run, group, "pump")
    payload = os.urandom(8 * MiB)
    try:
        got = []
        reader = threading.Thread(target=lambda: got.append(hash_until_eof(service)), name="svc-splice-read")
        reader.start()
        send_and_close_write(user, payload)
        reader.join(20)
        assert got == [(sha256(payload), len(payload))]
        service.shutdown(socket.SHUT_WR)
        assert recv_until_eof(user) == b""
        assert pipe.spliced == [False, False] and pipe.sent == [len(payload), 0]
        assert group.join_all(timeout=5) == []
        assert pipe.ended_cleanly
        assert splicepipe.pipes_open() == pipes_before
    finally:
        pipe.abort()
        user.close()
        service.close()
        group.join_all(timeout=5)
