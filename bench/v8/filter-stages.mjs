// Runs the `filter-stages` wasm module (wasm32-wasip1) in node's V8, the tokenizer directory
// mounted read-only at /tokenizer. Run with `node --no-liftoff` to compile as Envoy's V8 does
// (TurboFan only).
//
// Usage: node --no-liftoff filter-stages.mjs FILTER_STAGES_WASM TOKENIZER_DIR ITERATIONS [WORKLOAD...]
import { readFile } from 'node:fs/promises';
import { argv, exit } from 'node:process';
import { WASI } from 'node:wasi';

const [wasmPath, tokenizerDir, ...rest] = argv.slice(2);
if (!wasmPath || !tokenizerDir) {
  console.error('usage: filter-stages.mjs FILTER_STAGES_WASM TOKENIZER_DIR ITERATIONS [WORKLOAD...]');
  exit(2);
}
const wasi = new WASI({
  version: 'preview1',
  args: ['filter-stages', '/tokenizer', ...rest],
  preopens: { '/tokenizer': tokenizerDir },
  returnOnExit: true,
});
const module = await WebAssembly.compile(await readFile(wasmPath));
const instance = await WebAssembly.instantiate(module, wasi.getImportObject());
exit(wasi.start(instance));
