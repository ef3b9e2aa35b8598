"""Token authentication by challenge: plain functions, no I/O.

The relay sends a random nonce when a control channel opens; the client proves it holds
the token with an HMAC over the nonce and the client ID it registers. The token itself
never crosses the wire, and a proof is useless on any other connection.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

NONCE_BYTES = 32
TOKEN_BYTES = 24
MIN_TOKEN_LENGTH = 16  # a shorter token can be guessed; generated ones have 32 characters


def token_problem(token: str, what: str = "the token") -> str | None:
    """Why ``token`` may not be used, or None. The message never repeats the token."""
    if len(token) < MIN_TOKEN_LENGTH:
        return (f"{what} is too short ({len(token)} characters; at least {MIN_TOKEN_LENGTH} are needed): "
                "use a generated one (python -m chuantou_server token add) or a longer random string")
    return None


def generate_token() -> str:
    return secrets.token_urlsafe(TOKEN_BYTES)


def make_nonce() -> str:
    return secrets.token_hex(NONCE_BYTES)


def register_proof(token: str, nonce: str, client_id: str) -> str:
    message = f"chuantou-register\n{nonce}\n{client_id}".encode()
    return hmac.new(token.encode(), message, hashlib.sha256).hexdigest()


def proof_matches(token: str, nonce: str, client_id: str, proof: str) -> bool:
    # compare_digest raises TypeError on str with non-ASCII characters: compare bytes instead
    expected = register_proof(token, nonce, client_id).encode()
    return hmac.compare_digest(expected, proof.encode("utf-8", "replace"))


def fingerprint(token: str) -> str:
    """A short, non-reversible label for logs and status output."""
    return hashlib.sha256(token.encode()).hexdigest()[:8]
