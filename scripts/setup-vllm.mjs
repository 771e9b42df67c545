#!/usr/bin/env node
// Creates vLLM's own Python environment, once per machine, and installs our package into it.
// vLLM 0.33.0 pins torch 2.14.0 (a CUDA build, several GB), which clashes with the project's
// .venv (torch 2.13.0 CPU), so it lives outside the work tree and is shared by every clone:
// ~/.cache/mosaickv/venv-vllm-0.33.0 (MOSAICKV_VLLM_VENV overrides). Two stamps keep it
// idempotent: one for vLLM itself (slow, once per machine), one for our package's metadata
// (fast, redone when python/pyproject.toml changes, e.g. the vllm.general_plugins entry point).
// Tests run with PYTHONPATH=<clone>/python, so each clone tests its own sources.
import { createHash } from 'node:crypto';
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { spawnSync } from 'node:child_process';
import { homedir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

export const VLLM_VERSION = '0.33.0';
const root = join(dirname(fileURLToPath(import.meta.url)), '..');
export const venv = process.env.MOSAICKV_VLLM_VENV ?? join(homedir(), '.cache', 'mosaickv', `venv-vllm-${VLLM_VERSION}`);
export const python = join(venv, 'bin', 'python');
// What our package and its vLLM tests need that vLLM 0.33.0 does not bring (it has pyzmq, gguf,
// transformers and torch; our wire protocol needs msgpack, our package declares gguf).
const EXTRA = ['pytest>=8', 'msgpack>=1.0', 'gguf>=0.10'];

function run(cmd, args) {
  console.log(`[setup-vllm] ${cmd} ${args.join(' ')}`);
  const t0 = Date.now();
  const r = spawnSync(cmd, args, { stdio: 'inherit', cwd: root });
  if (r.status !== 0) {
    console.error(`[setup-vllm] failed: ${cmd} ${args.join(' ')} (exit ${r.status}). Fix the error above and run 'node scripts/setup-vllm.mjs' again.`);
    process.exit(r.status ?? 1);
  }
  console.log(`[setup-vllm] done in ${((Date.now() - t0) / 1000).toFixed(0)} s`);
}

export function setupVllm() {
  const vllmStamp = join(venv, '.mosaickv-vllm');
  const vllmWant = `vllm==${VLLM_VERSION} ${EXTRA.join(' ')}`;
  if (!(existsSync(vllmStamp) && readFileSync(vllmStamp, 'utf8') === vllmWant)) {
    mkdirSync(dirname(venv), { recursive: true });
    const basePython = process.env.MOSAICKV_PYTHON ?? 'python3';
    if (!existsSync(python)) run(basePython, ['-m', 'venv', venv]);
    run(python, ['-m', 'pip', 'install', '-q', '--upgrade', 'pip']);
    run(python, ['-m', 'pip', 'install', '-q', `vllm==${VLLM_VERSION}`, ...EXTRA]);
    writeFileSync(vllmStamp, vllmWant);
  }
  const pkgStamp = join(venv, '.mosaickv-package');
  // The clone's path is part of the stamp: the editable install then points at the clone that ran last.
  const pkgWant = createHash('sha256').update(root).update(readFileSync(join(root, 'python', 'pyproject.toml'))).digest('hex');
  if (!(existsSync(pkgStamp) && readFileSync(pkgStamp, 'utf8') === pkgWant)) {
    // --no-deps: vLLM already brings torch, transformers, pyzmq, msgpack and gguf; letting pip
    // resolve our own torch>=2.4 again could only disturb vLLM's pin.
    run(python, ['-m', 'pip', 'install', '-q', '--no-deps', '-e', join(root, 'python')]);
    writeFileSync(pkgStamp, pkgWant);
  }
  return python;
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  setupVllm();
  console.log(`[setup-vllm] vLLM ${VLLM_VERSION} environment ready: ${venv}`);
}
