#!/usr/bin/env python3
"""Write protocol/vectors/frames.json: the golden frames of the wire contract.

Valid frames are built with the reference code in protocol/ from the inputs
stored next to them ("build"), so the tests on both interpreters can build
them again and compare bytes. Invalid frames are made by hand from valid parts
(re-MACed where the defect must sit behind a good tag) and carry the error
code that both sides must report. Run after a deliberate protocol change only;
the diff of frames.json is then part of the review.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from protocol import cbor, cose, errors, gateway_end, link, messages, topics  # noqa: E402

SECRET = bytes(range(32))
OTHER = bytes(range(100, 132))
C, D = "oak", "d3f9a2"
T0 = 1795000000

READING = dict(boot=12, seq=4711, t=T0, flags=0, vrms_dv=2304, freq_chz=5001,
               ch=[-1520, 2412345, 1203456, 6800, 2890, 12, 3034567, 12600,
                   -800, 1345678, 1298765, 3500, 1210, 4567890, 0, 5300],
               nch=4, inv=[4, 2890, 6012345], bat=None)
READING_MIN = dict(boot=0, seq=0, t=946684805, flags=messages.F_CLOCK_UNSYNCED | messages.F_NO_VREF,
                   vrms_dv=None, freq_chz=None, ch=[412, 17, 0, 1790], nch=1, inv=None, bat=None)
READING_BAT = dict(boot=3, seq=70000, t=T0 + 10, flags=messages.F_BUFFERED | messages.F_INV_MISSING,
                   vrms_dv=2291, freq_chz=4998, ch=[-3200, 10, 88000, 14100, 3150, 91000, 12, 13800],
                   nch=2, inv=None, bat=[3, 3150, 874])
STATUS = dict(boot=12, seq=4712, t=T0, fw="0.1.0", cfg=bytes.fromhex("5e1d0c9a33b2f1e4"), reset=1,
              heap=81234, uptime=3600, buffered=0, online=1, board="devkitc-3ct")
WILL = dict(boot=12, seq=0, t=T0 - 3600, fw="0.1.0", cfg=bytes.fromhex("5e1d0c9a33b2f1e4"), reset=1,
            heap=90112, uptime=2, buffered=17, online=0, board="devkitc-3ct", dropped=0, lost_wh=3,
            flags=messages.F_CLOCK_UNSYNCED | messages.F_ENERGY_LOSS)
ACK = dict(boot=12, seq=4713, t=T0 + 1, ctr=5, result=0, value=1, lease=60)
ACK_REFUSED = dict(boot=12, seq=4714, t=T0 + 2, ctr=6, result=errors.E_TARGET)
CMD = dict(ctr=5, t=T0, lease=60, op=messages.OP_RELAY, target=0, value=1)
STATUS_TRIAL = dict(boot=13, seq=2, t=T0 + 900, fw="0.5.0", cfg=bytes.fromhex("5e1d0c9a33b2f1e4"), reset=4,
                    heap=80112, uptime=40, buffered=0, online=1, board="devkitc-3ct", tls=1, rel=8,
                    rel_dig=bytes.fromhex("9f86d081884c7d65"), ota=messages.OTA_TRIAL, ota_rel=8)
FWGET = dict(boot=12, seq=4720, t=T0 + 30, rel=8, file=3, off=2048, len=1024)
CMD_UPDATE = dict(ctr=7, t=T0 + 20, lease=3600, op=messages.OP_UPDATE, target=0, value=8)
CMD_BAT = dict(ctr=6, t=T0 + 5, lease=120, op=messages.OP_BATTERY, target=0, value=-2500)


def jsonable(fields):
    return {k: (v.hex() if isinstance(v, bytes) else v) for k, v in fields.items()}


def reading_frame(link_, r):
    return bytes(link_.reading(r["boot"], r["seq"], r["t"], r["flags"], r["vrms_dv"], r["freq_chz"],
                               r["ch"], r["nch"], r["inv"], r["bat"]))


def seal_raw(payload: bytes, topic: str, secret: bytes, alg: int, kid: bytes = D.encode(),
             downlink: bool = False) -> bytes:
    key = cose.derive_keys(secret)[1 if downlink else 0]
    return bytes(cose.Sealer(key, kid, alg).seal(payload, topic.encode()))


def main() -> None:
    dl = link.DeviceLink(C, D, SECRET)
    t_r, t_s, t_a, t_c = dl.t_reading, dl.t_status, dl.t_ack, dl.t_cmd
    vectors = []

    def ok(name, kind, topic, frame, build, note):
        if kind == topics.CMD:
            msg = dl.open_command(topic, frame)
        else:
            msg = gateway_end.open_uplink(topic, frame, lambda c, d: SECRET)[3]
        vectors.append(dict(name=name, kind=kind, topic=topic, secret=SECRET.hex(), frame=frame.hex(),
                            expect=0, error="ok", build=jsonable(build), message=jsonable(msg), note=note))

    def bad(name, kind, topic, frame, code, note, secret=SECRET, state=None):
        v = dict(name=name, kind=kind, topic=topic, secret=secret.hex() if secret else None,
                 frame=frame.hex(), expect=code, error=errors.NAMES[code], note=note)
        if state:
            v["state"] = state
        vectors.append(v)

    r_full = reading_frame(dl, READING)
    ok("reading_4ch_inverter", topics.READING, t_r, r_full, READING,
       "4 CT channels, voltage reference, inverter")
    ok("reading_minimal_unsynced", topics.READING, t_r, reading_frame(dl, READING_MIN), READING_MIN,
       "one channel, no voltage reference, clock not synced")
    ok("reading_battery_buffered", topics.READING, t_r, reading_frame(dl, READING_BAT), READING_BAT,
       "replayed from flash, inverter missing, battery present, seq beyond 16 bits")
    ok("status_birth", topics.STATUS, t_s, bytes(dl.status(STATUS)), STATUS, "retained birth message")
    ok("status_last_will", topics.STATUS, t_s, bytes(dl.status(WILL)), WILL,
       "retained last will, signed at connect time")
    ok("ack_applied", topics.ACK, t_a, bytes(dl.ack(ACK)), ACK, "command 5 applied")
    ok("ack_refused", topics.ACK, t_a, bytes(dl.ack(ACK_REFUSED)), ACK_REFUSED,
       "command 6 refused: no such output")
    ok("status_trial", topics.STATUS, t_s, bytes(dl.status(STATUS_TRIAL)), STATUS_TRIAL,
       "release 8 started on trial, waiting for its confirmation")
    ok("fwget_piece", topics.FWGET, dl.t_fwget, bytes(dl.fwget(FWGET)), FWGET,
       "asks for 1024 bytes of release 8's third file from offset 2048")
    cs = gateway_end.CommandSealer(C, D, SECRET)
    ok("cmd_update", topics.CMD, t_c, cs.seal(CMD_UPDATE), CMD_UPDATE, "fetch and install release 8")
    ok("cmd_relay_on", topics.CMD, t_c, cs.seal(CMD), CMD, "relay 0 on for 60 s")
    ok("cmd_battery_discharge", topics.CMD, t_c, cs.seal(CMD_BAT), CMD_BAT, "battery 0 discharges 2500 W")

    payload = cbor.loads(cbor.loads(r_full, allow_tag=True).value[2])
    good_payload = cbor.dumps(payload)

    def resealed(p: bytes, topic: str = t_r, alg: int = 4) -> bytes:
        return seal_raw(p, topic, SECRET, alg)

    forged = bytearray(r_full)
    forged[-1] ^= 0x01
    bad("forged_tag", topics.READING, t_r, bytes(forged), errors.E_TAG, "last tag byte flipped")
    bad("wrong_key", topics.READING, t_r, reading_frame(link.DeviceLink(C, D, OTHER), READING),
        errors.E_TAG, "sealed with another device's secret")
    bad("wrong_topic", topics.READING, "pg/elm/d3f9a2/reading", r_full, errors.E_TAG,
        "a valid frame moved to another community's topic (topic is the external AAD)")
    bad("kid_not_topic_device", topics.READING, "pg/oak/b71c04/reading", r_full, errors.E_KID,
        "device d3f9a2's frame published under device b71c04")
    bad("replay", topics.READING, t_r, r_full, errors.E_REPLAY, "(12, 4711) already accepted",
        state={"seen": [[12, 4711]]})
    bad("replay_old_boot", topics.READING, t_r, r_full, errors.E_REPLAY,
        "boot 12 is older than the four tracked boots", state={"seen": [[13, 0], [14, 0], [15, 0], [16, 0]]})
    bad("truncated", topics.READING, t_r, r_full[:-5], errors.E_TRUNCATED, "last 5 bytes cut off")
    bad("oversized", topics.READING, t_r, r_full + bytes(600 - len(r_full)), errors.E_TOO_BIG,
        "600 bytes, above the 512-byte frame limit")
    bad("trailing_bytes", topics.READING, t_r, r_full + b"\x00", errors.E_TRAILING, "one byte after the frame")
    bad("untagged", topics.READING, t_r, r_full[1:], errors.E_NOT_COSE, "COSE_Mac0 array without tag 17")
    bad("sign1_tag", topics.READING, t_r, b"\xd2" + r_full[1:], errors.E_NOT_COSE, "tag 18 instead of 17")
    bad("alg_downgrade_not_allowed", topics.STATUS, t_s, seal_raw(cbor.dumps(jsonable_status()), t_s, SECRET, 4),
        errors.E_ALG, "status sealed with the 64-bit tag, which only readings may use")
    bad("reading_with_downlink_key", topics.READING, t_r, seal_raw(good_payload, t_r, SECRET, 4, downlink=True),
        errors.E_TAG, "a reading sealed with the command key never verifies")
    bad("unknown_device", topics.READING, t_r, r_full, errors.E_UNKNOWN_DEVICE, "no secret registered",
        secret=None)
    deep = b"\xa1\x01" + b"\x81" * 10 + b"\x00"
    bad("deep_nesting", topics.READING, t_r, resealed(deep), errors.E_DEPTH,
        "payload nests arrays 10 deep behind a good tag")
    dup = bytearray(good_payload)
    # {1: 12, 1: 4711, ...}: make the second key equal to the first
    i = good_payload.index(b"\x02\x19\x12\x67")
    dup[i] = 0x01
    bad("duplicate_key", topics.READING, t_r, resealed(bytes(dup)), errors.E_DUPKEY,
        "key 1 twice in the payload")
    assert good_payload[1:7] == bytes.fromhex("010c02191267")
    unsorted = good_payload[:1] + good_payload[3:7] + good_payload[1:3] + good_payload[7:]
    bad("unsorted_keys", topics.READING, t_r, resealed(bytes(unsorted)), errors.E_NONCANONICAL,
        "key 2 before key 1")
    longform = b"\xa7\x01\x18\x0c" + good_payload[3:]
    bad("non_shortest_int", topics.READING, t_r, resealed(longform), errors.E_NONCANONICAL,
        "boot 12 encoded as 18 0c instead of 0c")
    indefinite = b"\xbf" + good_payload[1:] + b"\xff"
    bad("indefinite_map", topics.READING, t_r, resealed(indefinite), errors.E_INDEFINITE,
        "payload map of indefinite length")
    assert r_full[15] == 0x58
    env_long = r_full[:15] + b"\x59\x00" + r_full[16:]
    bad("non_shortest_bstr_head", topics.READING, t_r, env_long, errors.E_NONCANONICAL,
        "payload length written in two bytes instead of one")
    flt = cbor.dumps({1: 12, 2: 4711, 3: T0, 7: [1, 2, 3, 4]})[:-1] + b"\xf9\x3c\x00"
    bad("float_value", topics.READING, t_r, resealed(flt), errors.E_TYPE, "a half float where mA belongs")
    noseq = dict(payload)
    del noseq[2]
    bad("missing_field", topics.READING, t_r, resealed(cbor.dumps(noseq)), errors.E_SCHEMA, "no seq")
    volt = dict(payload)
    volt[5] = 20000
    bad("out_of_range", topics.READING, t_r, resealed(cbor.dumps(volt)), errors.E_RANGE, "2000.0 V")
    v2 = dict(payload)
    v2[0] = 2
    bad("newer_major_version", topics.READING, t_r, resealed(cbor.dumps(v2)), errors.E_VERSION,
        "payload of protocol version 2")
    v1 = dict(payload)
    v1[0] = 1
    bad("explicit_version_1", topics.READING, t_r, resealed(cbor.dumps(v1)), errors.E_NONCANONICAL,
        "version 1 must be left out")
    zero_flags = dict(payload)
    zero_flags[4] = 0
    bad("explicit_zero_flags", topics.READING, t_r, resealed(cbor.dumps(zero_flags)), errors.E_NONCANONICAL,
        "flags 0 must be left out")
    boolkey = bytes([good_payload[0]]) + good_payload[3:] + b"\xf5\x0c"
    bad("bool_map_key", topics.READING, t_r, resealed(boolkey), errors.E_TYPE,
        "key `true` where boot (1) belongs: a bool would compare equal to 1")
    bignum = bytes([good_payload[0] + 1]) + good_payload[1:] + b"\x0f\xc2\x49\x01" + bytes(8)
    bad("bignum_extension", topics.READING, t_r, resealed(bignum), errors.E_TYPE,
        "an extension field holding tag 2 (bignum): tags exist only as the envelope's 17")
    undef = bytes([good_payload[0] + 1]) + good_payload[1:] + b"\x0f\xf7"
    bad("undefined_extension", topics.READING, t_r, resealed(undef), errors.E_TYPE,
        "an extension field holding the simple value undefined")
    bad("bad_topic", topics.READING, "pg/oak/d3f9a2/readings", r_full, errors.E_TOPIC, "unknown kind")
    cmd = cs.seal(CMD)
    fcmd = bytearray(cmd)
    fcmd[-3] ^= 0x40
    bad("cmd_forged", topics.CMD, t_c, bytes(fcmd), errors.E_TAG, "command tag altered")
    bad("cmd_replayed", topics.CMD, t_c, cmd, errors.E_REPLAY, "counter 5 already used",
        state={"last_ctr": 5})
    up_cmd = seal_raw(cbor.dumps({1: 7, 2: T0, 3: 60, 4: 1, 5: 0, 6: 1}), t_c, SECRET, 5)
    bad("cmd_with_uplink_key", topics.CMD, t_c, up_cmd, errors.E_TAG,
        "a command sealed with the board's uplink key is refused")
    bad("cmd_on_reading_topic", topics.READING, t_r, seal_raw(cbor.dumps({1: 7, 2: T0, 3: 60, 4: 1, 5: 0, 6: 1}),
                                                              t_r, SECRET, 5), errors.E_ALG,
        "a command-shaped frame on the reading topic")

    out = ROOT / "protocol" / "vectors" / "frames.json"
    doc = {"about": "PeerGrid golden frames; made by tools/gen_vectors.py; see PROTOCOL.md",
           "vectors": vectors}
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"{len(vectors)} vectors -> {out.relative_to(ROOT)}")


def jsonable_status():
    return {1: 1, 2: 1, 3: T0, 5: "0.1.0", 6: b"\x00" * 8, 7: 1, 8: 1, 9: 1, 10: 0, 11: 1, 12: "x"}


if __name__ == "__main__":
    main()
