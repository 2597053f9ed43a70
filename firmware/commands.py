# Commands from the gateway, queued by the board (Board._on_cmd, the
# uplink's callback) and handled here in its loop: verified (topic and
# tag), decoded, applied to the outputs (firmware/outputs.py) and answered
# with a sealed acknowledgement. The counters stay on the Board (stats,
# rejects), where the console and the virtual board read them.
from protocol import link as plink
from protocol import messages
from protocol.topics import CMD
from protocol.errors import ProtocolError, OK


def handle(b, now):
    """Every queued command, oldest first."""
    while b.cmdq:
        topic, frame = b.cmdq.pop(0)
        try:
            payload = b.link.verify_command(topic, frame)
        except ProtocolError as e:
            # wrong topic or not authentic: counted, never answered
            b.rejects[e.code] = b.rejects.get(e.code, 0) + 1
            b.stats["cmd_ignored"] += 1
            continue
        try:
            cmd = messages.decode(CMD, payload)
        except ProtocolError as e:
            # authentic but malformed: answered if it has a counter
            b.rejects[e.code] = b.rejects.get(e.code, 0) + 1
            ctr = plink.command_counter(payload)
            if ctr is None:
                b.stats["cmd_ignored"] += 1
            else:
                b.stats["cmd_rejected"] += 1
                ack(b, ctr, e.code, None, 0)
            continue
        result, value, left = b.outputs.handle(cmd, now)
        if result == OK:
            b.stats["cmd_ok"] += 1
        else:
            b.stats["cmd_rejected"] += 1
            b.rejects[result] = b.rejects.get(result, 0) + 1
        ack(b, cmd["ctr"], result, value, left)
        b.hal.wdt_feed()
        if b.on_event is not None:
            b.on_event({"ev": "cmd", "ctr": cmd["ctr"], "result": result})


def ack(b, ctr, result, value, left):
    """Publish the acknowledgement of command `ctr`."""
    unix, synced = b.hal.time()
    fields = {"boot": b.boot, "seq": b._next_seq(), "t": unix,
              "flags": 0 if synced else messages.F_CLOCK_UNSYNCED,
              "ctr": ctr, "result": result, "lease": left}
    if value is not None:
        fields["value"] = value
    b.uplink.publish(b.link.t_ack, b.link.ack(fields))
