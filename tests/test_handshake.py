"""The registration handshake without sockets: the client's and the relay's pure functions
paired message by message, as bore's auth tests and h11's connection pairs do."""

from __future__ import annotations

import pytest

from common import auth, handshake
from common import protocol as p

TOKEN = "relay-token-" + "0123456789" * 2


def wire(msg, sender: str):
    """Through the wire format and back, as the other side sees it."""
    return p.decode(p.encode(msg), sender=sender)


def test_the_right_token_registers():
    challenge = wire(handshake.challenge_for(auth.make_nonce(), tokens_required=True), "relay")
    register = wire(handshake.register_for(challenge, "laptop", TOKEN), "client")
    assert handshake.version_problem(register.protocolVersion) is None
    verdict = handshake.verify_proof([TOKEN], register.clientId, challenge.nonce, register.auth)
    assert verdict.accepted and verdict.credential == auth.fingerprint(TOKEN)
    reply = wire(p.RegisterResponse(success=True, assignedId="laptop"), "relay")
    assert handshake.registration_result(reply) == reply


@pytest.mark.parametrize("token, expected", [(None, "requires a token"), ("wrong-token-" + "x" * 10, "failed")])
def test_no_token_or_a_wrong_one_is_refused_with_the_reason(token, expected):
    challenge = handshake.challenge_for(auth.make_nonce(), tokens_required=True)
    register = handshake.register_for(challenge, "laptop", token)
    verdict = handshake.verify_proof([TOKEN], "laptop", challenge.nonce, register.auth)
    assert not verdict.accepted and expected in verdict.problem
    with pytest.raises(handshake.Refused, match=expected):
        handshake.registration_result(p.RegisterResponse(success=False, error=verdict.problem))


def test_a_proof_is_bound_to_its_nonce_and_to_its_client_id():
    first = handshake.challenge_for(auth.make_nonce(), True)
    register = handshake.register_for(first, "laptop", TOKEN)
    assert not handshake.verify_proof([TOKEN], "laptop", auth.make_nonce(), register.auth).accepted  # replayed
    assert not handshake.verify_proof([TOKEN], "server", first.nonce, register.auth).accepted  # another ID


def test_an_open_relay_accepts_without_a_proof_and_a_bound_id_takes_only_its_token():
    assert handshake.verify_proof([], "laptop", "nonce", None) == handshake.Verdict(credential=None)
    bound = "bound-token-" + "b" * 12
    challenge = handshake.challenge_for(auth.make_nonce(), True)
    with_relay_token = handshake.register_for(challenge, "laptop", TOKEN)
    assert not handshake.verify_proof([bound], "laptop", challenge.nonce, with_relay_token.auth).accepted


def test_versions_and_takeover_and_what_a_client_skips():
    assert "version 1 is not supported" in handshake.version_problem(1)
    assert handshake.register_for(handshake.challenge_for("ab", False), "A", None, takeover=False).takeover is False
    assert handshake.register_for(handshake.challenge_for("ab", False), "A", None).takeover is None
    assert handshake.registration_result(p.Heartbeat(timestamp=1.0)) is None  # not the answer yet
    with pytest.raises(handshake.Refused) as refused:
        handshake.registration_result(p.RegisterResponse(success=False, error="in use", code=p.ID_IN_USE))
    assert refused.value.code == p.ID_IN_USE
    with pytest.raises(handshake.Refused, match="did not open with a challenge"):
        handshake.register_for(p.Heartbeat(timestamp=1.0), "A", TOKEN)
