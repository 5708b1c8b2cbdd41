// Builds the web UI into controller/assets/ui/ (committed; embedded in the `bulkhead` binary).
// Reproducible: pinned versions (package-lock.json), no timestamps, no source paths in the
// output. `cargo xtask ui` runs `npm ci` and this; `cargo xtask test` builds into a temporary
// directory and fails if the result differs from the committed bundle.
//
//   node build.mjs [--out DIR]
import { build } from 'esbuild';
import { copyFileSync, mkdirSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const i = process.argv.indexOf('--out');
const out = resolve(i > 0 ? process.argv[i + 1] : join(here, '..', 'controller', 'assets', 'ui'));
mkdirSync(out, { recursive: true });

await build({
  absWorkingDir: here,
  entryPoints: ['src/main.js'],
  outfile: join(out, 'app.js'),
  bundle: true,
  format: 'iife',
  platform: 'browser',
  target: ['es2020'],
  minify: true,
  legalComments: 'eof',
  charset: 'utf8',
  logLevel: 'warning',
});
for (const f of ['index.html', 'app.css']) {
  copyFileSync(join(here, 'src', f), join(out, f));
}
console.log(`web UI built into ${out}`);
