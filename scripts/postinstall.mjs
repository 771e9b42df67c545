#!/usr/bin/env node
// After `npm install` in a clone: build the TypeScript so that bin/mosaickv.js can run.
// Skipped when installed as a dependency (dist/ ships in the package).
import { existsSync } from 'node:fs';
import { spawnSync } from 'node:child_process';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
if (existsSync(join(root, 'src', 'index.ts')) && existsSync(join(root, 'node_modules', 'typescript'))) {
  const r = spawnSync(process.execPath, [join(root, 'node_modules', 'typescript', 'bin', 'tsc'), '-p', 'tsconfig.json'], {
    stdio: 'inherit',
    cwd: root,
  });
  process.exit(r.status ?? 1);
}
