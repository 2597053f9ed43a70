# The COSE working group's Mac0 examples through protocol.mac0.verify_mac0.
from protocol import cbor, cose, mac0
from protocol.errors import ProtocolError, E_ALG
from util import VECTORS, load_json, unhex, b64url

FILES = ["mac0-tests/HMac-01.json", "mac0-tests/mac-fail-01.json", "mac0-tests/mac-fail-02.json",
         "mac0-tests/mac-fail-03.json", "mac0-tests/mac-fail-04.json", "mac0-tests/mac-fail-06.json",
         "mac0-tests/mac-fail-07.json", "mac0-tests/mac-pass-01.json", "mac0-tests/mac-pass-02.json",
         "mac0-tests/mac-pass-03.json", "hmac-examples/HMac-enc-01.json", "hmac-examples/HMac-enc-02.json",
         "hmac-examples/HMac-enc-03.json", "hmac-examples/HMac-enc-04.json",
         "hmac-examples/HMac-enc-05.json"]
_ALG_NAMES = {"HS256/64": 4, "HS256": 5, "HS384": 6, "HS512": 7}


def _case(name):
    d = load_json(VECTORS + "/cose-wg/" + name)
    m = d["input"]["mac0"]
    key = b64url(m["recipients"][0]["key"]["k"])
    aad = unhex(m.get("external", ""))
    return d, key, aad, unhex(d["output"]["cbor"]), _ALG_NAMES[m["alg"]]


def test_every_mac0_case():
    passed = failed = unsupported = 0
    for name in FILES:
        d, key, aad, frame, alg = _case(name)
        must_fail = d.get("fail", False)
        if not mac0.alg_supported(alg):
            # e.g. HS384/HS512 on MicroPython, whose hashlib has sha256 only
            try:
                mac0.verify_mac0(frame, key, aad, require_tag=False)
            except ProtocolError as e:
                assert e.code == E_ALG, name
                unsupported += 1
                continue
            raise AssertionError(name + " verified without its hash")
        try:
            mac0.verify_mac0(frame, key, aad, require_tag=False)
        except ProtocolError as e:
            assert must_fail, "%s should pass: %s" % (name, e)
            failed += 1
        else:
            assert not must_fail, name + " should fail"
            passed += 1
    assert passed + failed + unsupported == len(FILES)
    assert passed + unsupported == 8 and failed == 7, (passed, failed, unsupported)


def test_mac_structure_matches_the_intermediate():
    # Our MAC_structure (built piece by piece while hashing) equals ToMac_hex.
    for name in FILES:
        d, key, aad, frame, alg = _case(name)
        if d.get("fail"):
            continue
        msg = cbor.loads(frame, max_depth=3, allow_tag=True)
        if isinstance(msg, cbor.Tag):
            msg = msg.value
        prot = msg[0] if msg[0] != b"\xa0" else b""
        to_mac = cbor.dumps(["MAC0", prot, aad, msg[2]])
        assert to_mac == unhex(d["intermediates"]["ToMac_hex"]), name


def test_hmac_against_rfc4231_case_2():
    # RFC 4231 test case 2: key "Jefe"
    tag = mac0.hmac_sha256(b"Jefe", b"what do ya want for nothing?")
    assert tag == unhex("5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843")


def test_long_key_is_hashed_first():
    # RFC 4231 test case 6: 131-byte key
    tag = mac0.hmac_sha256(b"\xaa" * 131, b"Test Using Larger Than Block-Size Key - Hash Key First")
    assert tag == unhex("60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54")


def test_constant_time_compare():
    assert cose.ct_equal(b"abc", b"abc")
    assert not cose.ct_equal(b"abc", b"abd")
    assert not cose.ct_equal(b"abc", b"ab")
