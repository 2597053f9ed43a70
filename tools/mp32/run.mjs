// The tests' 32-bit MicroPython: the official WebAssembly port (npm package
// @micropython/micropython-webassembly-pyscript, pinned in package.json) run
// by Node.js, with the terms of an ESP32 where the port allows them:
//
//   * 32-bit: small ints are 31-bit, `time.ticks_ms()` wraps at 2^30;
//   * one capped heap: code (every module imported, from source or .mpy) and
//     data share the GC heap. The port grows its heap from the C heap on
//     demand; unless --grow is given the C heap is used up first, so the GC
//     heap stays at exactly --heap bytes (gc.mem_alloc() + free) and an
//     allocation past it raises MemoryError, as on a board.
//
// What it cannot do (README, "The 32-bit runtime"): floats are double, not
// single precision; there are no sockets (a JS module given with --js
// stands in); the port defers garbage collection to the moment control
// returns to JavaScript, so a long program must be a `step()` the runner
// calls again and again (--step) or it collects nothing.
//
//   node tools/mp32/run.mjs [--heap BYTES] [--grow] [--path DIR]... [--copy DIR:DEST]...
//                           [--sys DEST]... [--js NAME=FILE]... [--step] SCRIPT.py [ARGS...]
//
// --path DIR   copy DIR's .py/.mpy/.json files (recursively, no dot folders)
//              into the in-memory file system and put it on sys.path, in order
// --copy D:T   copy D's files to T in the in-memory file system (not on sys.path)
// --sys T      put the in-memory folder T on sys.path (in order with --path)
// --js N=F     register the JS module F (its default export: an object, or a
//              function (runtime) -> object) under the Python name N
// --step       after the script ran, call its global step() until it returns
//              a false value; each call is a top-level call, so the collector
//              runs between calls (the script measures its heap itself, with
//              gc.mem_alloc() at the start of a step)
// Exit code: 0, the SystemExit code, or 1 on an uncaught exception.
import fs from "node:fs";
import path from "node:path";
import { pathToFileURL } from "node:url";
import { loadMicroPython } from "@micropython/micropython-webassembly-pyscript";

const MAX_NEW_SPLIT = 128 * 1024 * 1024; // what the port's gc.mem_free() adds (its growth reserve)

function usage(msg) {
    process.stderr.write(`mp32: ${msg}\n`);
    process.exit(2);
}

const argv = process.argv.slice(2);
const opt = { heap: 2 * 1024 * 1024, grow: false, paths: [], copies: [], js: [], step: false };
while (argv.length && argv[0].startsWith("--")) {
    const a = argv.shift();
    if (a === "--heap") opt.heap = parseInt(argv.shift(), 10);
    else if (a === "--grow") opt.grow = true;
    else if (a === "--path") opt.paths.push(argv.shift());
    else if (a === "--sys") opt.paths.push(":" + argv.shift());
    else if (a === "--copy") opt.copies.push(argv.shift());
    else if (a === "--js") opt.js.push(argv.shift());
    else if (a === "--step") opt.step = true;
    else usage(`unknown option ${a}`);
}
if (!argv.length) usage("no script");
if (!(opt.heap > 4096)) usage("--heap needs a size in bytes");
const script = argv[0];

const write = (stream) => (line) => stream.write(line + "\n");

async function boot(heapsize) {
    return loadMicroPython({ heapsize, pystack: 4096, stdout: write(process.stdout), stderr: write(process.stderr) });
}

// The GC heap's usable size for a given --heap: the port spends part of
// the area on its allocation tables, so the area is sized until the heap
// the script sees (alloc + free) is exactly the cap.
async function bootCapped(cap) {
    let area = Math.ceil(cap * 1.033) + 1024;
    for (let i = 0; i < 8; i++) {
        const mp = await boot(area);
        const have = heapTotal(mp);
        if (have <= cap && cap - have < 64) return mp;     // the heap comes in 64-byte steps
        area += Math.round((cap - have) * 65.5 / 64);
    }
    usage(`cannot size a heap of ${cap} bytes`);
}

function heapTotal(mp) {
    mp.runPython("import gc\n_mp32_total = gc.mem_alloc() + gc.mem_free()\n");
    return mp.globals.get("_mp32_total") - MAX_NEW_SPLIT;
}

// Use up the C heap so that the GC heap cannot add an area: what is left
// (< 32 KB) serves the runtime's own small allocations.
function capHeap(mp) {
    const M = mp._module;
    const reserve = M._malloc(64 << 10);
    for (const sz of [1 << 24, 1 << 20, 1 << 16, 1 << 15, 1 << 12]) {
        while (M._malloc(sz)) {
            // keep it: the GC heap must not be able to grow into it
        }
    }
    // 64 KB back for the runtime's own small allocations (strings handed
    // between JS and Python): less than the GC heap, which only ever grows
    // by at least its own size, so it still cannot grow
    if (reserve) M._free(reserve);
}

function copyTree(FS, host, dest) {
    FS.mkdirTree(dest);
    if (!fs.statSync(host, { throwIfNoEntry: false })?.isDirectory()) usage(`no folder ${host}`);
    for (const ent of fs.readdirSync(host, { withFileTypes: true })) {
        if (ent.name.startsWith(".") || ent.name === "node_modules" || ent.name === "__pycache__") continue;
        const h = path.join(host, ent.name);
        const d = dest + "/" + ent.name;
        if (ent.isDirectory()) copyTree(FS, h, d);
        else if (/\.(py|mpy|json)$/.test(ent.name)) FS.writeFile(d, fs.readFileSync(h));
    }
}

// The port reports every failed growth of its memory on console.error; with
// the C heap used up on purpose (capHeap) those are expected, not news.
const consoleError = console.error;
console.error = (...a) => {
    if (typeof a[0] === "string" && a[0].startsWith("Cannot enlarge memory")) return;
    consoleError(...a);
};

const mp = opt.grow ? await boot(opt.heap) : await bootCapped(opt.heap);
if (!opt.grow) capHeap(mp);
const FS = mp.FS;
const sysPath = [];
for (const c of opt.copies) {
    const k = c.lastIndexOf(":");
    if (k < 1) usage(`--copy wants DIR:DEST, got ${c}`);
    copyTree(FS, path.resolve(c.slice(0, k)), c.slice(k + 1));
}
opt.paths.forEach((p, i) => {
    if (p.startsWith(":")) {
        sysPath.push(p.slice(1));
        return;
    }
    const dest = `/p${i}`;
    copyTree(FS, path.resolve(p), dest);
    sysPath.push(dest);
});
for (const spec of opt.js) {
    const eq = spec.indexOf("=");
    if (eq < 1) usage(`--js wants NAME=FILE, got ${spec}`);
    const mod = (await import(pathToFileURL(path.resolve(spec.slice(eq + 1))).href)).default;
    mp.registerJsModule(spec.slice(0, eq), typeof mod === "function" ? mod({ mp, argv: argv.slice(1) }) : mod);
}

// The script runs inside a Python try block that keeps the exception and
// returns: an exception that reaches JavaScript with the heap full can
// leave the port unable to convert it. The report is printed in a second
// top-level call, after the collector had its chance.
const BOOT = `
import sys
sys.path[:] = ${JSON.stringify(sysPath)} + [""]
sys.argv[:] = ${JSON.stringify(argv)}
_mp32 = [0, None, {"__name__": "__main__"}]

def _mp32_fail(e):
    _mp32[2].clear()
    if isinstance(e, SystemExit):
        c = e.args[0] if e.args else None
        if c is None:
            _mp32[0] = 0
        elif isinstance(c, int):
            _mp32[0] = c
        else:
            _mp32[0] = 1
            sys.stderr.write(str(c) + "\\n")
    else:
        _mp32[0] = 1
        _mp32[1] = e

def _mp32_run(path):
    try:
        with open(path) as f:
            src = f.read()
        code = compile(src, path, "exec")
        src = None
        exec(code, _mp32[2])
        return 1
    except BaseException as e:
        _mp32_fail(e)
        return 0

def _mp32_step():
    try:
        return 1 if _mp32[2]["step"]() else 0
    except BaseException as e:
        _mp32_fail(e)
        return 0

def _mp32_report():
    if _mp32[1] is not None:
        sys.print_exception(_mp32[1], sys.stderr)
    return _mp32[0]
`;

mp.runPython(BOOT);
FS.writeFile("/main.py", fs.readFileSync(script));
const g = mp.globals;
if (g.get("_mp32_run")("/main.py") && opt.step) {
    mp.runPython("_mp32_has_step = 'step' in _mp32[2]");
    if (!g.get("_mp32_has_step")) usage(`${script} has no step()`);
    const step = g.get("_mp32_step");
    while (step()) {
        // each call returns to JS: the port collects garbage here
    }
}
process.exitCode = g.get("_mp32_report")();
