// The PeerGrid member app: one page, no outside resources. The member's
// Ed25519 key is imported into WebCrypto as a non-extractable key and kept
// in this browser's IndexedDB; the gateway sees only signatures.
"use strict";

const $ = (id) => document.getElementById(id);
const hex = (b) => Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
const unhex = (s) => new Uint8Array(s.match(/../g).map((x) => parseInt(x, 16)));
const POLL_MS = Number(new URLSearchParams(location.search).get("poll") || 2000);

const PG = {
  session: null,          // {token, member, name}
  me: null,
  key: null,              // {community, member, pub, key: CryptoKey}
  timer: null,
};
window.PG = PG;

// -- the key store (IndexedDB) ---------------------------------------------------------

function idb() {
  return new Promise((ok, fail) => {
    const r = indexedDB.open("peergrid", 1);
    r.onupgradeneeded = () => r.result.createObjectStore("keys", { keyPath: "id" });
    r.onsuccess = () => ok(r.result);
    r.onerror = () => fail(r.error);
  });
}

async function keysStored() {
  const db = await idb();
  return new Promise((ok, fail) => {
    const r = db.transaction("keys").objectStore("keys").getAll();
    r.onsuccess = () => ok(r.result);
    r.onerror = () => fail(r.error);
  });
}

async function keyPut(rec) {
  const db = await idb();
  return new Promise((ok, fail) => {
    const t = db.transaction("keys", "readwrite");
    t.objectStore("keys").put(rec);
    t.oncomplete = () => ok();
    t.onerror = () => fail(t.error);
  });
}

async function keyDelete(id) {
  const db = await idb();
  return new Promise((ok) => {
    const t = db.transaction("keys", "readwrite");
    t.objectStore("keys").delete(id);
    t.oncomplete = () => ok();
  });
}

// pgmk1:<64 hex> -> a non-extractable signing key and its public key
async function importMemberKey(text) {
  const t = text.trim();
  if (!/^pgmk1:[0-9a-fA-F]{64}$/.test(t)) throw new Error("not a member key (pgmk1: and 64 hex digits)");
  if (!window.crypto || !crypto.subtle) throw new Error("this page needs https (or this computer) for the browser's cryptography");
  const seed = unhex(t.slice(6).toLowerCase());
  const pkcs8 = new Uint8Array(16 + 32);
  pkcs8.set(unhex("302e020100300506032b657004220420"));
  pkcs8.set(seed, 16);
  // once extractable, only to read the public half; then again, not extractable
  const tmp = await crypto.subtle.importKey("pkcs8", pkcs8, { name: "Ed25519" }, true, ["sign"]);
  const jwk = await crypto.subtle.exportKey("jwk", tmp);
  const pub = hex(Uint8Array.from(atob(jwk.x.replace(/-/g, "+").replace(/_/g, "/")), (c) => c.charCodeAt(0)));
  const key = await crypto.subtle.importKey("pkcs8", pkcs8, { name: "Ed25519" }, false, ["sign"]);
  pkcs8.fill(0); seed.fill(0);
  return { pub, key };
}

async function sign(msg) {
  if (!PG.key) throw new Error("no key: sign in again");
  const sig = await crypto.subtle.sign({ name: "Ed25519" }, PG.key.key, PGCBOR.encode(msg));
  return hex(new Uint8Array(sig));
}

// -- the gateway ---------------------------------------------------------------------

async function api(path, body, raw) {
  const opt = { method: body === undefined ? "GET" : "POST", headers: {} };
  if (PG.session) opt.headers.Authorization = "Bearer " + PG.session.token;
  if (body !== undefined) { opt.headers["Content-Type"] = "application/json"; opt.body = JSON.stringify(body); }
  const r = await fetch("/app/api/" + path, opt);
  if (r.status === 401 && PG.session && !path.startsWith("sign")) { signedOut("The session ended; sign in again."); }
  if (!r.ok) {
    let msg = r.status + "";
    try { msg = (await r.json()).error || msg; } catch (e) { /* not JSON */ }
    const err = new Error(msg); err.status = r.status; throw err;
  }
  return raw ? r : r.json();
}
PG.api = api;
PG.sign = sign;

function showError(e) {
  const el = $("error");
  el.textContent = e ? (e.message || String(e)) : "";
  el.hidden = !e;
}

// -- sign-in -------------------------------------------------------------------------

async function signIn(member, rec) {
  const ch = await api("challenge", { member });
  PG.key = rec;
  const sig = await sign(["peergrid sign-in", ch.community, member, unhex(ch.nonce)]);
  const s = await api("signin", { member, nonce: ch.nonce, sig });
  PG.session = s;
  sessionStorage.setItem("pg-session", JSON.stringify({ token: s.token, member: s.member, name: s.name, id: rec.id }));
  PG.me = await api("me");
  $("who").textContent = `member ${PG.me.member}${PG.me.name ? " · " + PG.me.name : ""} · ${PG.me.community}`;
  $("nav").hidden = false;
  if (!location.hash || location.hash === "#signin") location.hash = "#now"; else route();
}

function signedOut(msg) {
  PG.session = null; PG.me = null; PG.key = null;
  sessionStorage.removeItem("pg-session");
  $("nav").hidden = true;
  $("who").textContent = "";
  location.hash = "#signin";
  route();
  if (msg) showError(new Error(msg));
}

async function showStoredKeys() {
  const box = $("stored-keys");
  box.textContent = "";
  let keys = [];
  try { keys = await keysStored(); } catch (e) { return; }
  for (const k of keys) {
    const p = document.createElement("p");
    const b = document.createElement("button");
    b.type = "button"; b.className = "stored-signin"; b.dataset.member = k.member;
    b.textContent = `Sign in as member ${k.member} (${k.community})`;
    b.onclick = () => signIn(k.member, k).catch(showError);
    const f = document.createElement("button");
    f.type = "button"; f.textContent = "forget this key";
    f.onclick = async () => { await keyDelete(k.id); showStoredKeys(); };
    p.append(b, " ", f);
    box.append(p);
  }
}

$("import-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  showError(null);
  try {
    const member = Number($("in-member").value);
    let text = $("in-key").value;
    const file = $("in-keyfile").files[0];
    if (!text && file) text = await file.text();
    const k = await importMemberKey(text);
    $("in-key").value = "";
    const rec = { id: `${location.host}/${member}`, member, community: "", pub: k.pub, key: k.key };
    await signIn(member, rec);
    rec.community = PG.me.community;
    if (PG.me.key && PG.me.key !== k.pub) throw new Error("this key is not the one the community has for you");
    if ($("in-keep").checked) await keyPut(rec);
  } catch (e) { showError(e); }
});

$("signout").addEventListener("click", async () => {
  try { await api("signout", {}); } catch (e) { /* gone anyway */ }
  signedOut();
});

// -- pages ---------------------------------------------------------------------------

const PAGES = ["signin", "now", "history", "statements", "ledger", "votes", "limits"];

function route() {
  let page = (location.hash || "#signin").slice(1);
  if (!PAGES.includes(page) || (!PG.session && page !== "signin")) page = PG.session ? "now" : "signin";
  for (const p of PAGES) $("page-" + p).hidden = p !== page;
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("here", a.getAttribute("href") === "#" + page);
  clearInterval(PG.timer);
  PG.timer = null;
  showError(null);
  const load = { now: loadNow, history: () => loadHistory("day"), statements: loadStatements, ledger: loadLedger,
                 votes: loadVotes, limits: loadLimits, signin: showStoredKeys }[page];
  Promise.resolve(load()).catch(showError);
  if (page === "now") PG.timer = setInterval(() => loadNow().catch(showError), POLL_MS);
}
window.addEventListener("hashchange", route);

const fmt = (v, d = 0) => (v === null || v === undefined ? "–" : Number(v).toLocaleString("en", { maximumFractionDigits: d, minimumFractionDigits: d }));
const money = (minor) => (minor < 0 ? "-" : "") + (Math.abs(minor) / 100).toFixed(2);
const when = (t) => new Date(t * 1000).toLocaleString();

async function loadNow() {
  const d = await api(`m/${PG.session.member}/now`);
  const h = d.house;
  const sum = (k) => h.reduce((a, x) => a + (x[k] || 0), 0);
  const grid = sum("grid_w");
  $("house-grid-w").textContent = fmt(grid);
  $("house-flow").textContent = grid > 0 ? "buying" : grid < 0 ? "selling" : "balanced";
  $("house-import-kwh").textContent = fmt(sum("import_wh") / 1000, 3);
  $("house-export-kwh").textContent = fmt(sum("export_wh") / 1000, 3);
  const pv = h.some((x) => "pv_w" in x), bat = h.some((x) => "battery_w" in x);
  $("card-pv").hidden = !pv; $("card-bat").hidden = !bat;
  if (pv) $("house-pv-w").textContent = fmt(sum("pv_w"));
  if (bat) {
    $("house-bat-w").textContent = fmt(sum("battery_w"));
    const socs = h.filter((x) => x.battery_soc !== null && x.battery_soc !== undefined).map((x) => x.battery_soc);
    $("house-bat-soc").textContent = socs.length ? fmt(socs.reduce((a, b) => a + b) / socs.length, 1) : "–";
  }
  const ul = $("house-boards"); ul.textContent = "";
  for (const x of h) {
    const li = document.createElement("li");
    li.textContent = `${x.board}: ${x.online ? "online" : "offline"}${x.t ? ", last reading " + when(x.t) : ""}`;
    ul.append(li);
  }
  const newest = Math.max(0, ...h.map((x) => x.t || 0));
  $("now-age").textContent = newest ? `(${Math.max(0, d.t - newest)} s ago)` : "(no reading yet)";
  const dl = $("decisions"); dl.textContent = "";
  for (const x of d.decisions) {
    const li = document.createElement("li");
    li.textContent = `${when(x.t)}: ${x.load} ${x.on ? "on" : "off"} (${x.why})`;
    dl.append(li);
  }
  if (!d.decisions.length) dl.innerHTML = "<li>nothing switched lately</li>";
  const c = d.community;
  $("com-load-w").textContent = fmt(c.load_w);
  $("com-pv-w").textContent = fmt(c.pv_w);
  $("com-grid-w").textContent = fmt(c.grid_w);
  $("com-local").textContent = fmt(c.local_share, 1);
  $("com-online").textContent = `${c.online} of ${c.boards} boards online, ${c.houses} houses`;
}

function svgEl(name, attrs, text) {
  const e = document.createElementNS("http://www.w3.org/2000/svg", name);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

async function loadHistory(span) {
  const d = await api(`m/${PG.session.member}/series?span=${span}`);
  for (const b of document.querySelectorAll(".span-btn")) b.classList.toggle("here", b.dataset.span === span);
  const W = 720, H = 220, pad = 30;
  const svg = svgEl("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": "energy per " + (span === "day" ? "interval" : "day") });
  const rows = d.rows;
  const max = Math.max(1, ...rows.map((r) => Math.max(r.bought_local_wh + r.bought_grid_wh, r.sold_local_wh + r.sold_grid_wh)));
  const bw = rows.length ? (W - 2 * pad) / rows.length : 0;
  const mid = H / 2;
  svg.append(svgEl("line", { x1: pad, x2: W - pad, y1: mid, y2: mid, class: "axis" }));
  rows.forEach((r, i) => {
    const x = pad + i * bw, s = (mid - 10) / max;
    const bars = [["bought_grid_wh", -1, "grid"], ["bought_local_wh", -1, "local"], ["sold_local_wh", 1, "sold-local"], ["sold_grid_wh", 1, "sold-grid"]];
    let up = 0, down = 0;
    for (const [k, dir, cls] of bars) {
      const h = r[k] * s;
      if (h <= 0) continue;
      const y = dir < 0 ? mid - up - h : mid + down;
      if (dir < 0) up += h; else down += h;
      svg.append(svgEl("rect", { x: x + 0.5, y, width: Math.max(1, bw - 1), height: h, class: cls }));
    }
  });
  svg.append(svgEl("text", { x: pad, y: 14, class: "label" }, `bought (up) and sold (down), max ${fmt(max / 1000, 2)} kWh`));
  $("chart").textContent = "";
  $("chart").append(svg);
  const tb = $("history-table").querySelector("tbody"); tb.textContent = "";
  for (const r of rows.slice().reverse()) {
    const tr = document.createElement("tr");
    for (const v of [when(r.start), fmt(r.bought_local_wh / 1000, 3), fmt(r.bought_grid_wh / 1000, 3), fmt(r.sold_local_wh / 1000, 3),
      fmt(r.sold_grid_wh / 1000, 3), r.p_buy === null ? "–" : fmt(r.p_buy / 100, 4), money(r.paid), money(r.feed_in_only), money(r.saving)]) {
      const td = document.createElement("td"); td.textContent = v; tr.append(td);
    }
    tb.append(tr);
  }
  const t = d.total;
  $("history-total").textContent = `${rows.length} ${span === "day" ? "intervals" : "days"}: bought ${fmt(t.bought_local_wh / 1000, 3)} kWh locally and ` +
    `${fmt(t.bought_grid_wh / 1000, 3)} kWh from the grid, sold ${fmt((t.sold_local_wh + t.sold_grid_wh) / 1000, 3)} kWh; paid ${money(t.paid)} ${d.currency}, ` +
    `${money(t.feed_in_only)} buying from and selling to the grid alone (saved ${money(t.saving)}), ` +
    `${money(t.grid_only)} if exports earned nothing.`;
}
for (const b of document.querySelectorAll(".span-btn")) b.addEventListener("click", () => loadHistory(b.dataset.span).catch(showError));

function loadStatements() {
  const to = new Date(), from = new Date(Date.now() - 30 * 86400e3);
  if (!$("st-from").value) $("st-from").value = from.toISOString().slice(0, 10);
  if (!$("st-to").value) $("st-to").value = to.toISOString().slice(0, 10);
}
const stRange = () => [Math.floor(Date.parse($("st-from").value) / 1000), Math.floor(Date.parse($("st-to").value) / 1000) + 86400];

function save(blob, name) {
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob); a.download = name;
  document.body.append(a); a.click(); a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 5000);
}

$("statement-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  try {
    const [a, b] = stRange();
    const r = await api(`m/${PG.session.member}/statement.csv?from=${a}&to=${b}`, undefined, true);
    save(await r.blob(), `peergrid-member-${PG.session.member}-${$("st-from").value}-${$("st-to").value}.csv`);
  } catch (e) { showError(e); }
});

$("st-print").addEventListener("click", async () => {
  try {
    const [a, b] = stRange();
    const r = await api(`m/${PG.session.member}/statement.csv?from=${a}&to=${b}`, undefined, true);
    const lines = (await r.text()).trim().split("\n").map((l) => l.split(","));
    const box = $("printable"); box.textContent = "";
    box.append(Object.assign(document.createElement("h3"), { textContent: `Statement of member ${PG.me.member} (${PG.me.name}), ${PG.me.community}: ${$("st-from").value} to ${$("st-to").value}` }));
    const table = document.createElement("table");
    lines.forEach((cells, i) => {
      const tr = document.createElement("tr");
      for (const c of cells.slice(1)) tr.append(Object.assign(document.createElement(i ? "td" : "th"), { textContent: c }));
      table.append(tr);
    });
    const sum = (k) => lines.slice(1).reduce((s, l) => s + Math.round(Number(l[k]) * 100), 0);
    box.append(table, Object.assign(document.createElement("p"), { textContent: `Paid ${money(sum(6))}; with the grid alone ${money(sum(8))} (saved ${money(sum(9))}), ${money(sum(7))} if exports earned nothing (${PG.me.currency}). Every line follows from the signed ledger.` }));
    box.hidden = false;
    if (!navigator.webdriver) window.print();
  } catch (e) { showError(e); }
});

async function loadLedger() {
  const h = await api("ledger/head");
  $("ledger-height").textContent = h.height;
  $("ledger-hash").textContent = h.hash || "–";
  $("ledger-key").textContent = h.key || "–";
  // a ledger that got shorter since this browser last looked, or changed its key, is suspicious
  const k = `pg-head-${PG.me.community}`;
  const seen = JSON.parse(localStorage.getItem(k) || "null");
  let msg = seen ? `Last time this browser saw ${seen.height} entries (${when(seen.at)}).` : "This browser keeps the head to compare next time.";
  if (seen && (h.height < seen.height || (seen.key && h.key !== seen.key))) {
    msg = `WARNING: the ledger had ${seen.height} entries signed with key ${seen.key.slice(0, 16)}… when you last looked; ` +
      `now ${h.height} with key ${(h.key || "").slice(0, 16)}…. Tell the other members.`;
    $("ledger-memory").className = "warn";
  } else {
    $("ledger-memory").className = "";
    localStorage.setItem(k, JSON.stringify({ height: h.height, hash: h.hash, key: h.key, at: Math.floor(Date.now() / 1000) }));
  }
  $("ledger-memory").textContent = msg;
}
$("ledger-download").addEventListener("click", async () => {
  try { save(await (await api("ledger/export", undefined, true)).blob(), "ledger.cbor"); } catch (e) { showError(e); }
});

// -- votes ---------------------------------------------------------------------------

async function castBallot(proposal, vote) {
  const sig = await sign(["peergrid ballot", PG.me.community, proposal, PG.me.member, vote]);
  return api("ballot", { proposal, vote, sig });
}
PG.castBallot = castBallot;

async function loadVotes() {
  const d = await api("proposals");
  const r = d.rules;
  $("rules").textContent = `Quorum ${r.quorum_ppm / 1e4} % of members, accepted above ${r.majority_ppm / 1e4} % yes; ` +
    `${d.members.length} members. Fund: ${money(d.fund)}` +
    (d.payouts.length ? `; paid by vote: ${d.payouts.map((p) => `${money(p.amount)} to ${p.payee} (${p.purpose})`).join("; ")}.` : ".");
  const box = $("proposals"); box.textContent = "";
  if (!d.proposals.length) box.textContent = "No proposals yet.";
  for (const p of d.proposals) {
    const div = document.createElement("div");
    div.className = "proposal"; div.id = "proposal-" + p.id;
    const status = p.tally ? (p.tally.accepted ? `ACCEPTED: ${p.tally.yes} yes, ${p.tally.no} no of ${p.tally.eligible}` :
      `rejected: ${p.tally.yes} yes, ${p.tally.no} no of ${p.tally.eligible}${p.tally.quorum ? "" : " (no quorum)"}`) :
      p.open ? `open until ${when(p.deadline)}: ${p.votes} of ${p.of} have voted` : "voting closed, waiting for the tally";
    div.append(Object.assign(document.createElement("h3"), { textContent: `#${p.id} by member ${p.by}` }),
      Object.assign(document.createElement("p"), { textContent: p.text }),
      Object.assign(document.createElement("p"), { textContent: `in force from ${when(p.from)} if accepted · ${status}` }));
    if (p.my_vote) div.append(Object.assign(document.createElement("p"), { className: "my-vote", textContent: `You voted ${p.my_vote}.` }));
    else if (p.open && p.eligible) {
      for (const v of ["yes", "no"]) {
        const b = document.createElement("button");
        b.type = "button"; b.textContent = `Vote ${v}`; b.className = `vote-${v}`;
        b.onclick = async () => { try { await castBallot(p.id, v); await loadVotes(); } catch (e) { showError(e); } };
        div.append(b, " ");
      }
    }
    box.append(div);
  }
}

$("propose-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  try {
    const kind = $("pr-kind").value, vals = $("pr-values").value.split(",").map((s) => s.trim());
    const n = (i) => { const v = Number(vals[i]); if (!Number.isSafeInteger(v)) throw new Error("whole numbers, comma separated"); return v; };
    let change;
    if (kind === "tariff") change = { kind, tariff: [n(0), n(1), n(2), vals[3] || "sdr", vals[4] ? n(4) : 0, vals[5] ? n(5) : 0] };
    else if (kind === "feeder") change = { kind, import_w: n(0), export_w: n(1) };
    else if (kind === "interval") change = { kind, minutes: n(0) };
    else if (kind === "spend") change = { kind, amount: Math.round(Number(vals[0]) * 100), payee: vals[1] || "", purpose: vals.slice(2).join(", ") };
    else change = { kind, quorum_ppm: n(0), majority_ppm: n(1), vote_s: vals[2] ? n(2) : 0 };
    const deadline = Math.floor(Date.parse($("pr-deadline").value) / 1000);
    const from = Math.floor(Date.parse($("pr-from").value) / 1000);
    const sig = await sign(["peergrid proposal", PG.me.community, PG.me.member, change, from, deadline]);
    await api("propose", { change, from, deadline, sig });
    await loadVotes();
  } catch (e) { showError(e); }
});

// -- limits and partners ------------------------------------------------------------------

async function loadLimits(d) {
  d = d || await api(`m/${PG.session.member}/limits`);
  $("lim-bid").value = d.bid ?? ""; $("lim-ask").value = d.ask ?? "";
  const t = d.tariff;
  $("tariff-line").textContent = t ? `Tariff now: retail ${t.retail}, feed-in ${t.feed_in}, grid fee ${t.grid_fee} per kWh (minor units), ` +
    `mechanism ${t.mechanism}. A preferred partner's discount is at most ${d.max_discount}.` : "";
  const ul = $("partners"); ul.textContent = "";
  for (const p of d.partners) {
    const li = document.createElement("li");
    const b = document.createElement("button");
    b.type = "button"; b.textContent = "remove";
    b.onclick = async () => { try { await loadLimits(await api(`m/${PG.session.member}/partner`, { buyer: p.buyer, remove: true })); } catch (e) { showError(e); } };
    li.append(`member ${p.buyer}, ${p.discount} below retail `, b);
    ul.append(li);
  }
  const sel = $("pa-buyer"); sel.textContent = "";
  for (const m of d.members) sel.append(Object.assign(document.createElement("option"), { value: m.member, textContent: `${m.member} ${m.name}` }));
}

$("limits-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  try {
    const v = (id) => ($(id).value === "" ? null : Number($(id).value));
    await loadLimits(await api(`m/${PG.session.member}/limits`, { bid: v("lim-bid"), ask: v("lim-ask") }));
  } catch (e) { showError(e); }
});
$("partner-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  try {
    await loadLimits(await api(`m/${PG.session.member}/partner`, { buyer: Number($("pa-buyer").value), discount: Number($("pa-discount").value) }));
  } catch (e) { showError(e); }
});

// -- start: a session of this tab survives a reload (the key is in IndexedDB) ----------------------

(async () => {
  const s = JSON.parse(sessionStorage.getItem("pg-session") || "null");
  if (s) {
    const rec = (await keysStored().catch(() => [])).find((k) => k.id === s.id);
    PG.session = s; PG.key = rec || null;
    try {
      PG.me = await api("me");
      $("who").textContent = `member ${PG.me.member}${PG.me.name ? " · " + PG.me.name : ""} · ${PG.me.community}`;
      $("nav").hidden = false;
    } catch (e) { PG.session = null; }
  }
  route();
})();
