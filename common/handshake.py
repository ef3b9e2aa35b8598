"""The registration handshake as pure functions: message in, message (or verdict) out.

    relay                                   client
    challenge(nonce, authRequired)  ---->
                                    <----   register(clientId, version, proof, takeover)
    register_response(success|error) ---->
    (or, from a cluster node to a client that follows redirects:
    register_redirect(url)           ---->  the client registers at url instead, or not)

The relay's side is ``challenge_for`` / ``version_problem`` / ``verify_proof``; the client's is
``register_for`` / ``registration_result``. No sockets: the relay's signaling and the client's
control channel call these, and tests pair them directly.
"""

from __future__ import annotations

import dataclasses

from . import auth
from . import protocol as p

OPEN_RELAY = None  # the credential of a client on a relay without tokens


class Refused(Exception):
    """The relay refused the registration; ``code`` says which rule, if the relay said."""

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        self.code = code


class Redirected(Exception):
    """The relay (a cluster node) answered with a redirect to ``url``; nothing was registered."""

    def __init__(self, url: str, node: str | None = None, reason: str | None = None):
        super().__init__(f"relay redirected this client to {url}" + (f" (node {node})" if node else ""))
        self.url, self.node, self.reason = url, node, reason


@dataclasses.dataclass(frozen=True)
class Verdict:
    """The relay's check of a proof: ``credential`` (a token fingerprint) or ``problem``."""

    credential: str | None = None
    problem: str | None = None

    @property
    def accepted(self) -> bool:
        return self.problem is None


# --- the relay's side ------------------------------------------------------------------------

def challenge_for(nonce: str, tokens_required: bool) -> p.Challenge:
    return p.Challenge(nonce=nonce, authRequired=tokens_required, protocolVersion=p.PROTOCOL_VERSION)


def version_problem(version: int) -> str | None:
    if version == p.PROTOCOL_VERSION:
        return None
    return (f"protocol version {version} is not supported: this relay speaks version {p.PROTOCOL_VERSION}; "
            f"install the same chuantou version on client and server")


def verify_proof(candidates, client_id: str, nonce: str, proof: str | None) -> Verdict:
    """``candidates``: the tokens that may register ``client_id`` (its bound token alone, or every
    relay token); none at all is an open relay. Every candidate is compared in constant time."""
    tokens = [t for t in candidates if t]
    if not tokens:
        return Verdict(credential=OPEN_RELAY)
    if not proof:
        return Verdict(problem="authentication failed: this relay requires a token; pass --token "
                               "(or set CHUANTOU_TOKEN)")
    for token in tokens:
        if auth.proof_matches(token, nonce, client_id, proof):
            return Verdict(credential=auth.fingerprint(token))
    return Verdict(problem="authentication failed")


# --- the client's side -----------------------------------------------------------------------

def redirect_for(url: str, node: str, reason: str) -> p.RegisterRedirect:
    return p.RegisterRedirect(url=url, node=node, reason=reason)


def register_for(challenge, client_id: str, token: str | None, takeover: bool = True,
                 public_key: str | None = None, follows_redirect: bool = False) -> p.Register:
    """The ``register`` answering ``challenge``; Refused if the first message was not one."""
    if not isinstance(challenge, p.Challenge):
        raise Refused("the relay did not open with a challenge; is it a chuantou relay of the same version?")
    proof = auth.register_proof(token, challenge.nonce, client_id) if token else None
    return p.Register(clientId=client_id, protocolVersion=p.PROTOCOL_VERSION, auth=proof,
                      takeover=None if takeover else False, publicKey=public_key,
                      followsRedirect=True if follows_redirect else None, features=[p.FEATURE_WARM])


def registration_result(reply) -> p.RegisterResponse | None:
    """A successful ``register_response``; None for a message to skip (the relay may send others
    first); Refused for a refusal or an error; Redirected for a cluster node's redirect."""
    if isinstance(reply, p.RegisterRedirect):
        raise Redirected(reply.url, reply.node, reply.reason)
    if isinstance(reply, p.Error):
        raise Refused(reply.message, reply.code)
    if not isinstance(reply, p.RegisterResponse):
        return None
    if not reply.success:
        raise Refused(reply.error or "registration refused", reply.code)
    return reply
