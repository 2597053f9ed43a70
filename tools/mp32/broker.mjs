// A loopback MQTT broker for the board on the 32-bit MicroPython, which has
// no sockets: tools/mp32/shim/usocket.py hands the board's bytes to this module
// (registered as the Python module `loop` by tools/mp32/run.mjs --js) and
// reads the answers back, synchronously. It speaks just enough MQTT 3.1.1
// for one board: CONNACK, SUBACK, PUBACK, PINGRESP; it records every PUBLISH
// the board sends, delivers the scenario's commands at QoS 1 when they are
// due, and goes down for the scenario's outages (open connections are cut,
// new ones refused).
//
// The scenario is a JSON file named by the environment variable PG_SOAK:
//   { "out": "<file for the record, one JSON object a line>",
//     "outages": [[start_ms, end_ms], ...],          board time since start
//     "commands": [{"at_ms": N, "topic": "...", "frame": "<hex>"}, ...] }
// The board's driver tells the broker the time with clock(ms).
import fs from "node:fs";

export default function broker() {
    const scen = JSON.parse(fs.readFileSync(process.env.PG_SOAK, "utf8"));
    const outFd = fs.openSync(scen.out, "w");
    const conns = new Map();
    let nextFd = 3;
    let now = 0;
    let pid = 0;
    const pending = scen.commands.slice().sort((a, b) => a.at_ms - b.at_ms);
    const counts = { connects: 0, refused: 0, publishes: 0, cut: 0, delivered: 0, cmd_acked: 0 };

    const record = (obj) => fs.writeSync(outFd, JSON.stringify(obj) + "\n");
    const down = () => scen.outages.some(([a, b]) => now >= a && now < b);

    function reply(c, bytes) {
        c.out.push(Uint8Array.from(bytes));
    }

    function packets(c) {
        // whole packets out of c.inb; the rest stays for the next write
        const got = [];
        for (;;) {
            const b = c.inb;
            if (b.length < 2) break;
            let len = 0, mul = 1, i = 1;
            for (;;) {
                if (i >= b.length) return got;
                const d = b[i++];
                len += (d & 0x7f) * mul;
                mul *= 128;
                if (!(d & 0x80)) break;
            }
            if (b.length < i + len) break;
            got.push([b[0], b.subarray(i, i + len)]);
            c.inb = b.slice(i + len);
        }
        return got;
    }

    function handle(c, type, body) {
        switch (type >> 4) {
        case 1: // CONNECT
            c.up = true;
            reply(c, [0x20, 2, 0, 0]);
            break;
        case 3: { // PUBLISH
            const tl = (body[0] << 8) | body[1];
            const topic = Buffer.from(body.subarray(2, 2 + tl)).toString("utf8");
            let p = 2 + tl;
            const qos = (type >> 1) & 3;
            let id = 0;
            if (qos) {
                id = (body[p] << 8) | body[p + 1];
                p += 2;
            }
            counts.publishes++;
            record({ ms: now, topic, retain: type & 1, payload: Buffer.from(body.subarray(p)).toString("hex") });
            if (qos === 1) reply(c, [0x40, 2, id >> 8, id & 0xff]);
            break;
        }
        case 4: // PUBACK of a command
            counts.cmd_acked++;
            break;
        case 8: { // SUBSCRIBE
            c.sub = true;
            reply(c, [0x90, 3, body[0], body[1], 1]);
            break;
        }
        case 12: // PINGREQ
            reply(c, [0xd0, 0]);
            break;
        case 14: // DISCONNECT
            c.closed = true;
            break;
        default:
            record({ ms: now, error: `unexpected packet type ${type}` });
            c.closed = true;
        }
    }

    function deliver() {
        const c = [...conns.values()].find((x) => x.sub && !x.closed);
        while (c && pending.length && pending[0].at_ms <= now) {
            const cmd = pending.shift();
            const topic = Buffer.from(cmd.topic, "utf8");
            const frame = Buffer.from(cmd.frame, "hex");
            pid = (pid % 65535) + 1;
            const len = 2 + topic.length + 2 + frame.length;
            const head = [0x32];
            for (let n = len; ; ) {
                head.push((n & 0x7f) | (n > 0x7f ? 0x80 : 0));
                n >>= 7;
                if (!n) break;
            }
            reply(c, [...head, topic.length >> 8, topic.length & 0xff, ...topic, pid >> 8, pid & 0xff, ...frame]);
            counts.delivered++;
            record({ ms: now, delivered: cmd.topic, at_ms: cmd.at_ms });
        }
    }

    return {
        clock(ms) {
            now = ms;
            if (down()) {
                for (const c of conns.values()) {
                    if (!c.closed) {
                        c.closed = true;
                        counts.cut++;
                    }
                }
            } else {
                deliver();
            }
            return 0;
        },
        connect() {
            if (down()) {
                counts.refused++;
                return -1;
            }
            counts.connects++;
            const fd = nextFd++;
            conns.set(fd, { inb: new Uint8Array(0), out: [], closed: false, up: false, sub: false });
            return fd;
        },
        send(fd, hex) {
            const c = conns.get(fd);
            if (!c || c.closed) return -1;
            const data = Buffer.from(hex, "hex");
            const inb = new Uint8Array(c.inb.length + data.length);
            inb.set(c.inb);
            inb.set(data, c.inb.length);
            c.inb = inb;
            for (const [type, body] of packets(c)) handle(c, type, body);
            deliver();
            return data.length;
        },
        // hex of up to n bytes; "" at the end of a closed connection; null:
        // nothing waiting (the answer to everything sent so far is here)
        recv(fd, n) {
            const c = conns.get(fd);
            if (!c) return "";
            if (!c.out.length) return c.closed ? "" : null;
            const first = c.out[0];
            const take = first.subarray(0, n);
            if (take.length === first.length) c.out.shift();
            else c.out[0] = first.subarray(n);
            return Buffer.from(take).toString("hex");
        },
        close(fd) {
            conns.delete(fd);
            return 0;
        },
        counts() {
            return JSON.stringify(counts);
        },
    };
}
