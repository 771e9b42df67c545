// `mosaickv plan`: a plan from telemetry (a JSON file, or measured now with --calibrate) or, without
// telemetry, the uniform plan from the model's shape (read through pythonia: light and synchronous).
import { spawn } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { PACKAGE_ROOT } from '../control/pool.js';
import { UsageError, type OptionsOf } from '../cli/options.js';
import { DTYPE_BYTES, type DType } from './bytes.js';
import { formatPlan, planFromTelemetry, uniformPlan, type ModelShape, type Plan, type PlanOptions, type Target, type Telemetry } from './planner.js';

/** The model's shape through pythonia (mosaickv.policy.shape_json, which uses the hf engine's loader). */
export async function readModelShape(model: string, python: string): Promise<ModelShape> {
  process.env.PYTHON_BIN = python; // pythonia reads it when first imported
  const { python: py } = await import('pythonia');
  try {
    const policy = await py('mosaickv.policy');
    return JSON.parse(String(await policy.shape_json(model))) as ModelShape;
  } finally {
    py.exit();
  }
}

/** Runs `python -m mosaickv.policy` (a forward pass: a child process, not the in-process bridge). */
export function calibrate(model: string, tokens: number, python: string): Promise<Telemetry> {
  return new Promise((resolve, reject) => {
    const child = spawn(python, ['-m', 'mosaickv.policy', '--model', model, '--tokens', String(tokens)], { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    child.stdout.on('data', (d: Buffer) => { out += d.toString(); });
    child.stderr.on('data', (d: Buffer) => { err += d.toString(); });
    child.on('error', (e) => reject(new Error(`cannot run ${python}: ${e.message}; run 'npm run setup:python' or pass --python`)));
    child.on('exit', (code) => {
      if (code === 0) resolve(JSON.parse(out) as Telemetry);
      else reject(new Error(`calibration failed (exit ${code}): ${err.trim().split('\n').slice(-3).join(' | ')}`));
    });
  });
}

/** What a plan is made from: `mosaickv plan`'s options (serve passes the subset it has). */
export type PlanArgs = Pick<OptionsOf<'plan'>, 'model' | 'target-ratio' | 'target-bytes' | 'telemetry' | 'calibrate' | 'tokens' | 'dtype' | 'segment-len' | 'token-ratio' | 'per-layer' | 'python'>;

/** The planner's options from the command line's. */
export function planOptions(o: Pick<PlanArgs, 'segment-len' | 'token-ratio' | 'per-layer'>): PlanOptions {
  return { layout: { segmentLen: o['segment-len'] }, tokenRatio: o['token-ratio'], perLayer: o['per-layer'] };
}

/** A plan from telemetry (a file, or measured now) or, without any, the uniform plan from the model's shape. */
export async function makePlan(o: PlanArgs): Promise<Plan> {
  const given = [o['target-ratio'], o['target-bytes']].filter((v) => v !== undefined);
  if (given.length !== 1) throw new UsageError('a plan needs exactly one of --target-ratio R (dense / planned bytes) or --target-bytes B (per token, all layers and KV heads)');
  if (o.telemetry && o.calibrate) throw new UsageError('--telemetry FILE and --calibrate are alternatives: pass one');
  const target: Target = o['target-ratio'] !== undefined ? { ratio: o['target-ratio'] } : { bytesPerToken: o['target-bytes']! };
  const python = o.python ?? join(PACKAGE_ROOT, '.venv', 'bin', 'python');
  const dtype = o.dtype as DType | undefined;
  if (dtype !== undefined && !Object.hasOwn(DTYPE_BYTES, dtype)) throw new UsageError(`--dtype must be one of ${Object.keys(DTYPE_BYTES).join(', ')}`);
  const options = planOptions(o);

  let plan: Plan;
  if (o.telemetry || o.calibrate) {
    const telemetry = o.telemetry ? JSON.parse(readFileSync(o.telemetry, 'utf8')) as Telemetry : await calibrate(o.model, o.tokens, python);
    plan = planFromTelemetry(dtype ? { ...telemetry, dtype } : telemetry, target, options);
    if (telemetry.overheadS !== undefined) process.stderr.write(`[mosaickv] telemetry: curves took ${telemetry.overheadS} s\n`);
  } else {
    const shape = await readModelShape(o.model, python);
    plan = uniformPlan(dtype ? { ...shape, dtype } : shape, target, options);
  }
  if (!plan.withinTolerance) {
    process.stderr.write(`[mosaickv] warning: the plan uses ${plan.bytesPerToken.toFixed(1)} of ${plan.targetBytesPerToken.toFixed(1)} bytes/token `
      + `(${(100 * (1 - plan.bytesPerToken / plan.targetBytesPerToken)).toFixed(1)}% under): ${plan.heads.length} heads are too few for the keep-ratio steps to land within 1%\n`);
  }
  return plan;
}

export async function runPlanCommand(o: OptionsOf<'plan'>): Promise<number> {
  const plan = await makePlan(o);
  process.stdout.write(o.json ? `${JSON.stringify(plan)}\n` : `${formatPlan(plan)}\n`);
  return 0;
}
