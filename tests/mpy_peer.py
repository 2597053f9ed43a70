# MicroPython side of the cross-interpreter tests: reads one JSON request per
# line on stdin, answers one JSON line on stdout. Runs the same protocol/ code
# as a board.
import sys
import json
import binascii

from protocol import cbor, gateway_end, link
from protocol.errors import ProtocolError
from jsonx import to_json


def _maps(v):
    # Requests mark maps as {"$m": [[k, v], ...]} so key types survive JSON.
    if isinstance(v, dict):
        if "$b" in v:
            return binascii.unhexlify(v["$b"])
        if "$m" in v:
            return dict((_maps(k), _maps(x)) for k, x in v["$m"])
        return dict((k, _maps(x)) for k, x in v.items())
    if isinstance(v, list):
        return [_maps(x) for x in v]
    return v


def handle(req):
    op = req["op"]
    secret = binascii.unhexlify(req.get("secret", "00" * 32))
    c = req.get("community", "oak")
    d = req.get("device", "d3f9a2")
    if op == "reading":
        r = req["r"]
        dl = link.DeviceLink(c, d, secret)
        f = dl.reading(r["boot"], r["seq"], r["t"], r["flags"], r.get("vrms_dv"), r.get("freq_chz"),
                       r["ch"], r["nch"], r.get("inv"), r.get("bat"))
        return {"topic": dl.t_reading, "frame": binascii.hexlify(bytes(f)).decode()}
    if op in ("status", "ack"):
        dl = link.DeviceLink(c, d, secret)
        fields = _maps(req["fields"])
        f = dl.status(fields) if op == "status" else dl.ack(fields)
        return {"topic": dl.t_status if op == "status" else dl.t_ack,
                "frame": binascii.hexlify(bytes(f)).decode()}
    if op == "open_uplink":
        m = gateway_end.open_uplink(req["topic"], binascii.unhexlify(req["frame"]), lambda cc, dd: secret)[3]
        return {"msg": to_json(m)}
    if op == "open_cmd":
        dl = link.DeviceLink(c, d, secret)
        return {"msg": to_json(dl.open_command(req["topic"], binascii.unhexlify(req["frame"])))}
    if op == "cbor_roundtrip":
        v = cbor.loads(binascii.unhexlify(req["hex"]), max_depth=8, max_items=4096, max_container=1024)
        return {"value": to_json(v), "hex": binascii.hexlify(cbor.dumps(v, 65536)).decode()}
    if op == "cbor_encode":
        return {"hex": binascii.hexlify(cbor.dumps(_maps(req["value"]), 65536)).decode()}
    raise ValueError("unknown op " + op)


def main():
    while True:
        line = sys.stdin.readline()
        if not line:
            break
        try:
            out = handle(json.loads(line))
        except ProtocolError as e:
            out = {"error": e.code, "detail": str(e)}
        except Exception as e:  # noqa: BLE001 - report to the test, keep serving
            out = {"crash": "%s: %s" % (type(e).__name__, e)}
        sys.stdout.write(json.dumps(out) + "\n")


main()
