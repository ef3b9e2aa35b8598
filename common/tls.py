"""TLS for the relay port and the data channels, over blocking sockets.

``TlsStream`` runs OpenSSL over memory BIOs so that one reader thread and one writer thread
can share a connection safely (an ``SSLSocket`` may not be used by two threads at once), and
so that a half-close works: ``shutdown(SHUT_WR)`` sends close_notify and a TCP FIN while
the read side keeps delivering data, as the relay's Pipe expects of any socket.

How a stream ends is kept apart, as for TCP: the peer's close_notify reads as the end of the
stream (b""); a TCP EOF without it (a cut connection, a peer that died) raises ``TlsTruncated``,
a ``ConnectionResetError``, so a pipe passes it on as a reset and never as a finished transfer.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import socket
import ssl
import threading
import time
from typing import TypeVar, cast

from .errors import ChuantouError

log = logging.getLogger("chuantou")

TLS_RECORD_START = 0x16  # first byte of a TLS ClientHello
WRITE_CHUNK = 128 * 1024  # plaintext per SSL write and socket send (256 KiB: the reader got burstier, ~20 % more CPU)
HANDSHAKE_READ = 16 * 1024  # a handshake flight is a few KiB; a 256 KiB bytes per read costs an mmap
RECV_BUFFER = 256 * 1024  # a bulk stream's reused socket read buffer (128 KiB: a third more CPU per byte read)
QUIET_READ = 2 * 1024  # what a quiet stream waits in: a thread blocked in recv(n) holds its n bytes
BULK_READ = 16 * 1024  # a socket read at least this big keeps a stream bulk
WRITER_WAIT = 0.1  # a half-close waits this long for a writer in another thread, then cuts under it


class TlsError(ChuantouError):
    pass


class TlsTruncated(ConnectionResetError):
    """The TCP connection ended without the peer's close_notify: the stream was cut, not finished."""


def server_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as exc:
        raise TlsError(f"cannot load TLS certificate {cert_file} / key {key_file}: {exc}") from None
    return context


def client_context(ca_file: str | None = None, fingerprint: str | None = None,
                   insecure: bool = False) -> ssl.SSLContext:
    """Verification on by default; a private CA with ``ca_file``; with ``fingerprint`` or
    ``insecure`` the chain is not verified (the pin is checked after the handshake)."""
    context = ssl.create_default_context(cafile=ca_file) if ca_file else ssl.create_default_context()
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if fingerprint or insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def normalize_fingerprint(value: str) -> str:
    digest = value.replace(":", "").strip().lower()
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise TlsError(f"TLS fingerprint {value!r} is not a SHA-256 hex digest (64 hex digits, colons allowed)")
    return digest


def certificate_fingerprint(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


def check_pin(der: bytes | None, fingerprint: str | None) -> None:
    if fingerprint is None:
        return
    if der is None or not hmac.compare_digest(certificate_fingerprint(der), normalize_fingerprint(fingerprint)):
        got = certificate_fingerprint(der) if der else "none"
        raise TlsError(f"the relay's certificate fingerprint is {got}, not the pinned one; "
                       f"refusing to connect (check --tls-fingerprint)")


class PreparedClient:
    """A client-side TLS connection made ahead of its use, its ClientHello (random, X25519 key
    share, and the ticket's binder when resuming) already made: a fresh one, used once, so
    making it early changes nothing in the handshake but when its CPU is spent (in CPython,
    giving a connection a session also copies the session: about 0.3 ms)."""

    def __init__(self, context: ssl.SSLContext, session: ssl.SSLSession | None = None):
        self.made = time.monotonic()
        self._parts: tuple | None = None
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        obj = context.wrap_bio(incoming, outgoing, server_side=False, session=session)
        try:
            obj.do_handshake()
        except ssl.SSLWantReadError:  # the ClientHello is in ``outgoing``; the reply is for later
            pass
        self._parts = (incoming, outgoing, obj)

    def take(self) -> tuple:
        parts, self._parts = self._parts, None
        if parts is None:
            raise ValueError("a prepared TLS connection is used once")
        return parts


_Stream = TypeVar("_Stream", bound="TlsStream")  # handshake() returns the subclass it is called on


class TlsStream:
    """A TLS connection over a blocking TCP socket, with the socket methods the relay uses."""

    def __init__(self, sock: socket.socket, context: ssl.SSLContext | None, server_side: bool,
                 server_hostname: str | None = None, session: ssl.SSLSession | None = None,
                 prepared: "PreparedClient | None" = None):
        """``prepared``: a client connection made ahead (its ClientHello ready), instead of a new
        one from ``context``."""
        self._sock = sock
        if prepared is not None:
            self._incoming, self._outgoing, self._obj = prepared.take()
        else:
            assert context is not None
            self._incoming = ssl.MemoryBIO()
            self._outgoing = ssl.MemoryBIO()
            self._obj = context.wrap_bio(self._incoming, self._outgoing, server_side=server_side,
                                         server_hostname=server_hostname, session=session)
        self._ssl_lock = threading.Lock()  # guards the SSL object and the BIOs
        self._write_lock = threading.Lock()  # orders reads of the outgoing BIO with socket writes
        self._stash = b""  # plaintext taken out of OpenSSL at our half-close, served before anything else
        self._eof = False  # the peer's close_notify has been read
        self._error: BaseException | None = None  # a failure met after good bytes, raised at the next read
        self._recv_buffer: bytearray | None = None

    @classmethod
    def handshake(cls: type[_Stream], sock: socket.socket, context: ssl.SSLContext, server_side: bool,
                  deadline: float, server_hostname: str | None = None,
                  session: ssl.SSLSession | None = None) -> _Stream:
        stream = cls(sock, context, server_side, server_hostname, session)
        stream.run_handshake(deadline)
        return stream

    def run_handshake(self, deadline: float, prefix: bytes = b"") -> None:
        """Run the handshake to its end; ``prefix`` goes out first, in one send with our first flight."""
        sock = self._sock
        while True:
            try:
                self._obj.do_handshake()
                self._flush(prefix)
                return
            except ssl.SSLWantReadError:
                self._flush(prefix)
                prefix = b""
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError("TLS handshake not finished before the deadline") from None
                sock.settimeout(remaining)
                data = sock.recv(HANDSHAKE_READ)
                if not data:
                    raise ConnectionError("peer closed during the TLS handshake") from None
                self._incoming.write(data)

    def peer_certificate(self) -> bytes | None:
        return self._obj.getpeercert(binary_form=True)

    @property
    def resumed(self) -> bool:
        """Whether the handshake resumed an earlier session (TLS 1.3 PSK) instead of a full one."""
        return self._obj.session_reused

    def session(self) -> ssl.SSLSession | None:
        """The session as it stands now (a client's has the server's latest ticket, if any)."""
        with self._ssl_lock:
            return self._obj.session

    # --- reading ----------------------------------------------------------------------------

    def recv_into(self, buffer, nbytes: int = 0) -> int:
        size = nbytes or len(buffer)
        if size == 0:
            return 0
        while True:
            with self._ssl_lock:
                if self._stash:
                    return self._take_stash(buffer, size)
                if self._error is not None:
                    self._raise_error()
                if self._eof:
                    return 0
                n = self._read_records(buffer, size)
                pending = self._outgoing.pending
            if pending:  # e.g. a key update answer produced while reading
                self._flush()
            if n is not None:
                return n
            self._receive()

    def _read_records(self, buffer, size: int) -> int | None:
        """Decrypt into ``buffer`` what OpenSSL can give without the socket: one record per
        SSL_read, so keep reading while records are buffered (fewer calls per MiB), and stop at
        the first want-read. None: nothing yet, read the socket. Called under the SSL lock."""
        view = memoryview(buffer)
        total = 0
        try:
            while total < size:
                # given a buffer, read() returns the count written into it (typeshed says bytes)
                n = cast(int, self._obj.read(size - total, view[total:]))
                if n == 0:
                    self._eof = True
                    break
                total += n
        except ssl.SSLWantReadError:
            if not total:
                return None
        except ssl.SSLZeroReturnError:  # the peer's close_notify: a clean end
            self._eof = True
        except ssl.SSLError as exc:  # a cut or a record that fails: after the good bytes before it
            self._error = (TlsTruncated("TLS stream cut: the connection ended without close_notify")
                           if isinstance(exc, ssl.SSLEOFError) else exc)
            if not total:
                self._raise_error()
        return total

    def _raise_error(self) -> None:
        """A failed stream stays failed: every later read raises too, none reads as an end."""
        assert self._error is not None
        raise self._error

    def _receive(self) -> None:
        """Move what the socket has into the incoming BIO. A bulk stream reads into one reused
        buffer; a quiet one waits in a small read and holds no buffer, so thousands of idle
        sessions do not each keep RECV_BUFFER. A full small read makes the stream bulk again."""
        buffer = self._recv_buffer
        chunk: bytes | memoryview
        if buffer is None:
            chunk = self._sock.recv(QUIET_READ)
            n = len(chunk)
            if n == QUIET_READ:
                self._recv_buffer = bytearray(RECV_BUFFER)
        else:
            n = self._sock.recv_into(buffer)
            chunk = memoryview(buffer)[:n]
            if n < BULK_READ:
                self._recv_buffer = None
        if not n:
            raise TlsTruncated("TLS stream cut: the connection ended without close_notify")
        with self._ssl_lock:
            self._incoming.write(chunk)

    def _take_stash(self, buffer, size: int) -> int:
        n = min(size, len(self._stash))
        memoryview(buffer)[:n] = self._stash[:n]
        self._stash = self._stash[n:]
        return n

    def recv(self, size: int) -> bytes:
        buffer = bytearray(size)
        n = self.recv_into(buffer, size)
        return bytes(buffer[:n])

    # --- writing ----------------------------------------------------------------------------

    def sendall(self, data) -> None:
        view = memoryview(data)
        with self._write_lock:
            while view:
                with self._ssl_lock:
                    n = self._obj.write(view[:WRITE_CHUNK])
                    out = self._outgoing.read()
                view = view[n:]
                self._sock.sendall(out)

    def send(self, data) -> int:
        self.sendall(data)
        return len(data)

    def _flush(self, prefix: bytes = b"") -> None:
        with self._write_lock:
            with self._ssl_lock:
                out = self._outgoing.read()
            if out or prefix:
                self._sock.sendall(prefix + out if prefix else out)

    # --- socket-like rest -------------------------------------------------------------------

    def shutdown(self, how: int) -> None:
        if how == socket.SHUT_WR:
            self._send_close_notify()
        self._sock.shutdown(how)

    def _send_close_notify(self) -> None:
        """Send close_notify without waiting for the peer's, so the read side stays open.

        ``unwrap()`` calls SSL_shutdown twice; the second call reads what the peer sent and, on
        application data, fails the connection for good (OpenSSL 3: "application data after close
        notify"), so the rest of the peer's stream would be lost and read as a clean end. So that
        call finds nothing to read: the plaintext OpenSSL holds is stashed and the ciphertext not
        yet decrypted is taken out of the incoming BIO, then put back once close_notify is queued.
        """
        # Another thread holding the write lock for long is a writer stuck on a peer that does not
        # read (Pipe.abort wakes it with SHUT_WR): cut under it; the peer then sees a truncation.
        if not self._write_lock.acquire(timeout=WRITER_WAIT):
            return
        try:
            with self._ssl_lock:
                self._stash_plaintext()
                undecrypted = self._incoming.read()
                try:
                    self._obj.unwrap()  # queues close_notify
                except ssl.SSLWantReadError:
                    pass  # the peer's close_notify has not come yet: expected, keep reading
                except ssl.SSLError as exc:
                    log.debug("TLS close_notify not sent cleanly: %s", exc)
                self._incoming.write(undecrypted)
                out = self._outgoing.read()
            try:
                self._sock.sendall(out)
            except OSError:
                pass
        finally:
            self._write_lock.release()

    def _stash_plaintext(self) -> None:
        """Move the decrypted bytes OpenSSL still holds (the rest of a record) into the stash."""
        while not self._eof:
            pending = self._obj.pending()
            if not pending:
                return
            try:
                self._stash += self._obj.read(pending)
            except ssl.SSLError:
                return

    def close(self) -> None:
        self._sock.close()

    @property
    def carrier(self) -> socket.socket:
        """The TCP socket under the stream. An abort shuts this down directly: the stream's own
        ``shutdown(SHUT_WR)`` first queues close_notify, which waits for a stuck writer's lock."""
        return self._sock

    def settimeout(self, value) -> None:
        self._sock.settimeout(value)

    def gettimeout(self):
        return self._sock.gettimeout()

    def setsockopt(self, *args) -> None:
        self._sock.setsockopt(*args)

    def fileno(self) -> int:
        return self._sock.fileno()

    def getpeername(self):
        return self._sock.getpeername()

    def getsockname(self):
        return self._sock.getsockname()


def peek_first_byte(sock: socket.socket, deadline: float) -> int:
    """Look at the first byte of a fresh connection without consuming it."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError("no bytes before the deadline")
    sock.settimeout(remaining)
    data = sock.recv(1, socket.MSG_PEEK)
    if not data:
        raise ConnectionError("peer closed before sending anything")
    return data[0]
