"""A client's long-term identity: an Ed25519 key pair, the self-signed certificate made from it
for the sealed sessions' TLS, and its fingerprint as people read it aloud (``SHA256:`` and the
unpadded base64 of the SHA-256 of the public key's SubjectPublicKeyInfo, as ssh prints).

The key lives in one PEM file beside the client's config, mode 0600, with the certificate after
it (``ssl`` loads both from one file). Only the public half ever leaves this machine. No I/O
beyond that file; the ``cryptography`` package does the key and certificate work, since the
standard library can use keys and certificates but not make them.
"""

from __future__ import annotations

import base64
import datetime
import functools
import hashlib
import hmac
import os
import re
import ssl
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from . import config
from .errors import ChuantouError

IDENTITY_FILE = "identity.pem"
FINGERPRINT_PATTERN = re.compile(r"^SHA256:[A-Za-z0-9+/]{43}$")
MAX_PUBLIC_KEY_BYTES = 1024  # an Ed25519 SPKI is 44 bytes; room for EC/RSA keys of a future version
# Nobody checks these dates (the pin is the trust), but OpenSSL does: far apart, so no clock skew
# or long uptime ever makes a peer's certificate "not yet valid" or "expired".
NOT_BEFORE = datetime.datetime(2000, 1, 1, tzinfo=datetime.timezone.utc)
NOT_AFTER = datetime.datetime(9999, 12, 31, tzinfo=datetime.timezone.utc)


class IdentityError(ChuantouError):
    pass


def spki_der(public_key) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def fingerprint_of_spki(der: bytes) -> str:
    digest = hashlib.sha256(der).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


def fingerprint(public_key) -> str:
    """``SHA256:...`` of a public key object, as ssh-keygen -l prints."""
    return fingerprint_of_spki(spki_der(public_key))


def certificate_spki(cert_der: bytes) -> bytes:
    """The SubjectPublicKeyInfo DER inside a certificate (raises IdentityError if it is not one)."""
    try:
        return spki_der(x509.load_der_x509_certificate(cert_der).public_key())
    except (ValueError, TypeError) as exc:
        raise IdentityError(f"not a usable certificate: {exc}") from None


@functools.lru_cache(maxsize=256)
def certificate_fingerprint(cert_der: bytes) -> str:
    """Parsing a certificate costs about 0.1 ms, twice per sealed session on B: remembered for
    the few peers a client talks to (a failure is not: it raises, and lru_cache keeps nothing)."""
    return fingerprint_of_spki(certificate_spki(cert_der))


def check_fingerprint(value: str) -> str:
    """A fingerprint as typed by a user, validated (``SHA256:`` + 43 base64 characters)."""
    value = value.strip()
    if value.lower().startswith("sha256:"):
        value = "SHA256:" + value[7:]
    if not FINGERPRINT_PATTERN.match(value):
        raise IdentityError(f"{value!r} is not a key fingerprint: expected SHA256: followed by 43 base64 "
                            f"characters, as `python -m chuantou_client status` shows")
    return value


def same_fingerprint(a: str | None, b: str | None) -> bool:
    return a is not None and b is not None and hmac.compare_digest(a.encode(), b.encode())


def encode_public_key(spki: bytes) -> str:
    return base64.b64encode(spki).decode("ascii")


@functools.lru_cache(maxsize=256)
def decode_public_key(text: str | None) -> bytes | None:
    """The SPKI DER of a ``publicKey`` field, or None if absent or not a key (it is only a hint).
    Remembered: each session's messages carry the peer's, and several steps look at it."""
    if not text or len(text) > MAX_PUBLIC_KEY_BYTES * 2:
        return None
    try:
        der = base64.b64decode(text, validate=True)
        serialization.load_der_public_key(der)
    except (ValueError, TypeError):
        return None
    return der


def make_certificate(key: ed25519.Ed25519PrivateKey) -> x509.Certificate:
    """A self-signed certificate for ``key``: a carrier for the public key in TLS, nothing more."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "chuantou " + fingerprint(key.public_key()))])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(NOT_BEFORE)
        .not_valid_after(NOT_AFTER)
        # a CA certificate, so that a peer can load it as its own trust anchor (see sealing.py)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .sign(key, None)
    )


@dataclass
class Identity:
    """A key pair and its certificate; ``pem`` holds both (the private key first)."""

    key: ed25519.Ed25519PrivateKey
    certificate: x509.Certificate
    path: Path | None = None  # where it is kept, or None for one that lives in memory only
    _pem: bytes = field(default=b"", repr=False)

    @functools.cached_property
    def public_spki(self) -> bytes:
        return spki_der(self.key.public_key())

    @functools.cached_property
    def fingerprint(self) -> str:
        return fingerprint_of_spki(self.public_spki)

    @functools.cached_property
    def certificate_der(self) -> bytes:  # sent in every sealed session's preamble
        return self.certificate.public_bytes(serialization.Encoding.DER)

    @property
    def public_key_b64(self) -> str:
        return encode_public_key(self.public_spki)

    def pem(self) -> bytes:
        if not self._pem:
            self._pem = _to_pem(self.key, self.certificate)
        return self._pem

    def load_into(self, context: ssl.SSLContext) -> None:
        """Give ``context`` this key and certificate (ssl reads them only from a file)."""
        if self.path is not None:
            context.load_cert_chain(str(self.path))
            return
        with tempfile.TemporaryDirectory(prefix="chuantou-id-") as tmp:  # mode 0700: only we can read it
            path = Path(tmp) / IDENTITY_FILE
            _write_private(path, self.pem())
            context.load_cert_chain(str(path))

    def __repr__(self) -> str:
        return f"<Identity {self.fingerprint} {self.path or '(in memory)'}>"


def generate() -> Identity:
    """A new identity kept in memory only (tests, clients run without a config file)."""
    key = ed25519.Ed25519PrivateKey.generate()
    return Identity(key, make_certificate(key))


def load_or_create(path: Path) -> Identity:
    """The identity in ``path``; made and saved (mode 0600) on first use."""
    path = Path(path)
    if not path.exists():
        identity = generate()
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_private(path, identity.pem())
        identity.path = path
        return identity
    return load(path)


def load(path: Path) -> Identity:
    try:
        data = path.read_bytes()
        key = serialization.load_pem_private_key(data, password=None)
    except OSError as exc:
        raise IdentityError(f"cannot read this client's key {path}: {exc.strerror or exc}") from None
    except (ValueError, TypeError) as exc:
        raise IdentityError(f"{path} does not hold a private key ({exc}); move it away and a new key "
                            f"is made at the next start (peers that pinned the old one will refuse it)") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise IdentityError(f"{path} holds a {type(key).__name__}; this version uses Ed25519 keys")
    certificate = _certificate_in(data, key)
    if certificate is None:  # lost or for another key: make it again (it follows from the key)
        certificate = make_certificate(key)
        _write_private(path, _to_pem(key, certificate))
    if os.stat(path).st_mode & 0o077:
        os.chmod(path, 0o600)
    return Identity(key, certificate, path)


def _certificate_in(data: bytes, key) -> x509.Certificate | None:
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        return None
    for cert in certs:
        if spki_der(cert.public_key()) == spki_der(key.public_key()):
            return cert
    return None


def _to_pem(key, certificate) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()) + certificate.public_bytes(serialization.Encoding.PEM)


def _write_private(path: Path, data: bytes) -> None:
    config.write_private(path, data)  # atomic, 0600 from the start: the key is never readable by others
