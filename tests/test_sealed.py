"""Sealed sessions: each client's key pair and fingerprint, pinning peers' keys, and TCP
sessions that A and B seal end to end with TLS 1.3 inside the relayed data channel, so the
relay can neither read nor change them."""

from __future__ import annotations

import os
import stat

import pytest

from chuantou_client import known_clients
from common import identity
from common import protocol as p
from common.errors import ChuantouError

pytestmark = pytest.mark.timeout(120)


# --- identity ----------------------------------------------------------------------------------

def test_identity_is_made_once_with_mode_0600_and_keeps_its_fingerprint(tmp_path):
    path = tmp_path / "conf" / identity.IDENTITY_FILE
    first = identity.load_or_create(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    again = identity.load_or_create(path)
    assert again.fingerprint == first.fingerprint
    assert identity.FINGERPRINT_PATTERN.match(first.fingerprint)
    assert identity.certificate_fingerprint(again.certificate_der) == first.fingerprint
    assert b"PRIVATE KEY" not in first.public_spki and len(first.public_spki) == 44


def test_fingerprint_is_ssh_style_sha256_of_the_spki():
    import base64
    import hashlib
    ident = identity.generate()
    expected = "SHA256:" + base64.b64encode(hashlib.sha256(ident.public_spki).digest()).decode().rstrip("=")
    assert ident.fingerprint == expected
    assert identity.fingerprint_of_spki(identity.decode_public_key(ident.public_key_b64)) == expected


def test_a_lost_certificate_is_made_again_from_the_key(tmp_path):
    path = tmp_path / identity.IDENTITY_FILE
    first = identity.load_or_create(path)
    key_only = path.read_bytes().split(b"-----BEGIN CERTIFICATE-----")[0]
    path.write_bytes(key_only)
    again = identity.load(path)
    assert again.fingerprint == first.fingerprint
    assert b"CERTIFICATE" in path.read_bytes()


def test_a_file_that_is_not_a_key_is_a_clear_error(tmp_path):
    path = tmp_path / identity.IDENTITY_FILE
    path.write_text("not a key")
    with pytest.raises(identity.IdentityError, match="does not hold a private key"):
        identity.load(path)


def test_fingerprints_typed_by_users_are_checked():
    good = identity.generate().fingerprint
    assert identity.check_fingerprint(" sha256:" + good[7:] + " ") == good
    for bad in ("SHA256:abc", good[7:], "MD5:" + good[7:]):
        with pytest.raises(identity.IdentityError, match="not a key fingerprint"):
            identity.check_fingerprint(bad)


def test_a_public_key_hint_that_is_not_a_key_is_ignored():
    assert identity.decode_public_key("!!!") is None
    assert identity.decode_public_key("aGVsbG8=") is None
    assert identity.decode_public_key(None) is None


# --- known clients and --allow-from ------------------------------------------------------------

def test_first_key_is_recorded_and_a_changed_one_refused_until_forgotten(tmp_path):
    path = tmp_path / known_clients.KNOWN_CLIENTS_FILE
    known = known_clients.KnownClients(path)
    first, second = identity.generate().fingerprint, identity.generate().fingerprint
    known.check("office", first)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert known_clients.KnownClients(path).get("office") == first  # kept in the file
    known.check("office", first)
    with pytest.raises(known_clients.KeyRefused) as refused:
        known.check("office", second)
    text = str(refused.value)
    assert "'office'" in text and first in text and second in text
    assert "python -m chuantou_client forget-key office" in text
    assert known_clients.KnownClients(path).forget("office")  # as the CLI does, from another object
    known.check("office", second)
    assert known.get("office") == second


def test_target_fingerprint_pins_before_first_use():
    known = known_clients.KnownClients(None)
    right, wrong = identity.generate().fingerprint, identity.generate().fingerprint
    with pytest.raises(known_clients.KeyRefused, match="--target-fingerprint"):
        known.check("office", right, pinned=wrong)
    assert known.get("office") is None
    known.check("office", right, pinned=right)
    assert known.get("office") == right


def test_a_broken_known_clients_line_names_file_and_line(tmp_path):
    path = tmp_path / known_clients.KNOWN_CLIENTS_FILE
    path.write_text("# comment\noffice SHA256:nope\n")
    with pytest.raises(ChuantouError, match="line 2"):
        known_clients.KnownClients(path).get("office")


def test_allow_from_takes_ids_and_fingerprints():
    fp = identity.generate().fingerprint
    allow = known_clients.AllowFrom(["laptop", f"{fp}, phone"])
    assert allow.refusal("laptop", identity.generate().fingerprint) is None
    assert allow.refusal("someone", fp) is None
    assert "not in --allow-from" in allow.refusal("someone", identity.generate().fingerprint)
    assert known_clients.AllowFrom([]).refusal("anyone", fp) is None
    with pytest.raises(ChuantouError, match="neither a client ID"):
        known_clients.AllowFrom(["bad id!"])


# --- the relay passes keys on (as hints) ---------------------------------------------------------

def test_register_carries_a_public_key_and_rejects_one_that_is_not_base64():
    key = identity.generate().public_key_b64
    msg = p.decode(p.encode(p.Register(clientId="office", protocolVersion=p.PROTOCOL_VERSION, publicKey=key)))
    assert msg.publicKey == key
    text = p.encode(p.Register(clientId="office", protocolVersion=p.PROTOCOL_VERSION, publicKey="not base64!"))
    with pytest.raises(p.ProtocolError, match="publicKey"):
        p.decode(text)
