#!/usr/bin/env node
// Runs the Python test suite inside the project's virtual environment.
import { spawnSync } from 'node:child_process';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const r = spawnSync(join(root, '.venv', 'bin', 'python'), ['-m', 'pytest', 'python/tests', ...process.argv.slice(2)], {
  stdio: 'inherit',
  cwd: root,
});
process.exit(r.status ?? 1);
