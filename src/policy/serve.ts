// `mosaickv serve --target-ratio R`: the plan published at start (from a telemetry file, else the
// uniform plan from the model's shape) and, with --replan-every K, a new plan from the workers' own
// telemetry after every K samples. One set of plan arguments serves both.
import type { WorkerPool } from '../control/pool.js';
import { makePlan, planOptions, type PlanArgs } from './command.js';
import { planFromTelemetry, policyHeads } from './planner.js';

/** Segment length the served plans amortise rotations over (the mosaic default for long prompts). */
export const SERVE_SEGMENT_LEN = 4096;

export interface ServePolicyArgs {
  model: string;
  targetRatio: number;
  telemetry?: string | undefined;
  tokenRatio: number;
  /** Re-plan after this many new telemetry samples (0: plan once). */
  replanEvery: number;
  python?: string | undefined;
  log: (line: string) => void;
}

export async function servePolicy(pool: WorkerPool, a: ServePolicyArgs): Promise<void> {
  const args: PlanArgs = {
    model: a.model, 'target-ratio': a.targetRatio, 'target-bytes': undefined, telemetry: a.telemetry, calibrate: false, tokens: 0,
    dtype: undefined, 'segment-len': SERVE_SEGMENT_LEN, 'token-ratio': a.tokenRatio, 'per-layer': false, python: a.python,
  };
  const plan = await makePlan(args);
  const version = pool.publishPolicy(policyHeads(plan));
  a.log(`policy ${version}: ${plan.source} plan at ${plan.achievedRatio.toFixed(2)}x less KV, published to every worker (GET /admin/workers shows what each runs)`);
  if (a.replanEvery <= 0) return;
  let lastPlanned = 0;
  pool.onTelemetry((model, samples) => {
    if (model !== a.model || samples - lastPlanned < a.replanEvery) return;
    lastPlanned = samples;
    const measured = pool.telemetry(model)!;
    try {
      const replan = planFromTelemetry(measured.telemetry, { ratio: a.targetRatio }, planOptions(args));
      const v = pool.publishPolicy(policyHeads(replan));
      const recall = pool.recall(model);
      const tokenRatios = [...new Set(replan.heads.map((h) => h.tokenRatio))].sort((x, y) => x - y);
      a.log(`policy ${v}: re-planned from ${samples} telemetry samples at ${replan.achievedRatio.toFixed(2)}x less KV `
        + `(mean attention loss ${(replan.totalLoss / replan.heads.length).toFixed(4)}; curves cost ${measured.meanOverheadS.toFixed(3)} s per sampled ${Math.round(measured.meanTokens)}-token prompt; `
        + `token ratios ${tokenRatios.join(', ')} ${recall ? `from the recall of ${recall.samples} sampled decode steps` : `(--token-ratio, no decode recall)`}), published`);
    } catch (err) {
      a.log(`re-plan from ${samples} telemetry samples failed, policy unchanged: ${(err as Error).message}`);
    }
  });
}
