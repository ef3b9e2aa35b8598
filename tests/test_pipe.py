"""The byte pump and the deadline reader over socket.socketpair(): no relay, no clients."""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from common.net import recv_exact
from common.pipe import Pipe
from common.threads import ThreadGroup

from helpers import exchange, recv_until_eof, sha256, wait_until


@pytest.fixture
def joined():
    """user <-> [a | Pipe | b] <-> service, the pipe running on its own thread."""
    user, a = socket.socketpair()
    b, service = socket.socketpair()
    group = ThreadGroup("chuantou-test-pipe")
    done = threading.Event()
    pipe = Pipe(a, b, on_done=lambda _: done.set())
    group.spawn("run", pipe.run, group, "pump")
    yield user, pipe, service, done
    pipe.abort()
    user.close()
    service.close()
    assert group.join_all(timeout=5) == []


def test_bytes_pass_both_ways_and_are_counted(joined):
    user, pipe, service, done = joined
    up, down = os.urandom(3 << 20), os.urandom(1 << 20)
    at_service = []
    other_end = threading.Thread(target=lambda: at_service.append(exchange(service, down)), name="svc-pipe-end")
    other_end.start()
    at_user = exchange(user, up)
    other_end.join(10)
    assert at_user == (sha256(down), len(down))
    assert at_service == [(sha256(up), len(up))]
    assert done.wait(5)
    assert pipe.sent == [len(up), len(down)]


def test_half_close_passes_through_and_the_other_direction_keeps_flowing(joined):
    user, pipe, service, done = joined
    user.sendall(b"request")
    user.shutdown(socket.SHUT_WR)
    assert recv_until_eof(service) == b"request"  # the FIN arrived
    service.sendall(b"reply after the FIN")
    service.shutdown(socket.SHUT_WR)
    assert recv_until_eof(user) == b"reply after the FIN"
    assert done.wait(5)


def test_abort_closes_both_ends(joined):
    user, pipe, service, done = joined
    user.sendall(b"x")
    assert service.recv(1) == b"x"
    pipe.abort()
    assert done.wait(5)
    assert pipe.aborted
    user.settimeout(2)
    service.settimeout(2)
    assert user.recv(1) == b"" and service.recv(1) == b""


def test_recv_exact_reads_a_trickle_before_the_deadline():
    left, right = socket.socketpair()
    with left, right:
        sender = threading.Thread(
            target=lambda: [right.sendall(bytes([i])) for i in range(10)], name="svc-trickle")
        sender.start()
        assert recv_exact(left, 10, time.monotonic() + 5) == bytes(range(10))
        sender.join(5)


def test_recv_exact_gives_up_at_the_deadline_even_while_bytes_trickle():
    left, right = socket.socketpair()
    with left, right:
        right.sendall(b"ab")
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            recv_exact(left, 35, started + 0.3)
        assert time.monotonic() - started < 2


def test_recv_exact_raises_on_eof():
    left, right = socket.socketpair()
    with left:
        right.sendall(b"abc")
        right.close()
        with pytest.raises(ConnectionError, match="3 of 5 bytes"):
            recv_exact(left, 5, time.monotonic() + 5)


def test_thread_group_names_threads_and_join_all_reports_stragglers():
    group = ThreadGroup("chuantou-test-group")
    release = threading.Event()
    thread = group.spawn("waiter", release.wait, 10)
    assert thread.name == "chuantou-test-group-waiter"
    assert group.join_all(timeout=0.1) == ["chuantou-test-group-waiter"]
    release.set()
    assert group.join_all(timeout=5) == []
    wait_until(lambda: len(group) == 0)
