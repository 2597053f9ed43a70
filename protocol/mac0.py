# A general COSE_Mac0 verifier (RFC 9052 section 6.2, HMAC of RFC 9053
# section 3.1), built on protocol/cose.py's HMAC: what the COSE working
# group's examples are run through (tests/shared/test_cose_wg.py). The
# PeerGrid profile itself is protocol/cose.py; a board never loads this.
import hashlib

from protocol import cbor
from protocol.cose import COSE_MAC0_TAG, HDR_ALG, HDR_CRIT, _ALGS, HmacKey, ALG_HMAC256, ct_equal, \
    mac_structure_tag
from protocol.errors import ProtocolError, E_NOT_COSE, E_HEADER, E_ALG, E_TAG

# Known header labels (RFC 9052 table 3); anything else in `crit` is refused.
_KNOWN_LABELS = (1, 2, 3, 4, 5, 6)


def alg_supported(alg):
    info = _ALGS.get(alg)
    return info is not None and hasattr(hashlib, info[0])


def hmac_sha256(key, data):
    return HmacKey(key, ALG_HMAC256).mac(data)


def _params(hdr):
    if not isinstance(hdr, dict):
        raise ProtocolError(E_HEADER, "header bucket is not a map")
    return hdr


def verify_mac0(frame, key, external_aad=b"", require_tag=True):
    """General Mac0 verification. `key` is raw key bytes. Returns
    (protected, unprotected, payload) or raises ProtocolError."""
    msg = cbor.loads(frame, max_depth=3, max_items=64, allow_tag=True, max_size=0)
    if isinstance(msg, cbor.Tag):
        if msg.tag != COSE_MAC0_TAG:
            raise ProtocolError(E_NOT_COSE, "tag %d is not COSE_Mac0" % msg.tag)
        msg = msg.value
    elif require_tag:
        raise ProtocolError(E_NOT_COSE, "untagged")
    if not isinstance(msg, list) or len(msg) != 4:
        raise ProtocolError(E_NOT_COSE, "not an array of four")
    prot_raw, unprot, payload, tag = msg
    if not isinstance(prot_raw, bytes) or not isinstance(tag, bytes):
        raise ProtocolError(E_NOT_COSE, "protected and tag must be byte strings")
    if payload is None:
        raise ProtocolError(E_NOT_COSE, "detached payload not supported")
    if not isinstance(payload, bytes):
        raise ProtocolError(E_NOT_COSE, "payload must be a byte string")
    prot = _params(cbor.loads(prot_raw, max_depth=2) if prot_raw else {})
    unprot = _params(unprot)
    for label in prot:
        if label in unprot:
            raise ProtocolError(E_HEADER, "label %r in both buckets" % (label,))
    crit = prot.get(HDR_CRIT)
    if crit is not None:
        if not isinstance(crit, list) or not crit:
            raise ProtocolError(E_HEADER, "bad crit")
        for label in crit:
            if label not in _KNOWN_LABELS:
                raise ProtocolError(E_HEADER, "critical label %r not understood" % (label,))
    alg = prot.get(HDR_ALG, unprot.get(HDR_ALG))
    if not isinstance(alg, int) or not alg_supported(alg):
        raise ProtocolError(E_ALG, "algorithm %r" % (alg,))
    k = HmacKey(key, alg)
    if len(tag) != k.tag_len:
        raise ProtocolError(E_TAG, "tag length %d" % len(tag))
    # An empty protected map counts as the empty byte string in the
    # MAC_structure, whichever way the sender wrote it (h'' or h'A0').
    signed_prot = prot_raw if prot else b""
    if not ct_equal(mac_structure_tag(k, signed_prot, external_aad, payload), tag):
        raise ProtocolError(E_TAG, "MAC does not verify")
    return prot, unprot, payload
