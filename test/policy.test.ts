// The policy planner: its byte formula against the real Python cache's nbytes, plans that meet the
// target within 1%, grow with it, favour steep heads and do not depend on input order; bad input
// refused with what was wrong; `mosaickv plan` with a telemetry file and, through pythonia, from a
// real model's config.
import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, describe, expect, it, vi } from 'vitest';
import { main } from '../src/cli/main.js';
import { parseCommandLine } from '../src/cli/options.js';
import { defaultLayout, denseBytesPerToken, mosaicBytesPerToken, type Layout } from '../src/policy/bytes.js';
import { PLAN_KEEP_RATIOS, TARGET_TOLERANCE, planFromTelemetry, uniformPlan, type Telemetry } from '../src/policy/planner.js';

const PYTHON = join(import.meta.dirname, '..', '.venv', 'bin', 'python');

describe('bytes per token (docs/FORMAT.md section 7)', () => {
  // Each case: a layout, a keep ratio and whether blocks are selected. One includes a keep that sits
  // exactly on .5 (2.5 elements: Python rounds half to even), a partial last block and g = 4.
  const cases: { layout: Layout; keepRatio: number; selects: boolean }[] = [
    { layout: { ...defaultLayout(64, 'bfloat16'), segmentLen: 256 }, keepRatio: 0.125, selects: true },
    { layout: { headDim: 32, dtype: 'float32', group: 2, blockSize: 4, summary: 'minmax', summaryChannels: 32, segmentLen: 128 }, keepRatio: 0.1875, selects: true },
    { layout: { headDim: 64, dtype: 'float16', group: 4, blockSize: 8, summary: 'mean', summaryChannels: 32, segmentLen: 200 }, keepRatio: 0.3, selects: true },
    { layout: { headDim: 32, dtype: 'float32', group: 1, blockSize: 8, summary: 'compact', summaryChannels: 8, segmentLen: 96 }, keepRatio: 0.078125, selects: true },
    { layout: { ...defaultLayout(32, 'float32'), segmentLen: 128 }, keepRatio: 0.5, selects: false },
  ];

  it('equals the real mosaic cache nbytes per token and KV head, over whole segments', () => {
    // The oracle: python/mosaickv/core encodes real tensors and counts the bytes of what it stores.
    const script = `
import json, sys, torch
from mosaickv.core import make_method
out = []
for c in json.loads(sys.argv[1]):
    l = c["layout"]
    m = make_method("mosaic", keep_ratio=c["keepRatio"], group=l["group"], block_size=l["blockSize"],
                    summary=l["summary"], summary_channels=l["summaryChannels"], segment_len=l["segmentLen"],
                    token_ratio=0.1 if c["selects"] else 1.0, n_sink=0, window=0)
    t, h = 2 * l["segmentLen"], 2
    g = torch.Generator().manual_seed(0)
    dt = getattr(torch, l["dtype"])
    k, v = (torch.randn(t, h, l["headDim"], generator=g).to(dt) for _ in range(2))
    cache = m.encode(k, v)
    out.append(cache.nbytes / (t * h))
print(json.dumps(out))`;
    const run = spawnSync(PYTHON, ['-c', script, JSON.stringify(cases)], { encoding: 'utf8', timeout: 90_000 });
    expect(run.stderr).not.toMatch(/Error/);
    const real = JSON.parse(run.stdout) as number[];
    expect(real).toHaveLength(cases.length);
    cases.forEach((c, i) => expect(mosaicBytesPerToken(c.layout, c.keepRatio, c.selects)).toBeCloseTo(real[i]!, 9));
  });
});

/** Synthetic but structured curves: head u's loss decays like (1 - r)^p with p from a fixed sequence,
 *  so heads differ in steepness; half the heads of layer 0 are nearly flat. */
function telemetry(nLayers = 8, nKvHeads = 4): Telemetry {
  const curves = [];
  for (let layer = 0; layer < nLayers; layer++) {
    for (let head = 0; head < nKvHeads; head++) {
      const p = 1 + ((layer * 7 + head * 3) % 11);
      const flat = layer === 0 && head < nKvHeads / 2;
      curves.push({ layer, head, loss: PLAN_KEEP_RATIOS.map((r) => (flat ? 0.02 * (1 - r) : (1 - r) ** p)) });
    }
  }
  return { model: 'synthetic', nLayers, nKvHeads, headDim: 64, dtype: 'bfloat16', keepRatios: [...PLAN_KEEP_RATIOS], curves };
}

describe('planner', () => {
  const t = telemetry();
  const ratios = Array.from({ length: 31 }, (_, i) => 1.5 + i * 0.1); // 1.5 .. 4.5

  it('meets every target within 1% without exceeding it, on telemetry and uniform plans', () => {
    for (const ratio of ratios) {
      for (const plan of [planFromTelemetry(t, { ratio }), uniformPlan(t, { ratio })]) {
        const target = plan.denseBytesPerToken / ratio;
        expect(plan.bytesPerToken).toBeLessThanOrEqual(target + 1e-9);
        expect(plan.bytesPerToken).toBeGreaterThanOrEqual(target * (1 - TARGET_TOLERANCE));
        expect(plan.withinTolerance).toBe(true);
        // The reported total is the sum of the heads' own formula values.
        const sum = plan.heads.reduce((s, h) => s + mosaicBytesPerToken(plan.layout, h.keepRatio, true), 0);
        expect(plan.bytesPerToken).toBeCloseTo(sum, 6);
      }
    }
  });

  it('is monotone in the target: more bytes never raise the loss', () => {
    const plans = ratios.map((ratio) => planFromTelemetry(t, { ratio })); // budgets shrink as the ratio grows
    for (let i = 1; i < plans.length; i++) {
      expect(plans[i]!.bytesPerToken).toBeLessThanOrEqual(plans[i - 1]!.bytesPerToken);
      expect(plans[i]!.totalLoss).toBeGreaterThanOrEqual(plans[i - 1]!.totalLoss - 1e-12);
    }
  });

  it('is deterministic and independent of the order of the curves', () => {
    const a = planFromTelemetry(t, { ratio: 3.3 });
    const shuffled = { ...t, curves: [...t.curves].reverse() };
    expect(planFromTelemetry(shuffled, { ratio: 3.3 })).toEqual(a);
    expect(planFromTelemetry(t, { ratio: 3.3 })).toEqual(a);
  });

  it('gives flat heads less than steep ones, and beats the uniform plan on total loss at the same bytes', () => {
    const plan = planFromTelemetry(t, { ratio: 3 });
    const keep = (layer: number, head: number) => plan.heads.find((h) => h.layer === layer && h.head === head)!.keepRatio;
    expect(keep(0, 0)).toBe(PLAN_KEEP_RATIOS[0]);
    expect(keep(0, 1)).toBe(PLAN_KEEP_RATIOS[0]);
    // Heads whose loss falls at least like (1 - r)^3 all get more than the smallest keep ratio.
    const steep = plan.heads.filter((h) => h.layer > 0 && 1 + ((h.layer * 7 + h.head * 3) % 11) >= 3);
    expect(steep.length).toBeGreaterThan(20);
    expect(Math.min(...steep.map((h) => h.keepRatio))).toBeGreaterThan(PLAN_KEEP_RATIOS[0]);
    const uniform = uniformPlan(t, { ratio: 3 });
    const uniformLoss = uniform.heads.reduce((s, h) => s + t.curves.find((c) => c.layer === h.layer && c.head === h.head)!.loss[PLAN_KEEP_RATIOS.indexOf(h.keepRatio as never)]!, 0);
    expect(plan.totalLoss).toBeLessThan(uniformLoss);
    // Loss thresholds are the chosen candidates' measured losses.
    for (const h of plan.heads) expect(h.lossThreshold).toBe(t.curves.find((c) => c.layer === h.layer && c.head === h.head)!.loss[PLAN_KEEP_RATIOS.indexOf(h.keepRatio as never)]);
  });

  it('uniform plans use one keep ratio, or two neighbouring ones where one cannot meet the target', () => {
    // D = 64, bf16, 4096-token segments: keep 1/8 costs exactly dense / 4.
    const exact = uniformPlan(t, { ratio: 4 });
    expect(new Set(exact.heads.map((h) => h.keepRatio))).toEqual(new Set([0.125]));
    for (const ratio of ratios) {
      const used = [...new Set(uniformPlan(t, { ratio }).heads.map((h) => PLAN_KEEP_RATIOS.indexOf(h.keepRatio as never)))].sort();
      expect(used.length).toBeLessThanOrEqual(2);
      if (used.length === 2) expect(used[1]! - used[0]!).toBe(1);
    }
  });

  it('per-layer plans give every head of a layer the same ratios, meet the target, and lose no less than per-head plans', () => {
    // 32 layers: with 8 the per-layer steps are too coarse for 1% (see withinTolerance).
    const deep = telemetry(32, 4);
    expect(planFromTelemetry(t, { ratio: 3 }, { perLayer: true }).withinTolerance).toBe(false);
    for (const ratio of [2, 3, 4]) {
      const layered = planFromTelemetry(deep, { ratio }, { perLayer: true });
      const target = layered.denseBytesPerToken / ratio;
      expect(layered.bytesPerToken).toBeLessThanOrEqual(target + 1e-9);
      expect(layered.bytesPerToken).toBeGreaterThanOrEqual(target * (1 - TARGET_TOLERANCE));
      for (let layer = 0; layer < deep.nLayers; layer++) {
        const own = layered.heads.filter((h) => h.layer === layer);
        expect(own).toHaveLength(deep.nKvHeads);
        expect(new Set(own.map((h) => `${h.keepRatio}/${h.tokenRatio}`)).size).toBe(1);
      }
      // Per-head allocation is the less constrained problem: at the same target it loses no more.
      expect(planFromTelemetry(deep, { ratio }).totalLoss).toBeLessThanOrEqual(layered.totalLoss + 1e-12);
    }
  });

  it('picks token ratios from recall curves: per layer, the smallest one reaching the recall every head wants', () => {
    // In odd layers head 1 needs 0.2 to reach 0.9; the layer's other heads follow it (one ratio per layer).
    const short = (c: { layer: number; head: number }) => c.layer % 2 === 1 && c.head === 1;
    const withRecall = { ...t, curves: t.curves.map((c) => ({ ...c, recall: { tokenRatios: [0.2, 0.05, 0.1], recall: [0.97, 0.6, short(c) ? 0.8 : 0.93] } })) };
    const plan = planFromTelemetry(withRecall, { ratio: 3 });
    for (const h of plan.heads) expect(h.tokenRatio).toBe(h.layer % 2 === 1 ? 0.2 : 0.1);
  });

  it('refuses bad telemetry and unreachable targets, saying what is allowed', () => {
    const dense = denseBytesPerToken(64, 'bfloat16') * 32;
    expect(() => planFromTelemetry(t, { ratio: 1.05 })).toThrow(/out of reach: .*span .*ratio 1\.\d+-5\.\d+/);
    expect(() => planFromTelemetry(t, { ratio: 9 })).toThrow(/out of reach/);
    expect(() => planFromTelemetry(t, { ratio: 0.5 })).toThrow(/target ratio must be >= 1/);
    expect(() => planFromTelemetry(t, { bytesPerToken: -dense })).toThrow(/bytesPerToken must be > 0/);
    expect(() => planFromTelemetry({ ...t, curves: t.curves.slice(1) }, { ratio: 3 })).toThrow(/31 curves; the model has 8 layers x 4 KV heads = 32/);
    expect(() => planFromTelemetry({ ...t, curves: [...t.curves.slice(1), t.curves[1]!] }, { ratio: 3 })).toThrow(/two curves for layer 0 head 1/);
    const bad = t.curves.map((c, i) => (i === 5 ? { ...c, loss: c.loss.map(() => 1.5) } : c));
    expect(() => planFromTelemetry({ ...t, curves: bad }, { ratio: 3 })).toThrow(/layer 1 head 1: needs 7 losses in \[0, 1\]/);
    expect(() => planFromTelemetry(t, { ratio: 3 }, { layout: { group: 3 as never } })).toThrow(/group must be 1, 2 or 4/);
    expect(() => planFromTelemetry(t, { ratio: 3 }, { tokenRatio: 0 })).toThrow(/tokenRatio must be in \(0, 1\]/);
  });

  it('stores no block summaries when every block is attended (token ratio 1)', () => {
    const t = telemetry();
    const withSummaries = planFromTelemetry(t, { ratio: 3 });
    const without = planFromTelemetry(t, { ratio: 3 }, { tokenRatio: 1 });
    // Same target bytes, but without summaries the elements are all the budget buys: more are kept.
    const kept = (p: typeof without) => p.heads.reduce((s, h) => s + h.keep, 0);
    expect(kept(without)).toBeGreaterThan(kept(withSummaries));
    expect(without.heads.every((h) => h.tokenRatio === 1)).toBe(true);
  });
});

describe('mosaickv plan', () => {
  const dir = mkdtempSync(join(tmpdir(), 'mosaickv-plan-'));
  afterAll(() => rmSync(dir, { recursive: true, force: true }));
  afterEach(() => vi.restoreAllMocks());

  async function run(args: string[]): Promise<{ code: number; out: string; err: string }> {
    let out = '';
    let err = '';
    vi.spyOn(process.stdout, 'write').mockImplementation((s) => { out += String(s); return true; });
    vi.spyOn(process.stderr, 'write').mockImplementation((s) => { err += String(s); return true; });
    const code = await main(args);
    vi.restoreAllMocks();
    return { code, out, err };
  }

  it('parses its options and needs exactly one target', async () => {
    expect(parseCommandLine(['plan', '--target-ratio', '4', '--json'], {})).toMatchObject({ command: 'plan', options: { 'target-ratio': 4, json: true, model: 'smollm2-135m', 'segment-len': 4096 } });
    const none = await run(['plan', '--telemetry', 'x.json']);
    expect(none.code).toBe(2);
    expect(none.err).toMatch(/exactly one of --target-ratio/);
  });

  it('plans from a telemetry file, as a table and as JSON with the achieved ratio', async () => {
    const file = join(dir, 'telemetry.json');
    writeFileSync(file, JSON.stringify(telemetry()));
    const json = await run(['plan', '--telemetry', file, '--target-ratio', '3.2', '--json']);
    expect(json.code).toBe(0);
    const plan = JSON.parse(json.out) as { achievedRatio: number; heads: unknown[]; source: string };
    expect(plan.source).toBe('telemetry');
    expect(plan.heads).toHaveLength(32);
    expect(json.err).toBe('');
    expect(plan.achievedRatio).toBeGreaterThanOrEqual(3.2);
    expect(plan.achievedRatio).toBeLessThanOrEqual(3.2 / (1 - TARGET_TOLERANCE));
    const table = await run(['plan', '--telemetry', file, '--target-ratio', '3.2']);
    expect(table.out.split('\n').filter((l) => /^ +\d+ {2}/.test(l))).toHaveLength(8);
    expect(table.out).toMatch(/-> ratio 3\.2\d\d/);
  });

  it('measures telemetry with --calibrate (a real forward pass) and plans from it', async () => {
    const res = await run(['plan', '--model', 'tiny-random', '--calibrate', '--tokens', '64', '--target-ratio', '2', '--json']);
    expect(res.code).toBe(0);
    expect(res.err).toMatch(/telemetry: curves took [\d.]+ s/);
    const plan = JSON.parse(res.out) as { source: string; heads: { lossThreshold: number; keepRatio: number }[] };
    expect(plan.source).toBe('telemetry');
    expect(plan.heads).toHaveLength(4);
    // Measured losses, not the uniform prior 1 - r.
    expect(plan.heads.some((h) => Math.abs(h.lossThreshold - (1 - h.keepRatio)) > 1e-3)).toBe(true);
  });

  it("plans uniformly from a real model's config read through pythonia, warning when 4 heads cannot land within 1%", async () => {
    // tiny-random: 2 layers x 2 KV heads, head_dim 16, float32 on CPU (python/mosaickv/engines/hf/models.py).
    // At D = 16 one keep-ratio step moves a head by 16 B of its 128 dense: ratio 2 cannot be met within 1%.
    const res = await run(['plan', '--model', 'tiny-random', '--target-ratio', '2', '--json']);
    expect(res.code).toBe(0);
    expect(res.err).toMatch(/warning: the plan uses [\d.]+ of 256\.0 bytes\/token \([\d.]+% under\): 4 heads are too few/);
    const plan = JSON.parse(res.out) as { source: string; nLayers: number; nKvHeads: number; layout: { headDim: number; dtype: string }; achievedRatio: number; withinTolerance: boolean };
    expect(plan).toMatchObject({ source: 'uniform', nLayers: 2, nKvHeads: 2, layout: { headDim: 16, dtype: 'float32' }, withinTolerance: false });
    expect(plan.achievedRatio).toBeGreaterThanOrEqual(2);
  });
});
