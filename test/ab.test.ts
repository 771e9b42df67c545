// `mosaickv ab` end to end on the real pipeline: Python task generation, one real worker process per
// method (model tiny-random: real Llama code, random weights, so the scores are noise and are not
// checked), the control plane, the printed table and the HTML report. Accuracy is measured in
// bench/results, not here.
import { resolve } from 'node:path';
import { describe, expect, it } from 'vitest';
import { formatTable, runAb, scoreOutput, workerFor } from '../src/ab/ab.js';
import { renderReport } from '../src/ab/report.js';

describe('mosaickv ab', () => {
  it('maps method names to worker backends and rejects unknown ones', () => {
    expect(workerFor('full', 3)).toEqual({ backend: 'stock', args: [] });
    expect(workerFor('mosaic:summary=mean', 3)).toEqual({
      backend: 'mosaickv',
      args: ['--backend-option', 'method=mosaic', '--backend-option', 'summary=mean', '--backend-option', 'cache=core', '--backend-option', 'budget_ratio=3'],
    });
    expect(workerFor('quest', 3).args).not.toContain('budget_ratio=3');
    expect(workerFor('kvpress:snapkv', 2).args).toEqual(['--backend-option', 'press=snapkv', '--backend-option', 'budget_ratio=2']);
    expect(() => workerFor('mosiac', 3)).toThrow(/unknown method 'mosiac'/);
    expect(() => workerFor('mosaic:keep_ratio', 3)).toThrow(/key=value/);
    // A plan file replaces the fitted budget and reaches the worker as an absolute path.
    expect(workerFor('mosaic:policy=bench/plan.json', 3).args).toEqual(
      ['--backend-option', 'method=mosaic', '--backend-option', `policy=${resolve('bench/plan.json')}`, '--backend-option', 'cache=core']);
  });

  it('maps the vllm engine to its stock and mosaickv backends', () => {
    expect(workerFor('stock', 3, 'vllm')).toEqual({ backend: 'stock', args: [] });
    expect(workerFor('mosaickv:keep_ratio=0.25:token_ratio=0.1', 3, 'vllm')).toEqual({
      backend: 'mosaickv', args: ['--backend-option', 'keep_ratio=0.25', '--backend-option', 'token_ratio=0.1'],
    });
    expect(() => workerFor('mosaic', 3, 'vllm')).toThrow(/for engine vllm: use stock or mosaickv/);
  });

  it('scores contained gold strings case-insensitively', () => {
    expect(scoreOutput(' 4835431.', ['4835431'])).toBe(1);
    expect(scoreOutput('ABCDE and fghij', ['abcde', 'FGHIJ', 'KLMNO', 'PQRST'])).toBe(0.5);
    expect(() => scoreOutput('x', [])).toThrow(/gold/);
  });

  it('runs a workload over two methods through the control plane', async () => {
    const seen: string[] = [];
    const r = await runAb({
      model: 'tiny-random', device: 'cpu', tasks: ['niah_single_1'], ctx: 400, samples: 1,
      methods: ['full', 'mosaic:keep_ratio=0.25'], budgetRatio: 3, progress: (d, t, l) => seen.push(`${d}/${t} ${l}`),
    });
    expect(seen).toEqual(['1/2 full niah_single_1', '2/2 mosaic:keep_ratio=0.25 niah_single_1']);
    const full = r.methods.full!;
    const mosaic = r.methods['mosaic:keep_ratio=0.25']!;
    // tiny-random: 2 layers x 2 KV heads x head_dim 16, float32 -> 512 dense bytes per token.
    expect(full.full_kv_bytes % 512).toBe(0);
    expect(full.kv_bytes).toBe(full.full_kv_bytes);
    expect(mosaic.full_kv_bytes).toBe(full.full_kv_bytes);
    // keep 1/4 of 16 elements in the format's own layout (ab runs mosaic with cache=core): well under
    // dense even with the rotations, sinks and window of a short prompt.
    expect(mosaic.kv_bytes).toBeLessThan(full.kv_bytes / 1.5);
    for (const m of [full, mosaic]) {
      expect(m.score).toBeGreaterThanOrEqual(0);
      expect(m.score).toBeLessThanOrEqual(100);
      expect(Object.keys(m.tasks)).toEqual(['niah_single_1']);
      expect(m.outputs.niah_single_1).toHaveLength(1);
    }
    expect(formatTable(r).split('\n')).toHaveLength(3);
    const html = renderReport(r);
    expect(html).toContain('<svg');
    expect(html).toContain('mosaic:keep_ratio=0.25');
  }, 300_000);
});
