"""Releases (docs/OTA.md 1): the signed manifest read and checked, a release
directory checked against it, and the gateway's release store.

The store keeps each release as `<store>/<board>/<seq>/` with
`manifest.cose`, `manifest.json` (when the release had one) and every file
of the manifest at its path. Nothing enters it unchecked: the manifest's
structure (1.1), every file's size and SHA-256, and the signature when the
gateway is given release keys (`[fleet] release_keys`). Once in, a
release is served as it is; a second, different release with the same
(board, seq) is refused.

Serving reads pieces through `ReleaseStore.piece`: the board name and the
numbers a board sends are checked before any path is made, paths come only
from a manifest that passed the checks above, every file opened must lie
inside the store, and what is cached is bounded in entries and bytes.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cbor2
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from protocol.errors import E_RANGE, E_TARGET

COSE_SIGN1_TAG = 18
PROTECTED = b"\xa1\x01\x27"          # {1: -8}: EdDSA
MAX_MANIFEST = 64 * 1024             # manifest.cose, bytes
MAX_FILES = 96
MAX_FILE = 1 << 24
MAX_PATH = 64
BOARD_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,23}")
PATH_RE = re.compile(r"[A-Za-z0-9_./-]{1,64}")
KEYS = ("board", "created", "downgrade", "files", "format", "heap", "seq", "trial_s", "version")
RESERVED = ("manifest.cose", "manifest.json")


class ReleaseError(Exception):
    """A release that is malformed, tampered with or not signed by a trusted key."""


@dataclass(frozen=True)
class Manifest:
    seq: int
    board: str
    version: str
    heap: int
    downgrade: bool
    trial_s: int
    created: int
    files: tuple[tuple[str, int, bytes], ...]       # (path, size, sha256)
    payload: bytes                                  # the manifest's CBOR bytes
    protected: bytes
    kid: bytes
    signature: bytes
    cose: bytes                                     # manifest.cose as it is

    @property
    def digest(self) -> bytes:
        """SHA-256 of the manifest's CBOR bytes (status key 21: its first 8)."""
        return hashlib.sha256(self.payload).digest()

    def summary(self) -> dict[str, Any]:
        return {"board": self.board, "seq": self.seq, "version": self.version, "digest": self.digest.hex(),
                "files": len(self.files), "bytes": sum(f[1] for f in self.files), "heap": self.heap,
                "downgrade": self.downgrade, "trial_s": self.trial_s, "created": self.created,
                "kid": self.kid.hex()}


def kid_of(public_key: bytes) -> bytes:
    return hashlib.sha256(public_key).digest()[:8]


def valid_board(name: Any) -> bool:
    return isinstance(name, str) and BOARD_RE.fullmatch(name) is not None


def _valid_path(p: Any) -> bool:
    if not isinstance(p, str) or len(p.encode()) > MAX_PATH or PATH_RE.fullmatch(p) is None:
        return False
    if p.startswith("/") or ".." in p or p in RESERVED:
        return False
    return all(part not in ("", ".") for part in p.split("/"))


def _uint(m: dict[str, Any], k: str, lo: int = 0) -> int:
    v = m.get(k)
    if type(v) is not int or v < lo:
        raise ReleaseError(f"manifest: {k} must be an unsigned integer >= {lo}")
    return v


def parse(cose: bytes) -> Manifest:
    """Read manifest.cose and check its structure (docs/OTA.md 1.1, 1.2);
    the signature is checked by `check_signature`."""
    if len(cose) > MAX_MANIFEST:
        raise ReleaseError(f"manifest.cose of {len(cose)} bytes (at most {MAX_MANIFEST})")
    try:
        env = cbor2.loads(cose, max_depth=4, allow_indefinite=False, allow_duplicate_keys=False)
    except Exception as e:  # noqa: BLE001 - anything cbor2 refuses
        raise ReleaseError(f"manifest.cose is not CBOR ({type(e).__name__}: {e})") from None
    if not isinstance(env, cbor2.CBORTag) or env.tag != COSE_SIGN1_TAG or len(env.value) != 4:
        raise ReleaseError("manifest.cose is not a COSE_Sign1 (tag 18, four items)")
    prot, unprot, payload, sig = env.value
    if prot != PROTECTED:
        raise ReleaseError("manifest.cose: the protected header must be {1: -8} (EdDSA)")
    if not hasattr(unprot, "get") or set(unprot) != {4} or not isinstance(unprot[4], bytes) or len(unprot[4]) != 8:
        raise ReleaseError("manifest.cose: the unprotected header must be {4: kid of 8 bytes}")
    if not isinstance(payload, bytes) or not isinstance(sig, bytes) or len(sig) != 64:
        raise ReleaseError("manifest.cose: payload or signature malformed")
    try:
        m = cbor2.loads(payload, max_depth=4, allow_indefinite=False, allow_duplicate_keys=False)
    except Exception as e:  # noqa: BLE001
        raise ReleaseError(f"manifest payload is not CBOR ({type(e).__name__})") from None
    if not isinstance(m, dict) or not all(isinstance(k, str) for k in m):
        raise ReleaseError("manifest: must be a map with text keys")
    if cbor2.dumps(m, canonical=True) != payload:
        raise ReleaseError("manifest: not in deterministic CBOR (RFC 8949 4.2.1)")
    missing = [k for k in KEYS if k not in m]
    if missing:
        raise ReleaseError(f"manifest: {', '.join(missing)} missing")
    if m["format"] != 1 or type(m["format"]) is not int:
        raise ReleaseError(f"manifest: format {m['format']!r}, this gateway knows 1")
    version, board = m["version"], m["board"]
    if not isinstance(version, str) or len(version.encode()) > 24:
        raise ReleaseError("manifest: version must be text of at most 24 bytes")
    if not valid_board(board):
        raise ReleaseError(f"manifest: board {board!r} is not a board name (a-z A-Z 0-9 _ . -, 1-24)")
    if type(m["downgrade"]) is not bool:
        raise ReleaseError("manifest: downgrade must be true or false")
    seq = _uint(m, "seq", 1)
    if seq > 0xFFFFFFFF:
        raise ReleaseError("manifest: seq beyond 32 bits")
    files = m["files"]
    if not isinstance(files, (list, tuple)) or not 1 <= len(files) <= MAX_FILES:
        raise ReleaseError(f"manifest: files must list 1 to {MAX_FILES} files")
    out: list[tuple[str, int, bytes]] = []
    for f in files:
        if not isinstance(f, (list, tuple)) or len(f) != 3:
            raise ReleaseError("manifest: a file is [path, size, sha256]")
        path, size, digest = f
        if not _valid_path(path):
            raise ReleaseError(f"manifest: file path {str(path)[:80]!r} not allowed")
        if type(size) is not int or not 0 <= size <= MAX_FILE:
            raise ReleaseError(f"manifest: {path}: size must be 0 to {MAX_FILE}")
        if not isinstance(digest, bytes) or len(digest) != 32:
            raise ReleaseError(f"manifest: {path}: sha256 must be 32 bytes")
        if out and path <= out[-1][0]:
            raise ReleaseError(f"manifest: files not sorted by path (or twice): {path}")
        out.append((path, size, digest))
    if "release_keys.json" not in [p for p, _, _ in out]:
        raise ReleaseError("manifest: release_keys.json is not among the files")
    return Manifest(seq, board, version, _uint(m, "heap"), m["downgrade"], _uint(m, "trial_s"),
                    _uint(m, "created"), tuple(out), payload, prot, bytes(unprot[4]), sig, bytes(cose))


def sig_structure(protected: bytes, payload: bytes) -> bytes:
    return cbor2.dumps(["Signature1", protected, b"", payload], canonical=True)


def check_signature(m: Manifest, keys: list[bytes]) -> bytes:
    """The trusted key that signed the manifest; ReleaseError when none did."""
    for k in keys:
        if kid_of(k) != m.kid:
            continue
        try:
            Ed25519PublicKey.from_public_bytes(k).verify(m.signature, sig_structure(m.protected, m.payload))
        except (InvalidSignature, ValueError):
            raise ReleaseError(f"the signature does not verify with the release key {k.hex()[:16]}... "
                               f"(kid {m.kid.hex()})") from None
        return k
    raise ReleaseError(f"signed by kid {m.kid.hex()}, which is none of the {len(keys)} configured release "
                       "key(s) ([fleet] release_keys)")


def _hash_file(p: Path, size: int) -> bytes:
    h = hashlib.sha256()
    n = 0
    with open(p, "rb") as f:
        while chunk := f.read(1 << 16):
            n += len(chunk)
            if n > size:
                break
            h.update(chunk)
    if n != size:
        raise ReleaseError(f"{p.name}: {n}{'+' if n > size else ''} bytes, the manifest says {size}")
    return h.digest()


def check_files(m: Manifest, d: Path) -> None:
    """Every file of the manifest in directory d, with its size and SHA-256."""
    for path, size, digest in m.files:
        p = d / path
        if p.is_symlink() or not p.is_file():
            raise ReleaseError(f"{path}: missing (or not a plain file) in {d}")
        if p.stat().st_size != size:
            raise ReleaseError(f"{path}: {p.stat().st_size} bytes, the manifest says {size}")
        if _hash_file(p, size) != digest:
            raise ReleaseError(f"{path}: its SHA-256 differs from the manifest's (tampered with or corrupted)")
        if path == "release_keys.json":
            try:
                ks = json.loads(p.read_text())
            except (ValueError, UnicodeDecodeError):
                ks = None
            if not (isinstance(ks, list) and 1 <= len(ks) <= 4
                    and all(isinstance(k, str) and re.fullmatch(r"[0-9a-fA-F]{64}", k) for k in ks)):
                raise ReleaseError("release_keys.json must be a JSON list of 1 to 4 Ed25519 public keys (hex)")


def read_release(d: Path, keys: list[bytes] | None = None) -> Manifest:
    """The manifest of release directory d, checked with every file (and
    the signature when keys are given)."""
    d = Path(d)
    cose = d / "manifest.cose"
    if not cose.is_file():
        raise ReleaseError(f"{d}: no manifest.cose (not a release directory)")
    m = parse(cose.read_bytes()[:MAX_MANIFEST + 1])
    if keys:
        check_signature(m, keys)
    check_files(m, d)
    return m


class ReleaseStore:
    """The releases a gateway serves, under `root` (see the module's doc)."""

    def __init__(self, root: Path, cache_bytes: int = 8 << 20, manifests: int = 16) -> None:
        self.root = Path(root)
        self.cache_bytes = cache_bytes
        self.manifests = manifests
        self._lock = threading.Lock()
        self._m: OrderedDict[tuple[str, int], Manifest | None] = OrderedDict()
        self._files: OrderedDict[tuple[str, int, int], bytes] = OrderedDict()
        self._held = 0
        self.damaged = 0                      # reads of a stored file that no longer matches its manifest

    def dir(self, board: str, seq: int) -> Path:
        return self.root / board / str(seq)

    def add(self, src: Path, keys: list[bytes]) -> tuple[Manifest, bool]:
        """Check and copy a release in; (its manifest, False when that very
        release was there already). ReleaseError when it fails a check or
        another release has its (board, seq)."""
        m = read_release(Path(src), keys)
        dest = self.dir(m.board, m.seq)
        if (dest / "manifest.cose").exists():
            if (dest / "manifest.cose").read_bytes() == m.cose:
                return m, False
            raise ReleaseError(f"the store already has another release {m.seq} for board {m.board} "
                               f"(digest {parse((dest / 'manifest.cose').read_bytes()).digest.hex()[:16]}); a "
                               "release's seq is never reused: build it with a new seq")
        (self.root / m.board).mkdir(parents=True, exist_ok=True)
        tmp = self.root / m.board / f".adding-{m.seq}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir(mode=0o700)
            names = [p for p, _, _ in m.files] + ["manifest.cose"] + \
                (["manifest.json"] if (Path(src) / "manifest.json").is_file() else [])
            for name in names:
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(Path(src) / name, tmp / name)
            check_files(m, tmp)               # what was copied, not only what was read
            if (tmp / "manifest.cose").read_bytes() != m.cose:
                raise ReleaseError("manifest.cose changed while it was copied")
            os.rename(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return m, True

    def list(self) -> list[Manifest]:
        out: list[Manifest] = []
        if not self.root.is_dir():
            return out
        for bd in sorted(self.root.iterdir()):
            if not bd.is_dir() or not valid_board(bd.name):
                continue
            for sd in bd.iterdir():
                if sd.name.isdigit() and (sd / "manifest.cose").is_file():
                    try:
                        out.append(parse((sd / "manifest.cose").read_bytes()))
                    except ReleaseError:
                        continue
        return sorted(out, key=lambda m: (m.board, m.seq))

    def manifest(self, board: str, seq: int) -> Manifest | None:
        """A stored release (cached; None when there is none)."""
        if not valid_board(board) or type(seq) is not int or not 1 <= seq <= 0xFFFFFFFF:
            return None
        key = (board, seq)
        with self._lock:
            if key in self._m:
                self._m.move_to_end(key)
                return self._m[key]
        p = self.dir(board, seq) / "manifest.cose"
        try:
            m: Manifest | None = parse(p.read_bytes()[:MAX_MANIFEST + 1]) if p.is_file() else None
        except (ReleaseError, OSError):
            m = None
        if m is not None and (m.board, m.seq) != key:
            m = None                          # a directory that is not what it says
        with self._lock:
            if m is not None:                 # misses are not cached: a later `fleet add` is seen at once
                self._m[key] = m
                while len(self._m) > self.manifests:
                    self._m.popitem(last=False)
        return m

    def piece(self, board: str, seq: int, file: int, off: int, n: int) -> tuple[int, bytes] | int:
        """(size of the whole file, up to n bytes from off) of file `file`
        (0: manifest.cose, i: the manifest's i-th file) of release seq for
        `board`, or an error code: E_TARGET (no such release or file for
        this board), E_RANGE (offset past the end)."""
        m = self.manifest(board, seq)
        if m is None or not 0 <= file <= len(m.files):
            return E_TARGET
        if file == 0:
            data = m.cose
            if off > len(data):
                return E_RANGE
            return len(data), data[off:off + n]
        path, size, want = m.files[file - 1]
        if off > size:
            return E_RANGE
        base = self.dir(board, seq).resolve()
        p = (base / path).resolve()
        if not p.is_relative_to(base):
            return E_TARGET                   # (cannot happen with a checked path; a symlink put in by hand)
        key = (board, seq, file)
        with self._lock:
            whole = self._files.get(key)
            if whole is not None:
                self._files.move_to_end(key)
        if whole is None and size <= self.cache_bytes // 8:
            try:
                whole = p.read_bytes()[:size]
            except OSError:
                return E_TARGET
            if hashlib.sha256(whole).digest() != want:
                # changed on disk since it was added: served as it is (the
                # board's own check refuses it), never cached, so a mended
                # store is served at once; counted and logged by the caller
                self.damaged += 1
                return size, whole[off:off + n]
            with self._lock:
                self._files[key] = whole
                self._held += len(whole)
                while self._held > self.cache_bytes and self._files:
                    self._held -= len(self._files.popitem(last=False)[1])
        if whole is not None:
            return size, whole[off:off + n]
        try:
            with open(p, "rb") as f:          # a big file: read the piece only
                f.seek(off)
                return size, f.read(min(n, size - off))
        except OSError:
            return E_TARGET
