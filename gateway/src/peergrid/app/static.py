"""The member app's files (peergrid/app/www), served as they are: a fixed
list of names, read once, no directory listing and no path from the URL
ever reaches the file system."""
from __future__ import annotations

from pathlib import Path

WWW = Path(__file__).with_name("www")
FILES = {"/app/": ("index.html", "text/html; charset=utf-8"),
         "/app/index.html": ("index.html", "text/html; charset=utf-8"),
         "/app/app.js": ("app.js", "text/javascript; charset=utf-8"),
         "/app/cbor.js": ("cbor.js", "text/javascript; charset=utf-8"),
         "/app/app.css": ("app.css", "text/css; charset=utf-8"),
         "/app/icon.svg": ("icon.svg", "image/svg+xml")}
_cache: dict[str, tuple[bytes, str]] = {}


def asset(path: str) -> tuple[bytes, str] | None:
    f = FILES.get(path)
    if f is None:
        return None
    if path not in _cache:
        _cache[path] = ((WWW / f[0]).read_bytes(), f[1])
    return _cache[path]
