"""Who may register on the relay: the challenge each control channel opens with, the check of
a registration's proof, and the binding of a client ID to the one token that may claim it.

No I/O: the control connection sends the challenge and acts on the verdict.
"""

from __future__ import annotations

from common import auth, handshake
from common import protocol as p

from .settings import ServerConfig

class Authenticator:
    def __init__(self, config: ServerConfig):
        self._relay_wide = tuple(t for t in (config.token, *config.extra_tokens) if t)
        self._bound = dict(config.client_tokens)  # client ID -> the only token that may register it
        self._required = config.token is not None or bool(config.client_tokens) or bool(config.extra_tokens)

    @property
    def required(self) -> bool:
        """False on an open relay: any client may register."""
        return self._required

    def challenge(self) -> p.Challenge:
        """A fresh challenge for a new control channel; its nonce is what the proof must sign."""
        return handshake.challenge_for(auth.make_nonce(), self.required)

    def tokens_for(self, client_id: str) -> tuple[str, ...]:
        """The tokens that may register ``client_id``: its bound one, else every relay-wide one."""
        bound = self._bound.get(client_id)
        return (bound,) if bound else self._relay_wide

    def check(self, client_id: str, nonce: str, proof: str | None) -> tuple[str | None, str | None]:
        """Check a registration's proof. Returns (credential, None) or (None, problem); the
        credential is a fingerprint of the token that matched (None on an open relay)."""
        verdict = handshake.verify_proof(self.tokens_for(client_id), client_id, nonce, proof)
        return verdict.credential, verdict.problem
