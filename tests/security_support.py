"""Helpers for the security tests: a bare control channel, a long transfer to run hostile input
against, services on other loopback addresses, self-signed certificates, and log scanning.

Threads started here are named ``svc-...`` (see helpers.py) and joined before a test ends;
sockets are closed by the fixtures that hand them out.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
import ssl
import struct
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import websocket

from common import auth
from common import protocol as p

from helpers import (
    HOST,
    SERVICE_THREAD_PREFIX,
    TcpService,
    connect,
    recv_exactly,
    relay_url,
    wait_until,
)

MiB = 1024 * 1024
TOKEN = "relay-token-" + "s3cr3t" * 4  # the relay's token in these tests
OTHER_TOKEN = "other-token-" + "x9y8z7" * 4
TRANSFER_SIZE = 64 * MiB
PROMPT = 3.0  # seconds within which a refused connection must be closed


@pytest.fixture
def relay(make_server):
    """A relay that wants TOKEN at registration (a test module imports this fixture to use it)."""
    return make_server(token=TOKEN)


# --- a bare control channel ----------------------------------------------------------------------

class ControlPeer:
    """A raw WebSocket control channel to the relay, driven message by message by the test."""

    def __init__(self, server, url: str | None = None, timeout: float = 5.0, **options):
        self.ws = websocket.create_connection(url or relay_url(server), timeout=timeout, enable_multithread=True,
                                              **options)
        self.challenge = self.recv()
        assert isinstance(self.challenge, p.Challenge), self.challenge

    def send(self, msg) -> None:
        """Send a message object, or raw text / bytes as they are."""
        self.ws.send(msg if isinstance(msg, (str, bytes)) else p.encode(msg),
                     websocket.ABNF.OPCODE_BINARY if isinstance(msg, bytes) else websocket.ABNF.OPCODE_TEXT)

    def recv(self, timeout: float = 5.0):
        self.ws.settimeout(timeout)
        opcode, data = self.ws.recv_data()
        assert opcode == websocket.ABNF.OPCODE_TEXT, f"expected a text frame, got opcode {opcode} {data[:60]!r}"
        return p.decode(data, sender="relay")

    def recv_until(self, kind, timeout: float = 5.0):
        """The next message of type ``kind``, skipping others (heartbeats, forwarded requests)."""
        deadline = time.monotonic() + timeout
        while True:
            msg = self.recv(max(0.01, deadline - time.monotonic()))
            if isinstance(msg, kind):
                return msg

    def register(self, client_id: str, token: str | None = None, proof: str | None = None) -> p.RegisterResponse:
        if token is not None:
            proof = auth.register_proof(token, self.challenge.nonce, client_id)
        self.send(p.Register(clientId=client_id, protocolVersion=p.PROTOCOL_VERSION, auth=proof))
        return self.recv_until(p.RegisterResponse)

    def closed_by_relay(self, timeout: float) -> bool:
        """True if the relay ends this channel (close frame or EOF) within ``timeout``, skipping other messages."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self.ws.settimeout(remaining)
            try:
                opcode, _ = self.ws.recv_data()
            except websocket.WebSocketTimeoutException:
                return False
            except (websocket.WebSocketConnectionClosedException, OSError):
                return True
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                return True

    def close(self) -> None:
        try:
            self.ws.close(timeout=1)
        except Exception:  # the relay already closed it
            pass
        self.ws.shutdown()


def registered_peer(peers, server, client_id: str, token: str | None = TOKEN) -> ControlPeer:
    """A ControlPeer from conftest's ``peers`` factory, registered as ``client_id`` (token None: an open relay)."""
    peer = peers(server)
    reply = peer.register(client_id, token)
    assert reply.success, reply
    return peer


# --- a long transfer that hostile input must not disturb -------------------------------------------

def sha_sink(conn: socket.socket, service: TcpService) -> None:
    """Hash everything up to EOF; answer with the sha256 digest and the byte count (8 bytes)."""
    digest = hashlib.sha256()
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    total = 0
    while True:
        n = conn.recv_into(buf)
        if not n:
            break
        digest.update(view[:n])
        total += n
    conn.sendall(digest.digest() + struct.pack("!Q", total))


_payload_cache: dict[int, tuple[bytes, bytes]] = {}


def payload_of(size: int) -> tuple[bytes, bytes]:
    """(random bytes, their sha256 digest), made once per size per test run."""
    if size not in _payload_cache:
        data = os.urandom(size)
        _payload_cache[size] = (data, hashlib.sha256(data).digest())
    return _payload_cache[size]


@dataclass
class Transfer:
    session: object  # the relay's Session carrying the upload
    size: int

    @property
    def relayed(self) -> int:
        return self.session.bytes_a_to_b


@contextlib.contextmanager
def long_transfer(server, make_client, services, size: int = TRANSFER_SIZE, token: str | None = TOKEN,
                  pace: float = 0.02):
    """Upload ``size`` random bytes through a proxy between two clients of their own ("xfer-a" ->
    "xfer-b" -> a hashing sink) while the body of the ``with`` runs.

    The first half goes out in 1 MiB chunks paced ``pace`` seconds apart (so bytes are moving
    while the hostile input arrives), the second half only after the body is done; then the
    sink's sha256 must equal the payload's and the relay must have counted every byte.
    """
    data, digest = payload_of(size)
    xa = make_client(server, "xfer-a", token=token)
    make_client(server, "xfer-b", token=token)
    sink = services(TcpService(sha_sink, "sink"))
    proxy = xa.create_proxy(0, "xfer-b", sink.port, protocol="tcp")
    user = connect(proxy.local_port, timeout=60)
    body_done = threading.Event()
    errors: list[BaseException] = []
    view = memoryview(data)

    def send() -> None:
        try:
            half = size // 2
            for start in range(0, half, MiB):
                user.sendall(view[start:min(start + MiB, half)])
                body_done.wait(pace)  # pacing while the hostile input runs, not synchronisation
            body_done.wait(60)
            for start in range(half, size, MiB):
                user.sendall(view[start:start + MiB])
            user.shutdown(socket.SHUT_WR)
        except OSError as exc:
            errors.append(exc)

    sender = threading.Thread(target=send, name=f"{SERVICE_THREAD_PREFIX}xfer-sender", daemon=True)
    sender.start()
    try:
        (session,) = wait_until(lambda: [s for s in server.sessions.all() if s.client_a == "xfer-a" and s.pipe],
                                message="the transfer's session is relaying")
        wait_until(lambda: session.bytes_a_to_b > 0, message="the transfer's first bytes passed the relay")
        try:
            yield Transfer(session, size)
        finally:
            body_done.set()
            sender.join(60)
        assert not errors, f"the transfer's sender failed: {errors[0]!r}"
        answer = recv_exactly(user, 40)
        assert answer[:32] == digest, "the transfer arrived corrupted (sha256 differs)"
        assert struct.unpack("!Q", answer[32:])[0] == size
        # sessions are sealed: the relay counts the ciphertext, every byte plus the handshake
        # and 22 bytes per TLS record (at most 16 KiB each; smaller when reads come in small)
        wait_until(lambda: size < session.bytes_a_to_b <= size + size // 50 + 16384,
                   message="the relay counted every byte")
    finally:
        body_done.set()
        user.close()
        sender.join(10)
        proxy.close()


# --- services on other loopback addresses ----------------------------------------------------------

class HostTcpService(TcpService):
    """A TcpService listening on ``host`` (another loopback address) instead of 127.0.0.1."""

    def __init__(self, handler, host: str, name: str = "tcp"):
        super().__init__(handler, name)
        self.host = host

    def start(self) -> "HostTcpService":
        self._listener = socket.create_server((self.host, 0), backlog=256)
        self.port = self._listener.getsockname()[1]
        self._threads.spawn("accept", self._accept_loop)
        return self


def closed_without_reply(sock: socket.socket, timeout: float) -> tuple[bool, bytes]:
    """Read until the peer closes (EOF or reset) within ``timeout``; return (closed, what was read)."""
    deadline = time.monotonic() + timeout
    got = b""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False, got
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            return True, got
        except socket.timeout:
            return False, got
        if not chunk:
            return True, got
        got += chunk


def udp_socket(host: str = HOST) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((host, 0))
    return sock


# --- TLS -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Cert:
    cert: str
    key: str
    fingerprint: str  # SHA-256 of the DER certificate, hex


def make_self_signed(folder: Path, name: str, san: str = "DNS:localhost,IP:127.0.0.1") -> Cert:
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=localhost", "-addext", f"subjectAltName={san}"],
        check=True, capture_output=True, timeout=60,
    )
    der = ssl.PEM_cert_to_DER_cert(cert.read_text())
    return Cert(str(cert), str(key), hashlib.sha256(der).hexdigest())


def wss_url(server, host: str = HOST) -> str:
    return f"wss://{host}:{server.port}"


# --- logs ----------------------------------------------------------------------------------------

_formatter = logging.Formatter("%(name)s %(threadName)s %(levelname)s %(message)s")


def log_lines(caplog) -> list[str]:
    """Every captured record, formatted with its traceback, one string each."""
    return [_formatter.format(record) for record in caplog.records]


def logged(caplog, text: str, thread_prefix: str | tuple = "") -> bool:
    return any(text in r.getMessage() for r in caplog.records if r.threadName.startswith(thread_prefix))


def thread_failures(caplog) -> list[str]:
    """Records of a library thread that died of an exception ('thread ... failed')."""
    return [_formatter.format(r) for r in caplog.records
            if r.name.startswith("chuantou") and (r.exc_info or " failed" in r.getMessage() and
                                                  r.getMessage().startswith("thread "))]

