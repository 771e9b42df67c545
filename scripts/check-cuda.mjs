#!/usr/bin/env node
// CI compile check for the CUDA kernels: compiles every cuda/*.cu with nvcc for sm_90a (the H100/H200
// target) without torch headers. CI cannot run kernels; this makes sure a broken kernel never lands.
// Skips, saying so, only when nvcc is absent. Two compiles at a time (CI machines have 2 cores).
import { spawn, spawnSync } from 'node:child_process';
import { mkdtempSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const cudaDir = join(root, 'cuda');
const nvcc = process.env.NVCC ?? 'nvcc';

const probe = spawnSync(nvcc, ['--version'], { encoding: 'utf8' });
if (probe.error || probe.status !== 0) {
  console.log(`check-cuda: SKIPPED, nvcc not found (${nvcc}); install the CUDA toolkit or set NVCC to check the kernels`);
  process.exit(0);
}
const sources = readdirSync(cudaDir).filter((f) => f.endsWith('.cu')).sort();
if (sources.length === 0) {
  console.error(`check-cuda: no .cu files in ${cudaDir}`);
  process.exit(1);
}
const out = mkdtempSync(join(tmpdir(), 'mosaickv-cuda-'));
const flags = ['-std=c++17', '-O3', '--expt-relaxed-constexpr', '--extended-lambda', '-Werror', 'all-warnings',
  '-gencode=arch=compute_90a,code=sm_90a', `-I${cudaDir}`, '-c'];
const jobs = Math.max(1, Number(process.env.CHECK_CUDA_JOBS ?? 2));
const started = Date.now();
let failed = 0;

function compile(src) {
  return new Promise((resolve) => {
    const t0 = Date.now();
    const child = spawn(nvcc, [...flags, join(cudaDir, src), '-o', join(out, `${src}.o`)], { stdio: ['ignore', 'pipe', 'pipe'] });
    let log = '';
    child.stdout.on('data', (d) => { log += d; });
    child.stderr.on('data', (d) => { log += d; });
    child.on('close', (code) => {
      const secs = ((Date.now() - t0) / 1000).toFixed(1);
      if (code === 0) {
        console.log(`check-cuda: ok   ${src} (${secs} s)`);
      } else {
        failed += 1;
        console.error(`check-cuda: FAIL ${src} (exit ${code})\n${log}`);
      }
      resolve();
    });
  });
}

const queue = [...sources];
await Promise.all(Array.from({ length: Math.min(jobs, queue.length) }, async () => {
  while (queue.length) await compile(queue.shift());
}));
rmSync(out, { recursive: true, force: true });
const total = ((Date.now() - started) / 1000).toFixed(0);
if (failed) {
  console.error(`check-cuda: ${failed} of ${sources.length} files failed to compile for sm_90a (${total} s)`);
  process.exit(1);
}
console.log(`check-cuda: ${sources.length} files compile for sm_90a (${total} s)`);
