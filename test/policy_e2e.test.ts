// Policy distribution end to end: a real WorkerPool, a real mosaickv worker (tiny-random) whose KV
// bytes change once it acks a published policy, and a worker joining late (stock backend) that is
// sent the current policy on its handshake and refuses it with a reason.
import { spawn, type ChildProcess } from 'node:child_process';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { WorkerPool, type WorkerInfo } from '../src/control/pool.js';
import type { HeadPolicyWire } from '../src/protocol/protocol.js';
import { waitFor } from './helpers.js';

const PYTHON = join(import.meta.dirname, '..', '.venv', 'bin', 'python');
// Small segments so that a ~300-token prompt is mostly packed (sinks and the dense window stay small).
// Keep every element first: the cache manager's page rows pad the values to 8 (the kernels' stride),
// so at head_dim 16 a policy's keep 2 stores half the row of keep 16 (keep 8 would store the same).
const OPTIONS = ['method=mosaic', 'keep_ratio=1.0', 'segment_len=64', 'window=16', 'n_sink=4'];
const PROMPT = Array.from({ length: 60 }, (_, i) => `item ${i} is ${(i * 7) % 13}.`).join(' ');

async function kvBytes(pool: WorkerPool): Promise<number> {
  for await (const event of pool.submit({ prompt: PROMPT }, { max_tokens: 1, temperature: 0 })) {
    if (event.type === 'done') return event.kvBytes;
  }
  throw new Error('the request ended without done');
}

describe('policy distribution', () => {
  const children: ChildProcess[] = [];
  let pool: WorkerPool | undefined;
  afterAll(async () => {
    await pool?.close();
    for (const c of children) c.kill('SIGKILL');
  });

  it('reaches the workers, changes real KV bytes, and is sent to a late joiner', async () => {
    pool = await WorkerPool.start({
      workers: [{ engine: 'hf', backend: 'mosaickv', model: 'tiny-random', args: OPTIONS.flatMap((o) => ['--backend-option', o]) }],
      log: () => undefined,
    });
    const info = (id: string): WorkerInfo | undefined => pool!.workerInfo().find((w) => w.id === id);
    expect(info('w0')).toMatchObject({ policyVersion: 0, policyRefused: null });
    const before = await kvBytes(pool);
    // The worker's cache manager (cache=manager, the default for mosaic) in the /metrics text: the
    // request ended, so every page is back in the pool.
    const metrics = pool.renderMetrics(await pool.workerStats());
    expect(metrics).toMatch(/^mosaickv_engine_cache_pages_used\{worker="w0"\} 0$/m);
    expect(metrics).toMatch(/^mosaickv_engine_cache_page_reserved_bytes\{worker="w0"\} [1-9]\d*$/m);

    const heads: HeadPolicyWire[] = [0, 1].flatMap((layer) => [0, 1].map((head) => ({ layer, head, keep_ratio: 0.125, token_ratio: 0.1, loss_threshold: 0.2 })));
    expect(() => pool!.publishPolicy([{ ...heads[0]!, keep_ratio: 0 }])).toThrow(/keep_ratio: must be > 0/);
    expect(pool.publishPolicy(heads)).toBe(1);
    await waitFor('w0 to ack policy 1', () => info('w0')?.policyVersion === 1, 30_000);
    const planned = await kvBytes(pool);
    // 2 of 16 elements kept instead of 16 (rows of 8 padded values instead of 16).
    expect(planned).toBeLessThan(0.8 * before);

    const late = spawn(PYTHON, ['-m', 'mosaickv.worker', '--connect', pool.endpoint, '--worker-id', 'late', '--engine', 'hf', '--model', 'tiny-random'], { stdio: 'ignore' });
    children.push(late);
    await waitFor('the late worker to answer policy 1', () => info('late')?.policyRefused ?? undefined, 120_000);
    expect(info('late')).toMatchObject({ state: 'ready', backend: 'stock', policyVersion: 0, policyRefused: { version: 1, reason: expect.stringMatching(/backend stock .* does not apply segment policies/) } });
    expect(info('w0')?.policyVersion).toBe(1);
  });
});
