"""The wire contract shared by board and gateway (PROTOCOL.md): CBOR,
COSE, message schemas, topics, replay windows. Runs on MicroPython and
CPython alike; imports nothing but itself."""
