"""Who may use the client's local API: the holder of its secret, or a browser logged in by a link.

The secret is generated on the client's first start and kept in the state directory as
``<name>.api-secret`` (mode 0600), so only the user who runs the client (and root) can read
it; the CLI sends it as ``X-Chuantou-Key``. A browser gets in as with Jupyter: ``start``
prints a one-time link (``/login?key=<code>``) whose code works once and soon expires; it
buys a login session (common/login_sessions.py) kept in an HttpOnly, SameSite=Strict cookie
whose name carries the port, since browsers share cookies between all ports of 127.0.0.1.
"""

from __future__ import annotations

import errno
import hmac
import os
import secrets
from pathlib import Path

from common import config
from common.errors import ChuantouError
from common.login_sessions import DEFAULT_IDLE, DEFAULT_LIFETIME, DEFAULT_MAX_SESSIONS, LoginSessions

HEADER = "X-Chuantou-Key"
SECRET_SUFFIX = ".api-secret"
SECRET_BYTES = 32
MIN_SECRET_LENGTH = 32  # a shorter file is not one we wrote: make a new secret
COOKIE_PREFIX = "chuantou_client_"  # + the port (the relay's are chuantou_admin_<port>)
CODE_LIFETIME = 15 * 60.0  # a login link is for now, not for later: `login-link` makes another
MAX_CODES = 16  # unused links kept; making more forgets the oldest
FIX = ("run the CLI as the user who started the client, or open the link printed by `start` "
       "(a fresh one: python -m chuantou_client login-link)")


class SecretError(ChuantouError):
    pass


def secret_path(state_dir: Path, name: str) -> Path:
    return Path(state_dir) / f"{name}{SECRET_SUFFIX}"


def load_or_create_secret(path: Path) -> str:
    """The secret in ``path``; a new one (written with mode 0600) if there is none yet."""
    try:
        existing = _read(path)
    except FileNotFoundError:
        existing = None
    if existing is not None and len(existing) >= MIN_SECRET_LENGTH:
        _keep_private(path)
        return existing
    secret = secrets.token_urlsafe(SECRET_BYTES)
    _write_new(path, secret)
    return secret


def read_secret(path: Path) -> str:
    """The secret for the CLI; SecretError naming the file and the fix if it cannot be read."""
    try:
        secret = _read(path)
    except FileNotFoundError:
        raise SecretError(f"the client's API secret {path} does not exist (is the client started with this "
                          f"config?); {FIX}") from None
    except OSError as exc:
        raise SecretError(f"cannot read the client's API secret {path} ({exc.strerror or exc}); {FIX}") from None
    if len(secret) < MIN_SECRET_LENGTH:
        raise SecretError(f"the client's API secret {path} is damaged; restart the client to make a new one")
    return secret


def _read(path: Path) -> str:
    return path.read_text(encoding="ascii", errors="replace").strip()


def _write_new(path: Path, secret: str) -> None:
    config.write_private(path, (secret + "\n").encode())


def _keep_private(path: Path) -> None:
    """A secret file someone made readable to others is made private again."""
    try:
        if os.stat(path).st_mode & 0o077:
            os.chmod(path, 0o600)
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            raise


class ApiAuth:
    """The secret, the one-time login codes and the login sessions of one client's local API."""

    def __init__(self, secret: str, idle: float = DEFAULT_IDLE, lifetime: float = DEFAULT_LIFETIME,
                 max_sessions: int = DEFAULT_MAX_SESSIONS, code_lifetime: float = CODE_LIFETIME, clock=None):
        extra = {} if clock is None else {"clock": clock}
        self._secret = secret.encode()
        self.sessions = LoginSessions(idle, lifetime, max_sessions, **extra)
        # A code is a session that may be used once: redeeming it revokes it.
        self._codes = LoginSessions(code_lifetime, code_lifetime, MAX_CODES, **extra)

    def key_matches(self, given: str | None) -> bool:
        return given is not None and hmac.compare_digest(given.strip().encode("utf-8", "replace"), self._secret)

    def new_code(self) -> str:
        return self._codes.create()

    def redeem(self, code: str) -> str | None:
        """A new session ID if ``code`` is a live, unused login code (it is used up), else None."""
        if not (self._codes.check(code) and self._codes.revoke(code)):  # of two at once, one revoke wins
            return None
        return self.sessions.create()

    def session_valid(self, session_ids: list[str]) -> bool:
        return any(self.sessions.check(value) for value in session_ids)

    def log_out(self, session_ids: list[str]) -> None:
        for value in session_ids:
            self.sessions.revoke(value)


def cookie_name(port: int) -> str:
    return f"{COOKIE_PREFIX}{port}"


def cookie_header(port: int, value: str, max_age: int) -> str:
    # No Domain: the cookie stays with this host. Cookies ignore ports, hence the port in the name.
    return f"{cookie_name(port)}={value}; Path=/; Max-Age={max_age}; HttpOnly; SameSite=Strict"


def cookie_values(port: int, header: str) -> list[str]:
    """Every value sent under this API's cookie name (a page on another port may add one)."""
    found = []
    for part in (header or "").split(";"):
        name, _, value = part.strip().partition("=")
        if name == cookie_name(port) and value:
            found.append(value)
    return found
