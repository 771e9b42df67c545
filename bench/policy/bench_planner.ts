// Planner speed in plain JavaScript over many layers x heads x candidates, to decide whether its
// arithmetic needs a native addon (issue 8, item 5). Run: npx vite-node bench/policy/bench_planner.ts [bench/policy/planner_speed.json]
import { writeFileSync } from 'node:fs';
import { PLAN_KEEP_RATIOS, planFromTelemetry, type Telemetry } from '../../src/policy/planner.js';

function synthetic(nLayers: number, nKvHeads: number): Telemetry {
  const curves = [];
  for (let layer = 0; layer < nLayers; layer++) {
    for (let head = 0; head < nKvHeads; head++) {
      const p = 1 + ((layer * 7 + head * 3) % 11);
      curves.push({ layer, head, loss: PLAN_KEEP_RATIOS.map((r) => (1 - r) ** p) });
    }
  }
  return { model: 'synthetic', nLayers, nKvHeads, headDim: 128, dtype: 'bfloat16', keepRatios: [...PLAN_KEEP_RATIOS], curves };
}

const rows = [];
for (const [nLayers, nKvHeads] of [[30, 3], [32, 8], [80, 8], [126, 16]] as const) {
  const t = synthetic(nLayers, nKvHeads);
  planFromTelemetry(t, { ratio: 3 }); // warm-up (JIT)
  const runs = 20;
  const start = performance.now();
  for (let i = 0; i < runs; i++) planFromTelemetry(t, { ratio: 2 + (i % 10) * 0.2 });
  const ms = (performance.now() - start) / runs;
  rows.push({ nLayers, nKvHeads, candidates: PLAN_KEEP_RATIOS.length, heads: nLayers * nKvHeads, msPerPlan: Number(ms.toFixed(3)) });
  process.stdout.write(`${nLayers} layers x ${nKvHeads} KV heads x ${PLAN_KEEP_RATIOS.length} candidates: ${ms.toFixed(2)} ms per plan\n`);
}
const out = process.argv[2];
if (out) writeFileSync(out, `${JSON.stringify({ bench: 'planner', node: process.version, rows }, null, 2)}\n`);
