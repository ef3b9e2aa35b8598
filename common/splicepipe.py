"""The byte pump through a kernel pipe: ``os.splice`` socket -> pipe -> socket, no copy in Python.

``SplicePipe`` keeps the contract of ``common.pipe.Pipe`` (it is one: two threads per session,
a FIN passed on as ``shutdown(SHUT_WR)``, every abnormal end a reset with SO_LINGER 0 armed,
``sent[0]``/``sent[1]`` advanced per chunk, ``abort()`` waking both threads, a stuck writer woken
after STUCK_WRITE); only the bulk copy differs. It joins plain, blocking TCP sockets only: a
TlsStream has to be read in Python, so it keeps the plain pump (``can_splice``).

A direction starts with the plain pump's small reads and opens its pipe only once the stream
proves to be bulk: an idle or chatty session holds no pipe, so thousands of them cost no extra
descriptors. At most MAX_PIPES pipes are open at once, so bulk sessions cannot eat the
descriptors (and pinned pages) that new sessions need. Should a pipe not be granted or not open,
or splice be refused, that direction carries on with the plain pump; should the 1 MiB size be
refused (the user's pipe-pages allowance), it splices through the pipe's default size.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import threading
import time

from .pipe import IDLE_READ, SMALL_READ, Pipe

PIPE_SIZE = 1024 * 1024
MAX_PIPES = 256  # one per splicing direction: 512 descriptors of the relay's 20,000, at most 256 MiB in flight
_pipes_lock = threading.Lock()
_pipes_open = 0
_SET_PIPE_SIZE = getattr(fcntl, "F_SETPIPE_SZ", None)
_GET_PIPE_SIZE = getattr(fcntl, "F_GETPIPE_SZ", None)
_SPLICE_REFUSED = (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP)  # this kernel or socket cannot splice


def splice_supported() -> bool:
    return hasattr(os, "splice") and _SET_PIPE_SIZE is not None


def can_splice(a, b) -> bool:
    """Both ends are plain blocking sockets (no TlsStream, no timeout) and the platform splices."""
    return splice_supported() and all(
        isinstance(sock, socket.socket) and sock.gettimeout() is None for sock in (a, b))


def open_pipe() -> tuple[int, int, int] | None:
    """A pipe sized for bulk copies: (read fd, write fd, size), or None when none is granted or opens.
    Give it back with ``close_pipe``."""
    global _pipes_open
    with _pipes_lock:
        if _pipes_open >= MAX_PIPES:
            return None
        _pipes_open += 1
    try:
        read_fd, write_fd = os.pipe()
    except OSError:  # out of descriptors: this direction copies in Python instead
        _give_back()
        return None
    assert _SET_PIPE_SIZE is not None  # (splice_supported())
    try:
        size = fcntl.fcntl(write_fd, _SET_PIPE_SIZE, PIPE_SIZE)
    except OSError:  # over the user's allowance of pipe pages: the default size still splices
        size = fcntl.fcntl(write_fd, _GET_PIPE_SIZE) if _GET_PIPE_SIZE is not None else 64 * 1024
    return read_fd, write_fd, size


def close_pipe(pipe: tuple[int, int, int]) -> None:
    os.close(pipe[0])
    os.close(pipe[1])
    _give_back()


def _give_back() -> None:
    global _pipes_open
    with _pipes_lock:
        _pipes_open -= 1


def pipes_open() -> int:
    """How many splice pipes this process holds now."""
    return _pipes_open


class SplicePipe(Pipe):
    """A Pipe whose bulk phase moves bytes with ``os.splice``.

    ``spliced[i]`` turns True once direction i splices (set once, not per chunk).
    """

    def __init__(self, a: socket.socket, b: socket.socket, on_done=None):
        super().__init__(a, b, on_done=on_done)
        self.spliced = [False, False]

    def _copy(self, src: socket.socket, dst: socket.socket, index: int) -> None:
        if not self._small_reads(src, dst, index):
            return
        pipe = open_pipe()
        if pipe is None:
            super()._copy(src, dst, index)
            return
        try:
            if not self._splice(src, dst, index, *pipe):
                super()._copy(src, dst, index)
        finally:
            close_pipe(pipe)

    def _small_reads(self, src: socket.socket, dst: socket.socket, index: int) -> bool:
        """Copy in small reads until one fills up (the stream is bulk): True, or False at its end."""
        size = IDLE_READ
        while True:
            data = src.recv(size)
            if not data:
                self._end_of_stream(dst, index)
                return False
            self._writing_since[index] = time.monotonic()
            dst.sendall(data)
            self._writing_since[index] = 0.0
            self.sent[index] += len(data)
            if len(data) == SMALL_READ:
                return True
            size = IDLE_READ if len(data) < size else SMALL_READ

    def _splice(self, src: socket.socket, dst: socket.socket, index: int,
                read_fd: int, write_fd: int, size: int) -> bool:
        """Splice until the end of the stream (True), or False before any byte moved if this socket cannot."""
        splice = os.splice
        counts = self.sent
        writing = self._writing_since
        clock = time.monotonic
        src_fd, dst_fd = src.fileno(), dst.fileno()
        try:
            n = splice(src_fd, write_fd, size)
        except OSError as exc:
            if exc.errno in _SPLICE_REFUSED:
                return False
            raise
        self.spliced[index] = True
        while n:
            writing[index] = clock()
            while n:  # the pipe is drained before the next read, so a read always finds it empty
                moved = splice(read_fd, dst_fd, n)
                n -= moved
                counts[index] += moved
            writing[index] = 0.0
            n = splice(src_fd, write_fd, size)
        self._end_of_stream(dst, index)  # a splice of 0 from the socket: its FIN (or our own SHUT_RD)
        return True
