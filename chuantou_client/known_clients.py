"""Peers' keys this client has seen, like ssh's ``known_hosts``, and who may reach it.

``known_clients`` beside the config holds one ``<client ID> SHA256:<fingerprint>`` line per
peer. The first sealed session with a peer records the key it proved; every later one must
prove the same key, or the session is refused with a message naming the peer, both
fingerprints and the command that accepts the new key. A proxy's ``--target-fingerprint``
pins a key before the first session (no trust on first use), and B's ``--allow-from`` names
the IDs and fingerprints that may reach it. All of this is checked against the key the peer
proved in the handshake; what the relay says about keys is only a hint.

The file is read again whenever it changes, so ``forget-key`` works on a running client.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from common import config, identity
from common import protocol as p
from common.errors import ChuantouError

log = logging.getLogger("chuantou.client")

KNOWN_CLIENTS_FILE = "known_clients"


class KeyRefused(ChuantouError):
    """A peer's proven key does not match its pin, or is not allowed here."""


def forget_key_command(peer: str) -> str:
    return f"python -m chuantou_client forget-key {peer}"


def beside_config(config_path: Path, name: str) -> Path:
    """``name`` in the config's directory; for a config not called client.json, prefixed with its
    stem, so two clients configured in one directory keep their own keys and pins."""
    config_path = Path(config_path)
    prefix = "" if config_path.stem == "client" else f"{config_path.stem}."
    return config_path.with_name(prefix + name)


def identity_path(config_path: Path) -> Path:
    return beside_config(config_path, identity.IDENTITY_FILE)


def known_clients_path(config_path: Path) -> Path:
    return beside_config(config_path, KNOWN_CLIENTS_FILE)


class KnownClients:
    """Pinned fingerprints by client ID, in ``path`` (or in memory only, with None)."""

    def __init__(self, path: Path | None = None):
        self.path = Path(path) if path is not None else None
        self._lock = threading.Lock()
        self._pins: dict[str, str] = {}
        self._seen_mtime: int | None = None

    def __repr__(self) -> str:
        return f"<KnownClients {self.path or '(in memory)'}>"

    # --- reading and writing ------------------------------------------------------------------

    def get(self, peer: str) -> str | None:
        with self._lock:
            self._reload()
            return self._pins.get(peer)

    def pins(self) -> dict[str, str]:
        with self._lock:
            self._reload()
            return dict(self._pins)

    def record(self, peer: str, fp: str) -> None:
        with self._lock:
            self._reload()
            if self._pins.get(peer) == fp:
                return
            self._pins[peer] = fp
            self._save()
        log.info("recorded the key of client %s: %s (in %s)", peer, fp, self.path or "memory")

    def forget(self, peer: str) -> bool:
        """Drop the pin of ``peer``; the next session records whatever key it proves."""
        with self._lock:
            self._reload()
            if self._pins.pop(peer, None) is None:
                return False
            self._save()
            return True

    def _reload(self) -> None:
        if self.path is None:
            return
        try:
            mtime = os.stat(self.path).st_mtime_ns
        except FileNotFoundError:
            self._pins, self._seen_mtime = {}, None
            return
        if mtime == self._seen_mtime:
            return
        self._pins = parse(self.path.read_text(encoding="utf-8"), str(self.path))
        self._seen_mtime = mtime

    def _save(self) -> None:
        if self.path is None:
            return
        text = "# peers' keys, as sealed sessions proved them (see: python -m chuantou_client forget-key)\n"
        text += "".join(f"{peer} {fp}\n" for peer, fp in sorted(self._pins.items()))
        config.write_private(self.path, text.encode("utf-8"))
        self._seen_mtime = os.stat(self.path).st_mtime_ns

    # --- the checks -----------------------------------------------------------------------------

    def check(self, peer: str, proven: str, pinned: str | None = None) -> None:
        """``verify``, then record the key (the first session's key becomes the pin)."""
        self.verify(peer, proven, pinned)
        self.record(peer, proven)

    def verify(self, peer: str, proven: str, pinned: str | None = None) -> None:
        """Raise KeyRefused unless ``proven`` is the key pinned for ``peer``: by ``pinned`` (a
        proxy's --target-fingerprint) if given, else by this file; nothing pinned passes."""
        if pinned is not None:
            if not identity.same_fingerprint(pinned, proven):
                raise KeyRefused(f"client '{peer}' proved the key {proven}, not {pinned} that this proxy pins "
                                 f"(--target-fingerprint); refusing the session. Compare fingerprints with "
                                 f"its owner (`python -m chuantou_client status` there)")
            return
        known = self.get(peer)
        if known is not None and not identity.same_fingerprint(known, proven):
            raise KeyRefused(mismatch_message(peer, known, proven, self.path))


def mismatch_message(peer: str, known: str, proven: str, path: Path | None) -> str:
    where = path or "this client's memory"
    return (f"the key of client '{peer}' has CHANGED: it proved {proven}, but {where} holds {known} from an "
            f"earlier session; refusing the session. Someone (the relay, or whoever holds that ID now) may be "
            f"impersonating '{peer}', or its key was made again. Compare fingerprints with its owner "
            f"(`python -m chuantou_client status` there); if the new one is right, accept it with: "
            f"{forget_key_command(peer)}")


def parse(text: str, where: str) -> dict[str, str]:
    pins = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        try:
            if len(parts) != 2 or not p.CLIENT_ID_PATTERN.match(parts[0]):
                raise identity.IdentityError("expected '<client ID> SHA256:...'")
            pins[parts[0]] = identity.check_fingerprint(parts[1])
        except identity.IdentityError as exc:
            raise ChuantouError(f"{where} line {number}: {exc}") from None
    return pins


class AllowFrom:
    """B's ``--allow-from``: client IDs (whose key is then held to its pin) and fingerprints
    (trusted whatever ID the relay gave). Empty: every peer that passes its pin."""

    def __init__(self, entries=()):
        self.ids: set[str] = set()
        self.fingerprints: set[str] = set()
        for entry in parse_allow_from(entries):
            (self.fingerprints if entry.startswith("SHA256:") else self.ids).add(entry)

    def __bool__(self) -> bool:
        return bool(self.ids or self.fingerprints)

    def describe(self) -> str:
        return ", ".join(sorted(self.ids) + sorted(self.fingerprints)) or "any peer"

    def refusal(self, peer: str, proven: str) -> str | None:
        if not self or proven in self.fingerprints or peer in self.ids:
            return None
        return (f"client '{peer}' (key {proven}) is not in --allow-from ({self.describe()}); "
                f"refusing the session")


def parse_allow_from(entries) -> list[str]:
    """``ID``, ``SHA256:...`` or comma-separated lists of them, validated."""
    if isinstance(entries, str):
        entries = [entries]
    out = []
    for entry in entries or ():
        for item in str(entry).split(","):
            item = item.strip()
            if not item:
                continue
            if item.lower().startswith("sha256:"):
                out.append(identity.check_fingerprint(item))
            elif p.CLIENT_ID_PATTERN.match(item):
                out.append(item)
            else:
                raise ChuantouError(f"--allow-from {item!r} is neither a client ID nor a SHA256: fingerprint")
    return out
