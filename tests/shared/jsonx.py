# JSON carriage for CBOR data model values between interpreters:
# bytes travel as {"$b": "<hex>"}, everything else as itself.
import binascii


def to_json(v):
    if isinstance(v, (bytes, bytearray)):
        return {"$b": binascii.hexlify(v).decode()}
    if isinstance(v, (list, tuple)):
        return [to_json(x) for x in v]
    if isinstance(v, dict):
        return [[to_json(k), to_json(x)] for k, x in v.items()]
    return v


def from_json(v, as_map=False):
    if isinstance(v, dict) and "$b" in v:
        return binascii.unhexlify(v["$b"])
    if isinstance(v, list):
        if as_map:
            return dict((from_json(k), from_json(x)) for k, x in v)
        return [from_json(x) for x in v]
    return v
