"""The wire format as plain data: control messages (common.protocol) and the binary framing of
the data path (common.frames). No sockets."""

from __future__ import annotations

import dataclasses
import json

import pytest

from common import frames
from common import protocol as p
from common.frames import FrameError, JoinRequest, JoinStatus

SESSION_ID = "0123456789abcdef" * 2
SECRET = "fedcba9876543210" * 2

# The wire: type name -> field names, exactly as the design spells them. Changing one of these
# breaks every deployed peer, so it has to be a deliberate change to this table too. A name
# both sides send with different shapes appears once per sender ("connect_request").
WIRE = {
    "challenge": ["nonce", "authRequired", "protocolVersion"],
    "register": ["clientId", "protocolVersion", "auth", "takeover", "publicKey", "followsRedirect",
                 "features"],
    "register_redirect": ["url", "node", "reason"],
    "register_response": ["success", "assignedId", "existingKicked", "error", "protocolVersion", "code",
                          "udpPort", "probePort", "pool", "features"],
    "get_client_list": ["requestId"],
    "client_list": ["clients", "requestId"],
    "connect_request": ["toClientId", "remotePort", "remoteHost", "requestId", "protocol", "localPort", "warm"],
    "connect_request (relay)": ["fromClientId", "sessionId", "secret", "relayAddr", "remotePort", "remoteHost",
                                "protocol", "toClientId", "localPort", "requestId", "peerPublicKey", "warm"],
    "create_session": ["sessionId", "peerClientId", "secret", "service", "relayAddr", "requestId", "peerPublicKey"],
    "accept_session": ["sessionId"],
    "reject_session": ["sessionId", "reason"],
    "heartbeat": ["timestamp"],
    "unregister": [],
    "session_closed": ["sessionId", "reason"],
    "session_keys": ["sessionId", "ephemeral", "publicKey", "signature"],
    "error": ["message", "code", "requestId"],
    "path_candidates": ["sessionId", "candidates", "path"],
    "peer_candidates": ["sessionId", "candidates", "punchKey"],
    "path_report": ["sessionId", "path", "directBytesSent", "directBytesReceived"],
    "path_sync": ["sessionId", "step"],
}
NESTED = {
    p.ClientInfo: ["id", "publicKey"],
    p.RelayAddr: ["host", "port", "protocol"],
    p.Service: ["port", "protocol"],
}


def field_names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def sample_messages() -> list:
    relay = p.RelayAddr(host="relay.example", port=8200, protocol="tcp")
    return [
        p.Challenge(nonce="ab" * 32, authRequired=True),
        p.Register(clientId="laptop-1", protocolVersion=p.PROTOCOL_VERSION),
        p.Register(clientId="laptop-1", protocolVersion=p.PROTOCOL_VERSION, auth="cd" * 32),
        p.RegisterResponse(success=True, assignedId="laptop-1", existingKicked=True, error=None),
        p.RegisterResponse(success=False, error="protocol version 9 is not supported"),
        p.Register(clientId="laptop-1", protocolVersion=p.PROTOCOL_VERSION, followsRedirect=True),
        p.RegisterRedirect(url="ws://relay2.example.com:8200", node="n2", reason="less loaded"),
        p.RegisterRedirect(url="wss://[2001:db8::2]:443/"),
        p.GetClientList(requestId="r1"),
        p.ClientList(clients=[p.ClientInfo(id="A"), p.ClientInfo(id="B")], requestId="r1"),
        p.ConnectRequest(toClientId="B", remotePort=3000, remoteHost="10.0.0.7", requestId="r2", protocol="udp",
                         localPort=8000),
        p.ConnectOffer(fromClientId="A", sessionId=SESSION_ID, secret=SECRET, remotePort=3000,
                       remoteHost="10.0.0.7", protocol="udp", toClientId="B", localPort=8000,
                       relayAddr=p.RelayAddr(host="127.0.0.1", port=8200, protocol="udp")),
        p.CreateSession(sessionId=SESSION_ID, peerClientId="B", secret=SECRET,
                        service=p.Service(port=3000, protocol="tcp"), relayAddr=relay, requestId="r2"),
        p.AcceptSession(sessionId=SESSION_ID),
        p.RejectSession(sessionId=SESSION_ID, reason="cannot connect to 127.0.0.1:3000"),
        p.Heartbeat(timestamp=1700000000.25),
        p.Unregister(),
        p.SessionClosed(sessionId=SESSION_ID, reason="ended"),
        p.SessionKeys(sessionId=SESSION_ID, ephemeral="QUFB" * 11, publicKey="QUFB" * 11, signature="QkJC" * 22),
        p.Error(message="client 'B' is not online", code="client_offline", requestId="r2"),
        p.PathCandidates(sessionId=SESSION_ID, candidates=["10.0.0.2:40000", "[2001:db8::1]:40000"]),
        p.PeerCandidates(sessionId=SESSION_ID, candidates=["198.51.100.7:5000"], punchKey="ab" * 16),
        p.PathReport(sessionId=SESSION_ID, path="direct", directBytesSent=p.MAX_REPORTED_BYTES, directBytesReceived=0),
        p.PathSync(sessionId=SESSION_ID, step="sync"),
    ]


# --- names -------------------------------------------------------------------------------------

def wire_key(cls) -> str:
    return f"{cls.TYPE} (relay)" if cls is p.ConnectOffer else cls.TYPE


def test_every_wire_type_name_and_field_name_is_pinned():
    classes = [cls for shapes in p.message_types().values() for cls in shapes]
    assert sorted(wire_key(cls) for cls in classes) == sorted(WIRE)
    for cls in classes:
        assert field_names(cls) == WIRE[wire_key(cls)], cls.__name__
    for cls, fields in NESTED.items():
        assert field_names(cls) == fields, cls.__name__


def test_samples_cover_every_message_type():
    assert {wire_key(type(m)) for m in sample_messages()} == set(WIRE)


def test_one_wire_name_decodes_by_its_sender_and_a_side_cannot_send_the_other_s_messages():
    offer = next(m for m in sample_messages() if isinstance(m, p.ConnectOffer))
    text = p.encode(offer)
    assert p.decode(text, sender="relay") == offer
    assert isinstance(p.decode(text, sender="client"), p.ConnectRequest)  # the session fields are not A's to set
    with pytest.raises(p.ProtocolError, match="'challenge' is not a message a client sends"):
        p.decode(p.encode(p.Challenge(nonce="ab")), sender="client")
    with pytest.raises(p.ProtocolError, match="'register' is not a message a relay sends"):
        p.decode(p.encode(p.Register(clientId="A", protocolVersion=1)), sender="relay")


def test_encoded_frame_is_type_and_camelcase_payload():
    text = p.encode(p.Register(clientId="silent", protocolVersion=1))
    assert json.loads(text) == {"type": "register", "payload": {"clientId": "silent", "protocolVersion": 1}}
    frame = json.loads(p.encode(p.ConnectRequest(toClientId="B", remotePort=22, requestId="r7")))
    assert frame == {"type": "connect_request",
                     "payload": {"toClientId": "B", "remotePort": 22, "requestId": "r7", "protocol": "tcp"}}


def test_register_carries_the_protocol_version():
    assert isinstance(p.PROTOCOL_VERSION, int) and p.PROTOCOL_VERSION >= 1
    msg = p.decode('{"type":"register","payload":{"clientId":"silent","protocolVersion":1}}')
    assert msg == p.Register(clientId="silent", protocolVersion=1)


# --- round trips -------------------------------------------------------------------------------

@pytest.mark.parametrize("msg", sample_messages(), ids=lambda m: type(m).TYPE)
def test_round_trip(msg):
    text = p.encode(msg)
    sender = "relay" if msg.SENT_BY == "relay" else "client"
    assert p.decode(text, sender) == msg
    assert p.decode(text.encode("utf-8"), sender) == msg  # bytes frames decode the same


def test_optional_fields_may_be_absent_or_null():
    assert p.decode('{"type":"get_client_list","payload":{}}') == p.GetClientList()
    assert p.decode('{"type":"get_client_list","payload":{"requestId":null}}') == p.GetClientList()
    assert p.decode('{"type":"unregister"}') == p.Unregister()
    assert p.decode('{"type":"unregister","payload":null}') == p.Unregister()


def test_integral_timestamp_becomes_float():
    msg = p.decode('{"type":"heartbeat","payload":{"timestamp":12}}')
    assert msg.timestamp == 12.0 and isinstance(msg.timestamp, float)


# --- rejection ---------------------------------------------------------------------------------

def frame(type_name, **payload) -> str:
    return json.dumps({"type": type_name, "payload": payload})


BAD_FRAMES = {
    "truncated json": '{"type": "register", "payload": {"clientId": "A"',
    "not json": "hello",
    "empty": "",
    "json array": '[{"type": "register"}]',
    "json string": '"register"',
    "no type": '{"payload": {}}',
    "type not a string": '{"type": 7, "payload": {}}',
    "unknown type": frame("open_sesame", clientId="A"),
    "payload not an object": '{"type": "register", "payload": [1, 2]}',
    "missing field": frame("register", clientId="A"),
    "missing nested field": frame("create_session", sessionId=SESSION_ID, peerClientId="B", secret=SECRET,
                                  service={"port": 1}, relayAddr={"host": "h", "port": 1, "protocol": "tcp"}),
    "int as string": frame("register", clientId="A", protocolVersion="1"),
    "bool as int": frame("register", clientId="A", protocolVersion=True),
    "int as bool": frame("register_response", success=1),
    "number as string": frame("register", clientId=5, protocolVersion=1),
    "list expected": frame("client_list", clients={"id": "A"}),
    "list item wrong": frame("client_list", clients=["A"]),
    "nested not an object": frame("client_list", clients=["A"]),
    "timestamp as string": frame("heartbeat", timestamp="now"),
    "invalid client id": frame("register", clientId="bad id!", protocolVersion=1),
    "redirect to http": frame("register_redirect", url="http://relay2:8200"),
    "redirect with credentials": frame("register_redirect", url="ws://user:pw@relay2:8200"),
    "redirect with a query": frame("register_redirect", url="ws://relay2:8200/?token=x"),
    "redirect without host": frame("register_redirect", url="ws://:8200"),
    "redirect to a bad node name": frame("register_redirect", url="ws://relay2:8200", node="n 2"),
    "port zero": frame("connect_request", toClientId="B", remotePort=0),
    "port too high": frame("connect_request", toClientId="B", remotePort=70000),
    "unknown protocol": frame("connect_request", toClientId="B", remotePort=80, protocol="sctp"),
    "bad remote host": frame("connect_request", toClientId="B", remotePort=80, remoteHost="a host; rm -rf"),
    "deep nesting": "[" * 100000 + "]" * 100000,
}


@pytest.mark.parametrize("text", BAD_FRAMES.values(), ids=BAD_FRAMES.keys())
def test_bad_frame_raises_protocol_error(text):
    with pytest.raises(p.ProtocolError):
        p.decode(text)


def test_protocol_error_names_the_problem():
    with pytest.raises(p.ProtocolError, match="missing field 'protocolVersion'"):
        p.decode(frame("register", clientId="A"))
    with pytest.raises(p.ProtocolError, match="unknown message type 'open_sesame'"):
        p.decode(frame("open_sesame"))
    with pytest.raises(p.ProtocolError, match="register.protocolVersion must be an integer"):
        p.decode(frame("register", clientId="A", protocolVersion="1"))
    with pytest.raises(p.ProtocolError, match="not valid JSON"):
        p.decode("{")


def test_oversized_frame_is_refused_as_text_and_as_bytes():
    big_id = "a" * (p.MAX_MESSAGE_BYTES + 1)
    text = frame("register", clientId=big_id, protocolVersion=1)
    with pytest.raises(p.ProtocolError, match="exceeds"):
        p.decode(text)
    with pytest.raises(p.ProtocolError, match="exceeds"):
        p.decode(text.encode())
    # just under the cap still parses (the cap is a size limit, not a type check)
    padding = p.MAX_MESSAGE_BYTES - len(frame("error", message="", code="x"))
    assert p.decode(frame("error", message="m" * padding, code="x")).message == "m" * padding


def test_bytes_that_are_not_utf8_are_refused():
    with pytest.raises(p.ProtocolError, match="UTF-8"):
        p.decode(b'{"type":"register","payload":{"clientId":"\xff"}}')


def test_protocol_error_is_a_value_error():
    # receivers catch one exception type for everything that is wrong with a frame
    assert issubclass(p.ProtocolError, ValueError)


# --- data-path framing ---------------------------------------------------------------------------

def test_data_header_layout_and_round_trip():
    join = JoinRequest("A", SESSION_ID, SECRET)
    data = frames.pack_data_header(join)
    assert len(data) == frames.HEADER_SIZE == 35
    assert data[:2] == b"\xfd\x01" and data[2:3] == b"A"
    assert data[3:19] == bytes.fromhex(SESSION_ID) and data[19:] == bytes.fromhex(SECRET)
    assert frames.unpack_data_header(data) == join
    join_b = JoinRequest("B", SESSION_ID, SECRET)
    assert frames.unpack_data_header(frames.pack_data_header(join_b)) == join_b


def test_udp_register_and_ack_round_trip():
    join = JoinRequest("B", SESSION_ID, SECRET)
    challenge = bytes(range(16))
    data = frames.pack_udp_register(join, challenge)
    assert data[:2] == b"\xfd\x02" and len(data) == frames.UDP_REGISTER_SIZE == 51
    assert bytes.fromhex(SECRET) not in data  # the secret never crosses the wire
    assert frames.is_udp_register(data)
    assert not frames.is_udp_register(frames.pack_data_header(join))
    register = frames.unpack_udp_register(data)
    assert (register.side, register.session_id, register.challenge) == ("B", SESSION_ID, challenge)
    assert frames.udp_proof_matches(SECRET, register)
    assert not frames.udp_proof_matches("00" * 16, register)
    assert frames.unpack_udp_challenge(frames.pack_udp_challenge(SESSION_ID, challenge)) == (SESSION_ID, challenge)
    assert frames.UDP_CHALLENGE_SIZE < frames.UDP_REGISTER_SIZE  # no amplification
    for status in JoinStatus:
        ack = frames.pack_udp_ack(SESSION_ID, status)
        assert ack[:2] == b"\xfd\x03" and len(ack) == frames.UDP_ACK_SIZE
        assert frames.unpack_udp_ack(ack) == (SESSION_ID, status)


def test_protocol_version_is_pinned():
    assert p.PROTOCOL_VERSION == 2  # 2: challenge-proved UDP registrations


def test_join_status_values_are_pinned():
    assert {s.name: s.value for s in JoinStatus} == {
        "JOINED": 0, "UNKNOWN_SESSION": 1, "BAD_SECRET": 2, "ALREADY_JOINED": 3, "WRONG_PROTOCOL": 4, "BUSY": 5,
    }
    assert all(s.describe() for s in JoinStatus)


@pytest.mark.parametrize("join", [
    JoinRequest("C", SESSION_ID, SECRET),
    JoinRequest("", SESSION_ID, SECRET),
    JoinRequest("A", "zz" * 16, SECRET),
    JoinRequest("A", SESSION_ID, "not hex"),
    JoinRequest("A", SESSION_ID[:-2], SECRET),
    JoinRequest("A", SESSION_ID, SECRET + "00"),
], ids=["side C", "no side", "id not hex", "secret not hex", "id short", "secret long"])
def test_packing_a_bad_join_raises_frame_error(join):
    with pytest.raises(FrameError):
        frames.pack_data_header(join)
    with pytest.raises(FrameError):
        frames.pack_udp_register(join)


GOOD_HEADER = frames.pack_data_header(JoinRequest("A", SESSION_ID, SECRET))
BAD_HEADERS = {
    "empty": b"",
    "short": GOOD_HEADER[:-1],
    "long": GOOD_HEADER + b"\x00",
    "wrong magic": b"\xfd\x02" + GOOD_HEADER[2:],
    "http": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[:35],
    "bad side": GOOD_HEADER[:2] + b"X" + GOOD_HEADER[3:],
}


@pytest.mark.parametrize("data", BAD_HEADERS.values(), ids=BAD_HEADERS.keys())
def test_unpacking_a_bad_header_raises_frame_error(data):
    with pytest.raises(FrameError):
        frames.unpack_data_header(data)


def test_unpacking_a_data_header_as_udp_register_raises_frame_error():
    with pytest.raises(FrameError):
        frames.unpack_udp_register(GOOD_HEADER)


@pytest.mark.parametrize("data", [
    b"",
    b"\xfd\x03" + bytes.fromhex(SESSION_ID),  # no status byte
    b"\xfd\x01" + bytes.fromhex(SESSION_ID) + b"\x00",  # wrong magic
    b"\xfd\x03" + bytes.fromhex(SESSION_ID) + b"\x63",  # unknown status
    b"hello, this is just a payload datagram",
], ids=["empty", "short", "wrong magic", "unknown status", "payload"])
def test_anything_but_an_ack_is_not_an_ack(data):
    assert frames.unpack_udp_ack(data) is None
