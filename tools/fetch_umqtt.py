#!/usr/bin/env python3
"""Fetch umqtt (micropython-lib) for the firmware build, through pip.

The packages are bare source archives that pip downloads but refuses to
install (no setup.py in micropython-umqtt.simple 1.3.4). So pip is asked to
download them with its own index settings; when it stops after the download,
the archive's address is taken from its message and fetched, and either way
the archive must match the pinned SHA-256 before umqtt/simple.py is unpacked
into build/lib/umqtt_pinned/. Nothing of umqtt is kept in the repository.

Why not build/lib/umqtt/: the stock ESP32 image freezes micropython-lib's
umqtt (umqtt.simple 1.7.0 in MicroPython v1.28), and frozen modules are
found before /lib, so a `umqtt` package on the board's filesystem would never
be loaded and the board would run a client it was not tested with. Under the
package name `umqtt_pinned` the board runs exactly the pinned version."""
from __future__ import annotations

import hashlib
import io
import re
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "build" / "lib"
PKG = "umqtt_pinned"        # the package name on the board (see above)
# (requirement, file wanted from the archive, sha256 of the archive)
PINS = [
    ("micropython-umqtt.simple==1.3.4", "umqtt/simple.py",
     "b6a2520239e3992c63a7de9370ee9b3d9d27819a90359c521f1c0f7ccab8d12f"),
]


def archive(req: str, tmp: Path) -> bytes:
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                           "--disable-pip-version-check", "-d", str(tmp), req], capture_output=True, text=True)
    got = sorted(tmp.glob("*.tar.gz"))
    if got:
        return got[0].read_bytes()
    m = re.search(r"from (https?://\S+\.tar\.gz)", proc.stdout + proc.stderr)
    if not m:
        raise SystemExit(f"fetch_umqtt: pip could not find {req}:\n{proc.stderr[-800:]}")
    with urllib.request.urlopen(m.group(1), timeout=60) as r:
        return r.read()


def main() -> None:
    OUT.joinpath(PKG).mkdir(parents=True, exist_ok=True)
    for req, member, sha in PINS:
        dst = OUT / PKG / member.split("/")[-1]
        if dst.exists():
            continue
        with tempfile.TemporaryDirectory() as d:
            data = archive(req, Path(d))
        digest = hashlib.sha256(data).hexdigest()
        if digest != sha:
            raise SystemExit(f"fetch_umqtt: {req} archive has sha256 {digest}, pinned {sha}")
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tf:
            names = [n for n in tf.getnames() if n.endswith("/" + member)]
            if not names:
                raise SystemExit(f"fetch_umqtt: {member} not in {req}")
            src = tf.extractfile(names[0])
            assert src is not None
            dst.write_bytes(src.read())
        print(f"fetch_umqtt: {req} -> {dst.relative_to(ROOT)}")
    (OUT / PKG / "__init__.py").touch()


if __name__ == "__main__":
    main()
