"""Fuzzing within a fixed time budget: thousands of random and mutated control messages on
several WebSocket channels, mutated data-channel headers on the relay port, and junk UDP
registrations. Afterwards a running session is intact, a new client works end to end, and no
relay thread died of an exception.

The seed is printed in every failure message; set CHUANTOU_FUZZ_SEED to replay a run.
"""

from __future__ import annotations

import copy
import json
import os
import random
import socket
import threading
import time

import pytest
import websocket

from common import auth
from common import protocol as p
from common.frames import HEADER_SIZE, JoinRequest, JoinStatus, pack_data_header, pack_udp_register

from helpers import HOST, SERVICE_THREAD_PREFIX, TcpService, UdpEchoService, connect, echo_handler, recv_exactly
from helpers import relay_url, udp_roundtrip
from security_support import TOKEN, echo_roundtrip, thread_failures, udp_socket

CONTROL_BUDGET = 5.0  # seconds of control-channel fuzzing
HEADER_BUDGET = 2.5  # seconds of data-channel header fuzzing
UDP_BUDGET = 0.5
FUZZ_CHANNELS = 4
MIN_FRAMES = 2000  # "a few thousand" even on a slow machine
MIN_HEADERS = 300


def valid_messages(target_session) -> list[dict]:
    """One plausible frame of every message type, as plain JSON objects to mutate."""
    msgs = [
        p.Register(clientId="fz-new", protocolVersion=p.PROTOCOL_VERSION, auth="00" * 32),
        p.GetClientList(requestId="q1"),
        p.ConnectRequest(toClientId="fz-b", remotePort=22, requestId="r1", protocol="tcp", localPort=2222),
        p.ConnectRequest(toClientId="fz-b", remotePort=53, protocol="udp", remoteHost="127.0.0.2"),
        p.ConnectRequest(toClientId="nobody", remotePort=80),
        p.AcceptSession(sessionId=target_session.id),
        p.RejectSession(sessionId=target_session.id, reason="no"),
        p.Heartbeat(timestamp=time.time()),
        p.SessionClosed(sessionId=target_session.id, reason="fuzz"),
        p.Error(message="fuzz"),
        p.Challenge(nonce="00"),
        p.RegisterResponse(success=True, assignedId="fz"),
        p.ClientList(clients=[p.ClientInfo(id="fz")]),
        p.CreateSession(sessionId=target_session.id, peerClientId="fz-b", secret="00" * 16,
                        service=p.Service(port=22, protocol="tcp"),
                        relayAddr=p.RelayAddr(host=HOST, port=1, protocol="tcp")),
    ]
    return [json.loads(p.encode(m)) for m in msgs] + [{"type": "unregister", "payload": {}}]


class Mutator:
    WEIRD_VALUES = [None, True, False, 0, -1, 1.5, 2 ** 31, 2 ** 64, int("9" * 300), float("inf"), "", "x",
                    "é\u202e\U0001f600", "\ud800", "A" * 65, "0" * 32, [], {}, [1, "2", None], {"a": {"b": {}}},
                    "toClientId", "../../etc/passwd", "%s%n%x", "<script>"]

    def __init__(self, rng: random.Random, templates: list[dict]):
        self.rng = rng
        self.templates = templates

    def frame(self):
        """A text or binary frame: random, or a mutated valid message."""
        rng = self.rng
        roll = rng.random()
        if roll < 0.05:
            return os.urandom(rng.randint(0, 2000))  # binary junk
        if roll < 0.10:
            return "".join(chr(rng.randint(1, 0xD7FF)) for _ in range(rng.randint(0, 300)))
        if roll < 0.13:
            depth = rng.choice([10, 500, 990, 1100, 20000])
            opener, closer = rng.choice([("[", "]"), ('{"a":', "}")])
            inner = opener * depth + "1" + closer * depth
            return rng.choice([inner, '{"type":"heartbeat","payload":{"timestamp":' + inner + "}}"])
        if roll < 0.16:
            text = json.dumps(rng.choice(self.templates))
            return text[:rng.randint(0, len(text))]  # truncated JSON
        if roll < 0.18:
            return json.dumps(rng.choice([[], 1, "s", None, 1e308, {"type": None}]))
        msg = copy.deepcopy(rng.choice(self.templates))
        for _ in range(rng.randint(1, 3)):
            self.mutate(msg)
        return json.dumps(msg)  # inf becomes Infinity: not JSON, but Python's parser takes it

    def weird(self):
        return copy.deepcopy(self.rng.choice(self.WEIRD_VALUES))

    def mutate(self, msg: dict) -> None:
        rng = self.rng
        payload = msg.get("payload")
        choice = rng.randrange(9)
        if choice == 0 and isinstance(payload, dict) and payload:
            del payload[rng.choice(list(payload))]  # a dropped field
        elif choice == 1 and isinstance(payload, dict) and payload:
            payload[rng.choice(list(payload))] = self.weird()  # a wrong type
        elif choice == 2 and isinstance(payload, dict):
            key = rng.choice(list(payload) or ["x"])
            payload[key] = rng.choice("aé0\x00") * rng.choice([100, 5000, 40000, 70000])  # a huge string
        elif choice == 3:
            msg["type"] = rng.choice([self.weird(), "teleport", "REGISTER", "register ", "heartbeat\x00"])
        elif choice == 4:
            msg["payload"] = self.weird()
        elif choice == 5:
            msg.pop(rng.choice(["type", "payload"]), None)
        elif choice == 6 and isinstance(payload, dict):
            payload[rng.choice(["extra", "fromClientId", "secret", "__proto__"])] = self.weird()
        elif choice == 7 and isinstance(payload, dict):
            nested = {}
            for _ in range(rng.choice([5, 50, 500])):
                nested = {"n": nested}
            payload[rng.choice(list(payload) or ["x"])] = nested  # deep nesting inside a valid message
        else:
            msg[rng.choice(["type", "payload", "extra"])] = copy.deepcopy(rng.choice(self.templates))


class FuzzChannel:
    """A raw control channel that a reader thread drains, so the relay's answers never pile up."""

    def __init__(self, server, index: int, register_as: str | None):
        self.ws = websocket.create_connection(relay_url(server), timeout=5, enable_multithread=True)
        challenge = p.decode(self.ws.recv(), sender="relay")
        if register_as:
            proof = auth.register_proof(TOKEN, challenge.nonce, register_as)
            self.ws.send(p.encode(p.Register(clientId=register_as, protocolVersion=p.PROTOCOL_VERSION, auth=proof)))
        self.ws.settimeout(None)
        self.received = 0
        self.reader = threading.Thread(target=self._drain, name=f"{SERVICE_THREAD_PREFIX}fuzz-reader-{index}",
                                       daemon=True)
        self.reader.start()

    def _drain(self) -> None:
        try:
            while True:
                opcode, _ = self.ws.recv_data()
                if opcode == websocket.ABNF.OPCODE_CLOSE:
                    return
                self.received += 1
        except (websocket.WebSocketException, OSError):
            return

    @property
    def alive(self) -> bool:
        return self.ws.connected and self.reader.is_alive()

    def send(self, frame) -> bool:
        try:
            if isinstance(frame, bytes):
                self.ws.send_binary(frame)
            else:
                self.ws.send(frame)
            return True
        except (websocket.WebSocketException, OSError):
            return False

    def send_raw_frame(self, rng: random.Random) -> None:
        """A frame-level violation: reserved bits, unknown opcodes, bad UTF-8, oversized control frames."""
        fin_rsv_opcode, payload = rng.choice([
            (0x80 | 0x40 | 0x1, b"rsv1 set"),
            (0x80 | 0x3, b"opcode 3"),
            (0x80 | 0xB, b"control opcode 11"),
            (0x80 | 0x1, b"\xff\xfe\xfd"),  # text that is not UTF-8
            (0x80 | 0x9, b"p" * 200),  # a ping longer than 125 bytes
            (0x80 | 0x8, b"\x03"),  # a close frame with half a status code
            (0x00 | 0x1, b'{"type":'),  # never finished
            (0x80 | 0x0, b"orphan continuation"),
        ])
        try:
            self.ws.sock.sendall(raw_frame(fin_rsv_opcode, payload, masked=rng.random() < 0.9))
        except OSError:
            pass

    def close(self) -> None:
        self.ws.abort()
        self.ws.shutdown()
        self.reader.join(5)


def raw_frame(first_byte: int, payload: bytes, masked: bool = True) -> bytes:
    """One WebSocket frame built by hand (websocket-client refuses to build invalid ones)."""
    size = len(payload)
    if size < 126:
        head = bytes([first_byte, (0x80 if masked else 0) | size])
    else:
        head = bytes([first_byte, (0x80 if masked else 0) | 126]) + size.to_bytes(2, "big")
    if not masked:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def header_mutations(rng: random.Random, session) -> bytes:
    valid = pack_data_header(JoinRequest("A", session.id, session.secret_a))
    roll = rng.randrange(8)
    if roll == 0:
        return os.urandom(rng.randint(1, 100))
    if roll == 1:
        return valid[:rng.randint(0, HEADER_SIZE - 1)]  # truncated
    if roll == 2:
        data = bytearray(valid)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(2, HEADER_SIZE)] ^= 1 << rng.randrange(8)  # flipped bits in side, id or secret
        return bytes(data)
    if roll == 3:
        return valid[:2] + rng.choice([b"C", b"\x00", b"a", b"AB"]) + valid[3:]  # a bad side
    if roll == 4:
        return valid[:2] + b"B" + valid[3:19] + os.urandom(16)  # a wrong secret for B
    if roll == 5:
        return pack_udp_register(JoinRequest("A", session.id, session.secret_a))  # the UDP magic over TCP
    if roll == 6:
        return b"\xfd\x01" + os.urandom(33) + os.urandom(rng.randint(0, 5000))  # random + trailing data
    return valid[:2] + os.urandom(rng.randint(0, 80))


@pytest.mark.timeout(60)
def test_fuzzing_the_control_channel_data_headers_and_udp_leaves_the_relay_serving(make_server, make_client,
                                                                                   services, caplog):
    seed = int(os.environ.get("CHUANTOU_FUZZ_SEED") or random.randrange(1 << 32))
    rng = random.Random(seed)
    why = f"(fuzz seed {seed})"
    relay = make_server(token=TOKEN, handshake_timeout=2.0, session_join_timeout=1.0)
    a = make_client(relay, "fz-a", token=TOKEN)
    make_client(relay, "fz-b", token=TOKEN, allow="none")  # the fuzz's connect_requests reach nothing real
    make_client(relay, "fz-c", token=TOKEN)
    echo = services(TcpService(echo_handler, "echo"))
    udp_echo = services(UdpEchoService())
    proxy = a.create_proxy(0, "fz-c", echo.port, protocol="tcp")
    udp_proxy = a.create_proxy(0, "fz-c", udp_echo.port, protocol="udp")
    user = connect(proxy.local_port)
    user.sendall(b"before")
    assert recv_exactly(user, 6) == b"before"
    (session,) = [s for s in relay.sessions.all() if s.pipe is not None]
    templates = valid_messages(session)
    mutator = Mutator(rng, templates)

    # --- the control channel -------------------------------------------------------------------
    channels: list[FuzzChannel] = []
    frames = reopened = 0
    try:
        def channel(i: int) -> FuzzChannel:
            register_as = f"fz-m{i}" if i % 2 == 0 else None  # half registered, half not
            return FuzzChannel(relay, i, register_as)

        channels = [channel(i) for i in range(FUZZ_CHANNELS)]
        deadline = time.monotonic() + CONTROL_BUDGET
        while time.monotonic() < deadline:
            i = frames % FUZZ_CHANNELS
            if not channels[i].alive or rng.random() < 0.002:
                channels[i].close()
                channels[i] = channel(i)
                reopened += 1
            if rng.random() < 0.003:
                channels[i].send_raw_frame(rng)
            elif channels[i].send(mutator.frame()):
                frames += 1
    finally:
        for ch in channels:
            ch.close()
    assert frames >= MIN_FRAMES, f"only {frames} frames in {CONTROL_BUDGET:g} s {why}"

    # --- data-channel headers on the relay port ------------------------------------------------
    headers = 0
    deadline = time.monotonic() + HEADER_BUDGET
    while time.monotonic() < deadline:
        data = header_mutations(rng, session)
        with socket.create_connection((HOST, relay.port), timeout=5) as sock:
            try:
                sock.sendall(data)
                sock.shutdown(socket.SHUT_WR)
                status = sock.recv(1)
            except OSError:  # reset, or already closed by the relay
                status = b""
        assert status != bytes([JoinStatus.JOINED]), f"a mutated header {data.hex()} joined a session {why}"
        headers += 1
    assert headers >= MIN_HEADERS, f"only {headers} headers in {HEADER_BUDGET:g} s {why}"

    # --- UDP registrations and junk ------------------------------------------------------------
    with udp_socket() as junk:
        deadline = time.monotonic() + UDP_BUDGET
        while time.monotonic() < deadline:
            data = header_mutations(rng, session)
            data = b"\xfd\x02" + data[2:] if rng.random() < 0.5 else data
            junk.sendto(data, (HOST, relay.port))

    # --- afterwards ------------------------------------------------------------------------------
    user.sendall(b"after the storm")
    assert recv_exactly(user, 15) == b"after the storm", why
    user.close()
    late = make_client(relay, "late", token=TOKEN)
    late_proxy = late.create_proxy(0, "fz-c", echo.port, protocol="tcp")
    assert echo_roundtrip(late_proxy.local_port) == b"hello through the tunnel", why
    with udp_socket() as udp_user:
        assert udp_roundtrip(udp_user, udp_proxy.local_port, b"udp after") == b"udp after", why
    alive = {t.name for t in threading.enumerate()}
    for name in ("accept", "udp", "housekeeper", "traffic"):
        assert f"chuantou-server-{name}" in alive, f"the relay's {name} thread died {why}"
    assert not thread_failures(caplog), f"relay threads failed {why}: {thread_failures(caplog)[:3]}"
    for p_ in (proxy, udp_proxy, late_proxy):
        p_.close()
    print(f"fuzz: {frames} control frames ({reopened} channels reopened), {headers} data headers, seed {seed}")
