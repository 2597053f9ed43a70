"""PeerGrid gateway (CPython side of the wire contract)."""
__version__ = "0.1.0"
