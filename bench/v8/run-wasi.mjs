// Runs a wasm32-wasip1 program in node's V8: the benchmark's `filter-stages` and `route-loop`, or
// a test binary (`make test` runs kvmesh-core's unit tests so, as cargo's runner). Run with
// `node --no-liftoff` to compile as Envoy's V8 does (TurboFan only), and with
// `--single-threaded-gc`: node 20's concurrent marking has crashed while a large wasm memory grew.
//
// Usage: node run-wasi.mjs [--mount HOST_DIR:GUEST_DIR]... MODULE [ARG...]
//   e.g. node --no-liftoff --single-threaded-gc run-wasi.mjs \
//          --mount ~/.cache/kvmesh/tokenizers/qwen3:/tokenizer filter-stages.wasm /tokenizer 2000
//
// Programs that link the filter's router also carry its proxy-wasm entry points and host-call
// imports; they never call them, so the imports are stubs that throw, and only `_start` runs.
import { readFile } from 'node:fs/promises';
import { argv, exit } from 'node:process';
import { WASI } from 'node:wasi';

const preopens = {};
let rest = argv.slice(2);
while (rest[0] === '--mount') {
  const [host, guest] = (rest[1] ?? '').split(':');
  if (!host || !guest) {
    console.error('run-wasi.mjs: --mount takes HOST_DIR:GUEST_DIR');
    exit(2);
  }
  preopens[guest] = host;
  rest = rest.slice(2);
}
const [modulePath, ...args] = rest;
if (!modulePath) {
  console.error('usage: run-wasi.mjs [--mount HOST_DIR:GUEST_DIR]... MODULE [ARG...]');
  exit(2);
}
const wasi = new WASI({
  version: 'preview1',
  args: [modulePath.replace(/^.*\//, '').replace(/\.wasm$/, ''), ...args],
  env: { RUST_BACKTRACE: process.env.RUST_BACKTRACE ?? '0' },
  preopens,
  returnOnExit: true,
});
const module = await WebAssembly.compile(await readFile(modulePath));
const imports = wasi.getImportObject();
for (const { module: from, name, kind } of WebAssembly.Module.imports(module)) {
  if (from === 'env' && kind === 'function') {
    imports.env ??= {};
    imports.env[name] = () => {
      throw new Error(`host call ${name} outside Envoy`);
    };
  }
}
const instance = await WebAssembly.instantiate(module, imports);
// WASI refuses a module that also exports `_initialize` (the proxy-wasm entry point).
const { memory, _start } = instance.exports;
exit(wasi.start({ exports: { memory, _start } }));
