# The names of the error codes of protocol/errors.py, as the gateway counts
# and reports them (PROTOCOL.md, section "Error codes"). A module of its own:
# a board that never puts an error into words never loads it.

NAMES = {
    0: "ok",
    1: "too_big", 2: "truncated", 3: "trailing", 4: "depth", 5: "indefinite",
    6: "duplicate_key", 7: "noncanonical", 8: "type", 9: "count", 10: "utf8",
    20: "not_cose", 21: "header", 22: "alg", 23: "kid", 24: "tag",
    25: "unknown_device",
    40: "topic", 41: "schema", 42: "version", 43: "replay", 44: "expired",
    45: "range", 46: "target", 47: "clock", 48: "plausibility",
}
