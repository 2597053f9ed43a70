# Ed25519 verification and SHA-512 (firmware/ed25519.py): RFC 8032 7.1 and
# FIPS 180-4 known answers, and every way a signature must be refused.
from firmware import ed25519
from util import unhex

# RFC 8032, 7.1: (public key, message, signature)
TEST1 = ("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a", "",
         "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46b"
         "d25bf5f0595bbe24655141438e7a100b")
TEST2 = ("3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c", "72",
         "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da085ac1e43e15996e458f3613d0f11d8c"
         "387b2eaeb4302aeeb00d291612bb0c00")
TEST3 = ("fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025", "af82",
         "6291d657deec24024827e69c3abe01a30ce548a284743a445e3680d7db5ac3ac18ff9b538d16f290ae67f760984dc659"
         "4a7c15e9716ed28dc027beceea1ec40a")
TEST1024 = (
    "278117fc144c72340f67d0f2316e8386ceffbf2b2428c9c51fef7c597f1d426e",
    "08b8b2b733424243760fe426a4b54908632110a66c2f6591eabd3345e3e4eb98fa6e264bf09efe12ee50f8f54e9f77b1"
    "e355f6c50544e23fb1433ddf73be84d879de7c0046dc4996d9e773f4bc9efe5738829adb26c81b37c93a1b270b20329d"
    "658675fc6ea534e0810a4432826bf58c941efb65d57a338bbd2e26640f89ffbc1a858efcb8550ee3a5e1998bd177e93a"
    "7363c344fe6b199ee5d02e82d522c4feba15452f80288a821a579116ec6dad2b3b310da903401aa62100ab5d1a36553e"
    "06203b33890cc9b832f79ef80560ccb9a39ce767967ed628c6ad573cb116dbefefd75499da96bd68a8a97b928a8bbc10"
    "3b6621fcde2beca1231d206be6cd9ec7aff6f6c94fcd7204ed3455c68c83f4a41da4af2b74ef5c53f1d8ac70bdcb7ed1"
    "85ce81bd84359d44254d95629e9855a94a7c1958d1f8ada5d0532ed8a5aa3fb2d17ba70eb6248e594e1a2297acbbb39d"
    "502f1a8c6eb6f1ce22b3de1a1f40cc24554119a831a9aad6079cad88425de6bde1a9187ebb6092cf67bf2b13fd65f270"
    "88d78b7e883c8759d2c4f5c65adb7553878ad575f9fad878e80a0c9ba63bcbcc2732e69485bbc9c90bfbd62481d9089b"
    "eccf80cfe2df16a2cf65bd92dd597b0707e0917af48bbb75fed413d238f5555a7a569d80c3414a8d0859dc65a46128ba"
    "b27af87a71314f318c782b23ebfe808b82b0ce26401d2e22f04d83d1255dc51addd3b75a2b1ae0784504df543af8969b"
    "e3ea7082ff7fc9888c144da2af58429ec96031dbcad3dad9af0dcbaaaf268cb8fcffead94f3c7ca495e056a9b47acdb7"
    "51fb73e666c6c655ade8297297d07ad1ba5e43f1bca32301651339e22904cc8c42f58c30c04aafdb038dda0847dd988d"
    "cda6f3bfd15c4b4c4525004aa06eeff8ca61783aacec57fb3d1f92b0fe2fd1a85f6724517b65e614ad6808d6f6ee34df"
    "f7310fdc82aebfd904b01e1dc54b2927094b2db68d6f903b68401adebf5a7e08d78ff4ef5d63653a65040cf9bfd4aca7"
    "984a74d37145986780fc0b16ac451649de6188a7dbdf191f64b5fc5e2ab47b57f7f7276cd419c17a3ca8e1b939ae49e4"
    "88acba6b965610b5480109c8b17b80e1b7b750dfc7598d5d5011fd2dcc5600a32ef5b52a1ecc820e308aa342721aac09"
    "43bf6686b64b2579376504ccc493d97e6aed3fb0f9cd71a43dd497f01f17c0e2cb3797aa2a2f256656168e6c496afc5f"
    "b93246f6b1116398a346f1a641f3b041e989f7914f90cc2c7fff357876e506b50d334ba77c225bc307ba537152f3f161"
    "0e4eafe595f6d9d90d11faa933a15ef1369546868a7f3a45a96768d40fd9d03412c091c6315cf4fde7cb68606937380d"
    "b2eaaa707b4c4185c32eddcdd306705e4dc1ffc872eeee475a64dfac86aba41c0618983f8741c5ef68d3a101e8a3b8ca"
    "c60c905c15fc910840b94c00a0b9d0",
    "0aab4c900501b3e24d7cdf4663326a3a87df5e4843b2cbdb67cbf6e460fec350aa5371b1508f9f4528ecea23c436d94b"
    "5e8fcd4f681e30a6ac00a9704a188a03")
L = (1 << 252) + 27742317777372353535851937790883648493


def _vec(v):
    return unhex(v[0]), unhex(v[1]), unhex(v[2])


def _flip(b, i):
    b = bytearray(b)
    b[i // 8] ^= 1 << (i % 8)
    return bytes(b)


def test_sha512_known_answers():
    # FIPS 180-4 / NIST examples: one block, empty, and 896 bits (two blocks)
    abc = unhex("ddaf35a193617abacc417349ae20413112e6fa4e89a97ea20a9eeee64b55d39a"
                "2192992a274fc1a836ba3c23a3feebbd454d4423643ce80e2a9ac94fa54ca49f")
    empty = unhex("cf83e1357eefb8bdf1542850d66d8007d620e4050b5715dc83f4a921d36ce9ce"
                  "47d0d13c5d85f2b0ff8318d2877eec2f63b931bd47417a81a538327af927da3e")
    m896 = (b"abcdefghbcdefghicdefghijdefghijkefghijklfghijklmghijklmn"
            b"hijklmnoijklmnopjklmnopqklmnopqrlmnopqrsmnopqrstnopqrstu")
    two = unhex("8e959b75dae313da8cf4f72814fc143f8f7779c6eb9f7fa17299aeadb6889018"
                "501d289e4900f7e4331b99dec4b5433ac7d329eeb6dd26545e96e55b874be909")
    for msg, want in ((b"abc", abc), (b"", empty), (m896, two)):
        assert ed25519.sha512(msg) == want
        assert ed25519.Sha512(msg).digest() == want      # the pure-Python one, on every interpreter
    assert ed25519.sha512(bytearray(b"abc")) == abc and ed25519.sha512(memoryview(b"abc")) == abc


def test_sha512_streams_in_pieces():
    data = bytes(i * 7 & 0xFF for i in range(300))
    whole = ed25519.Sha512(data).digest()
    assert whole == ed25519.sha512(data)
    for cut in (1, 5, 111, 127, 128, 129):
        s = ed25519.Sha512()
        for i in range(0, len(data), cut):
            s.update(memoryview(data)[i:i + cut])
        assert s.digest() == whole
        assert s.digest() == whole                       # digest() leaves the state usable
    s.update(b"x")
    assert s.digest() == ed25519.Sha512(data + b"x").digest()


def test_rfc8032_vectors():
    for v in (TEST1, TEST2, TEST3, TEST1024):
        pk, msg, sig = _vec(v)
        assert ed25519.verify(pk, msg, sig), v[0]
    pk, msg, sig = _vec(TEST3)
    assert ed25519.verify(bytearray(pk), memoryview(msg), memoryview(sig))


def test_a_flipped_bit_fails():
    pk, msg, sig = _vec(TEST2)
    assert not ed25519.verify(pk, _flip(msg, 3), sig)
    assert not ed25519.verify(pk, msg + b"\x00", sig)
    assert not ed25519.verify(pk, msg, _flip(sig, 9))            # in R
    assert not ed25519.verify(pk, msg, _flip(sig, 256 + 17))     # in S
    assert not ed25519.verify(_flip(pk, 40), msg, sig)
    assert not ed25519.verify(unhex(TEST1[0]), msg, sig)          # another key


def test_non_canonical_s_is_refused():
    pk, msg, sig = _vec(TEST1)
    s = int.from_bytes(sig[32:], "little")
    assert s < L
    for bad in (s + L, L, (1 << 256) - 1):
        assert not ed25519.verify(pk, msg, sig[:32] + bad.to_bytes(32, "little"))


def test_points_that_do_not_decode_are_refused():
    pk, msg, sig = _vec(TEST1)
    p = (1 << 255) - 19
    not_on_curve = (2).to_bytes(32, "little")               # y = 2: x^2 = (y^2-1)/(dy^2+1) has no root
    minus_zero = ((1 << 255) | 1).to_bytes(32, "little")     # y = 1, x = 0 with the sign bit set
    y_too_big = (p + 1).to_bytes(32, "little")               # y >= p: not canonical
    for bad in (not_on_curve, minus_zero, y_too_big):
        assert not ed25519.verify(bad, msg, sig)             # as the key
        assert not ed25519.verify(pk, msg, bad + sig[32:])   # as R


def test_wrong_lengths_and_types_are_false():
    pk, msg, sig = _vec(TEST1)
    for k, s in ((pk[:31], sig), (pk + b"\x00", sig), (pk, sig[:63]), (pk, sig + b"\x00"),
                 (b"", b""), (None, sig), (pk, None)):
        assert ed25519.verify(k, msg, s) is False
    assert ed25519.verify(pk, None, sig) is False
