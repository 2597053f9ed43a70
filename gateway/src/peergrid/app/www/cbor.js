// Deterministic CBOR (RFC 8949 4.2 with the RFC 7049 key order cbor2's
// canonical mode uses: shorter encoded keys first, then bytewise), for the
// messages a member signs. Integers, text, byte strings (Uint8Array),
// arrays and maps (plain objects) only: nothing a PeerGrid signature needs
// is a float.
"use strict";

const PGCBOR = (() => {
  const utf8 = new TextEncoder();

  function head(major, n, out) {
    if (n < 24) out.push((major << 5) | n);
    else if (n < 0x100) out.push((major << 5) | 24, n);
    else if (n < 0x10000) out.push((major << 5) | 25, n >> 8, n & 0xff);
    else if (n < 0x100000000) out.push((major << 5) | 26, (n >>> 24) & 0xff, (n >> 16) & 0xff, (n >> 8) & 0xff, n & 0xff);
    else {
      const hi = Math.floor(n / 0x100000000), lo = n >>> 0;
      out.push((major << 5) | 27, (hi >>> 24) & 0xff, (hi >> 16) & 0xff, (hi >> 8) & 0xff, hi & 0xff,
               (lo >>> 24) & 0xff, (lo >> 16) & 0xff, (lo >> 8) & 0xff, lo & 0xff);
    }
  }

  function enc(v, out) {
    if (typeof v === "number") {
      if (!Number.isSafeInteger(v)) throw new Error("only whole numbers are signed");
      if (v >= 0) head(0, v, out); else head(1, -1 - v, out);
    } else if (typeof v === "string") {
      const b = utf8.encode(v);
      head(3, b.length, out);
      for (const x of b) out.push(x);
    } else if (v instanceof Uint8Array) {
      head(2, v.length, out);
      for (const x of v) out.push(x);
    } else if (Array.isArray(v)) {
      head(4, v.length, out);
      for (const x of v) enc(x, out);
    } else if (v === true) out.push(0xf5);
    else if (v === false) out.push(0xf4);
    else if (v === null) out.push(0xf6);
    else if (typeof v === "object") {
      const items = Object.keys(v).map((k) => { const kb = []; enc(k, kb); const vb = []; enc(v[k], vb); return [kb, vb]; });
      items.sort((a, b) => {
        if (a[0].length !== b[0].length) return a[0].length - b[0].length;
        for (let i = 0; i < a[0].length; i++) if (a[0][i] !== b[0][i]) return a[0][i] - b[0][i];
        return 0;
      });
      head(5, items.length, out);
      for (const [kb, vb] of items) { for (const x of kb) out.push(x); for (const x of vb) out.push(x); }
    } else throw new Error("cannot encode " + typeof v);
  }

  return {
    encode(v) { const out = []; enc(v, out); return new Uint8Array(out); },
  };
})();
