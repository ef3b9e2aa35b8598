"""Static files of the admin pages (HTML, CSS, JavaScript, an icon), shipped inside the packages.

Each page's own files live in its package's ``static/`` folder; the shared look and helpers in
``common/static/``. Only plain names of those kinds are served, so no path leaves the folders.

This and ``common/static/`` are application shell rather than wire format; they live in ``common``
because both programs' pages use them and the layout has no other shared package.
"""

from __future__ import annotations

import re
from pathlib import Path

SHARED = Path(__file__).with_name("static")
NAME = re.compile(r"[a-z0-9][a-z0-9_.-]*\.(html|css|js|svg)")
CONTENT_TYPES = {
    "html": "text/html; charset=utf-8",
    "css": "text/css; charset=utf-8",
    "js": "text/javascript; charset=utf-8",
    "svg": "image/svg+xml",
}
PAGE_HEADERS = {  # a page loads nothing from anywhere else and may not be framed
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; "
                               "form-action 'self'",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}


def static_file(package_static: Path, name: str) -> tuple[str, bytes, dict[str, str]] | None:
    """(content type, bytes, extra headers) of ``name`` from the package's folder or the shared one."""
    if not NAME.fullmatch(name):
        return None
    for folder in (package_static, SHARED):
        path = folder / name
        if path.is_file():
            kind = name.rsplit(".", 1)[1]
            return CONTENT_TYPES[kind], path.read_bytes(), dict(PAGE_HEADERS) if kind == "html" else {}
    return None
