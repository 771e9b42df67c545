#!/usr/bin/env node
// Runs python/tests/vllm inside vLLM 0.33.0's own environment, creating it first if this machine
// has none (scripts/setup-vllm.mjs: about 5 minutes and 9.4 GB the first time, then reused).
// PYTHONPATH points at this clone's python/ so the tests exercise this clone's sources.
import { spawnSync } from 'node:child_process';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { setupVllm } from './setup-vllm.mjs';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const python = setupVllm();
const r = spawnSync(python, ['-m', 'pytest', 'python/tests/vllm', '-p', 'no:cacheprovider', ...process.argv.slice(2)], {
  stdio: 'inherit',
  cwd: root,
  env: { ...process.env, PYTHONPATH: join(root, 'python') },
});
process.exit(r.status ?? 1);
