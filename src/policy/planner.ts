// The segment-policy planner: per layer x KV head, a keep ratio, a token ratio and a loss threshold
// under a memory target. More elements go where the energy loss falls steeply with them, fewer where
// it is flat: a greedy marginal-gain allocation over each head's lower convex hull of (bytes, loss),
// which is optimal for the convex relaxation, followed by a fill pass so that the discrete plan lands
// within 1% of the target. Deterministic: ties are broken by hull step, then layer, then head.
import type { HeadPolicyWire } from '../protocol/protocol.js';
import { checkLayout, denseBytesPerToken, defaultLayout, keptElements, mosaicBytesPerToken, type DType, type Layout } from './bytes.js';

/** Keep ratios the planner chooses from: FORMAT.md's size classes plus 1/16 (needed for 4x at D = 64). */
export const PLAN_KEEP_RATIOS = [0.0625, 0.125, 0.1875, 0.25, 0.375, 0.5, 0.75] as const;
/** The paper's token selection ratio, used where no recall curve says otherwise. */
export const DEFAULT_TOKEN_RATIO = 0.1;
/** A plan may fall short of its byte target by at most this fraction (it never exceeds it). */
export const TARGET_TOLERANCE = 0.01;

/** Telemetry of one layer x KV head. */
export interface HeadCurve {
  layer: number;
  head: number;
  /** loss[i] at keepRatios[i], in [0, 1]: the relative energy not kept (K and V averaged), or with
   *  `python -m mosaickv.policy --loss attention` the relative attention-output error of the prompts'
   *  last queries (which finds the retrieval heads that need precise keys). */
  loss: number[];
  /** Optional, informational (the allocation reads `loss`): energy[i], the relative energy not kept at
   *  keepRatios[i] after the rotation (K and V averaged), measured online beside an attention loss. */
  energy?: number[];
  /** Optional: recall[i] of full attention's mass captured when attending tokenRatios[i] of the blocks. */
  recall?: { tokenRatios: number[]; recall: number[] };
}

/** What the planner reads: a model's shape and, per layer and head, its curves (python/mosaickv/policy.py writes it). */
export interface Telemetry {
  model: string;
  nLayers: number;
  nKvHeads: number;
  headDim: number;
  dtype: DType;
  keepRatios: number[];
  curves: HeadCurve[];
  /** Seconds the producer spent on the curves (not the forward pass), for the overhead record. */
  overheadS?: number;
}

export type ModelShape = Pick<Telemetry, 'model' | 'nLayers' | 'nKvHeads' | 'headDim' | 'dtype'>;

/** Exactly one of the two: total bytes per token over all layers and KV heads, or dense bytes / plan bytes. */
export type Target = { bytesPerToken: number } | { ratio: number };

export interface PlanOptions {
  layout?: Partial<Layout>;
  /** Token ratio for heads without a recall curve (default 0.1). */
  tokenRatio?: number;
  /** With recall curves: the smallest token ratio whose recall reaches this (default 0.9). */
  minRecall?: number;
  /** One keep and token ratio per layer (all its KV heads) instead of one keep ratio per head. */
  perLayer?: boolean;
}

export interface HeadPolicy {
  layer: number;
  head: number;
  keepRatio: number;
  /** Kept elements per vector (what the cache stores). */
  keep: number;
  tokenRatio: number;
  /** The energy loss of the chosen keep ratio: a search-mode segment meeting it compresses at least as hard. */
  lossThreshold: number;
  bytesPerToken: number;
}

export interface Plan {
  model: string;
  source: 'telemetry' | 'uniform';
  layout: Layout;
  nLayers: number;
  nKvHeads: number;
  targetBytesPerToken: number;
  bytesPerToken: number;
  denseBytesPerToken: number;
  /** dense / planned bytes per token. */
  achievedRatio: number;
  /** False when the candidates are too coarse for the model's few heads to come within 1% of the target
   *  (the plan then stays under it); with dozens of heads this does not happen. */
  withinTolerance: boolean;
  /** Sum over heads of the chosen losses (what the allocation minimised). */
  totalLoss: number;
  heads: HeadPolicy[];
}

interface Point {
  index: number; // into keepRatios
  bytes: number;
  loss: number;
}

function checkTelemetry(t: Telemetry): void {
  for (const [name, v] of [['nLayers', t.nLayers], ['nKvHeads', t.nKvHeads]] as const) {
    if (!Number.isInteger(v) || v < 1) throw new RangeError(`telemetry ${name} must be a positive integer, got ${v}`);
  }
  if (!t.keepRatios.length || t.keepRatios.some((r) => !(r > 0 && r <= 1))) {
    throw new RangeError(`telemetry keepRatios must be a non-empty list in (0, 1], got [${t.keepRatios.join(', ')}]`);
  }
  const seen = new Set<string>();
  for (const c of t.curves) {
    const key = `${c.layer}/${c.head}`;
    if (!Number.isInteger(c.layer) || !Number.isInteger(c.head) || c.layer < 0 || c.layer >= t.nLayers || c.head < 0 || c.head >= t.nKvHeads) {
      throw new RangeError(`curve for layer ${c.layer} head ${c.head} is outside the model (${t.nLayers} layers x ${t.nKvHeads} KV heads)`);
    }
    if (seen.has(key)) throw new RangeError(`two curves for layer ${c.layer} head ${c.head}`);
    seen.add(key);
    if (c.loss.length !== t.keepRatios.length || c.loss.some((x) => !(x >= 0 && x <= 1))) {
      throw new RangeError(`curve for layer ${c.layer} head ${c.head}: needs ${t.keepRatios.length} losses in [0, 1] (one per keep ratio)`);
    }
    if (c.recall) {
      const { tokenRatios, recall } = c.recall;
      if (!tokenRatios.length || tokenRatios.length !== recall.length || tokenRatios.some((r) => !(r > 0 && r < 1)) || recall.some((x) => !(x >= 0 && x <= 1))) {
        throw new RangeError(`curve for layer ${c.layer} head ${c.head}: recall needs token ratios in (0, 1) and as many recalls in [0, 1]`);
      }
    }
  }
  if (seen.size !== t.nLayers * t.nKvHeads) {
    throw new RangeError(`telemetry has ${seen.size} curves; the model has ${t.nLayers} layers x ${t.nKvHeads} KV heads = ${t.nLayers * t.nKvHeads}`);
  }
}

/** The lower convex hull of (bytes, loss), cheapest first; collinear points are kept so that steps stay small. */
function lowerHull(points: Point[]): Point[] {
  const sorted = [...points].sort((a, b) => a.bytes - b.bytes || a.loss - b.loss);
  const useful: Point[] = [];
  for (const p of sorted) {
    // Same bytes as a cheaper-or-equal point, or no better loss than it: never worth buying.
    const last = useful.at(-1);
    if (last && (p.bytes === last.bytes || p.loss >= last.loss)) continue;
    useful.push(p);
  }
  const hull: Point[] = [];
  for (const p of useful) {
    while (hull.length >= 2) {
      const a = hull[hull.length - 2]!;
      const b = hull[hull.length - 1]!;
      // b lies strictly above the chord a-p: not convex, drop it.
      const cross = (b.bytes - a.bytes) * (p.loss - a.loss) - (b.loss - a.loss) * (p.bytes - a.bytes);
      if (cross < 0) hull.pop();
      else break;
    }
    hull.push(p);
  }
  return hull;
}

function targetBytes(target: Target, dense: number): number {
  if ('ratio' in target) {
    if (!(target.ratio >= 1)) throw new RangeError(`target ratio must be >= 1 (dense bytes / plan bytes), got ${target.ratio}`);
    return dense / target.ratio;
  }
  if (!(target.bytesPerToken > 0)) throw new RangeError(`target bytesPerToken must be > 0, got ${target.bytesPerToken}`);
  return target.bytesPerToken;
}

function tokenRatioFor(curve: HeadCurve, options: PlanOptions): number {
  if (!curve.recall) return options.tokenRatio ?? DEFAULT_TOKEN_RATIO;
  const minRecall = options.minRecall ?? 0.9;
  const order = curve.recall.tokenRatios.map((r, i) => [r, curve.recall!.recall[i]!] as const).sort((a, b) => a[0] - b[0]);
  return (order.find(([, rec]) => rec >= minRecall) ?? order.at(-1)!)[0];
}

/** Allocates keep ratios under `target` from measured curves. Throws RangeError on bad input or an unreachable target. */
export function planFromTelemetry(telemetry: Telemetry, target: Target, options: PlanOptions = {}, source: Plan['source'] = 'telemetry'): Plan {
  checkTelemetry(telemetry);
  const layout: Layout = { ...defaultLayout(telemetry.headDim, telemetry.dtype), ...options.layout };
  checkLayout(layout);
  const tokenRatio = options.tokenRatio ?? DEFAULT_TOKEN_RATIO;
  if (!(tokenRatio > 0 && tokenRatio <= 1)) throw new RangeError(`tokenRatio must be in (0, 1], got ${tokenRatio}`);
  // Token ratio 1 attends every block: no block selection, so no block summaries to store.
  const selects = tokenRatio < 1 || telemetry.curves.some((c) => c.recall);
  const curves = [...telemetry.curves].sort((a, b) => a.layer - b.layer || a.head - b.head);
  // A unit gets one keep ratio: one head, or with perLayer all heads of a layer (summed losses and bytes).
  const units: HeadCurve[][] = options.perLayer
    ? Array.from({ length: telemetry.nLayers }, (_, layer) => curves.filter((c) => c.layer === layer))
    : curves.map((c) => [c]);
  const hulls = units.map((group) => lowerHull(telemetry.keepRatios.map((r, index) => ({
    index, bytes: group.length * mosaicBytesPerToken(layout, r, selects), loss: group.reduce((s, c) => s + c.loss[index]!, 0),
  }))));
  const dense = denseBytesPerToken(layout.headDim, layout.dtype) * curves.length;
  const budget = targetBytes(target, dense);
  const sum = (pick: (h: Point[]) => Point) => hulls.reduce((s, h) => s + pick(h).bytes, 0);
  const lo = sum((h) => h[0]!);
  const hi = sum((h) => h.at(-1)!);
  if (budget < lo || budget * (1 - TARGET_TOLERANCE) > hi) {
    throw new RangeError(`target ${budget.toFixed(1)} bytes/token (ratio ${(dense / budget).toFixed(3)}) is out of reach: plans over keep ratios `
      + `[${telemetry.keepRatios.join(', ')}] span ${lo.toFixed(1)}-${hi.toFixed(1)} bytes/token (ratio ${(dense / hi).toFixed(3)}-${(dense / lo).toFixed(3)}); `
      + 'change the target, the keep ratios or the layout (a longer segment amortises rotations)');
  }

  // Greedy over all hull steps, steepest loss drop per byte first; a head whose next step does not fit
  // stops there (its later steps are flatter, and taking them would skip one).
  const at = hulls.map(() => 0);
  let used = lo;
  const steps = hulls.flatMap((h, u) => h.slice(1).map((p, j) => ({ u, j, cost: p.bytes - h[j]!.bytes, slope: (h[j]!.loss - p.loss) / (p.bytes - h[j]!.bytes) })));
  steps.sort((a, b) => b.slope - a.slope || a.j - b.j || a.u - b.u);
  const blocked = new Set<number>();
  for (const s of steps) {
    if (blocked.has(s.u) || at[s.u] !== s.j) continue;
    if (used + s.cost <= budget) {
      at[s.u] = s.j + 1;
      used += s.cost;
    } else {
      blocked.add(s.u);
    }
  }
  // Fill: the leftover is less than one step of each blocked head; spend it on the best single jump
  // (to any point of a head's hull) that still fits, until none does.
  for (;;) {
    let best: { u: number; to: number; gain: number; cost: number } | undefined;
    hulls.forEach((h, u) => {
      for (let to = at[u]! + 1; to < h.length; to++) {
        const cost = h[to]!.bytes - h[at[u]!]!.bytes;
        if (used + cost > budget) break;
        const gain = (h[at[u]!]!.loss - h[to]!.loss) / cost;
        if (!best || gain > best.gain) best = { u, to, gain, cost };
      }
    });
    if (!best) break;
    at[best.u] = best.to;
    used += best.cost;
  }

  // The heads of a layer share a token ratio, the largest any of them needs: a layer selects blocks
  // once per decode step (the hf backend refuses a policy that asks otherwise). Summary bytes do not
  // depend on the ratio, so this leaves the allocation above unchanged.
  const layerTokenRatio = new Map<number, number>();
  for (const c of curves) layerTokenRatio.set(c.layer, Math.max(layerTokenRatio.get(c.layer) ?? 0, tokenRatioFor(c, options)));
  const heads = units.flatMap((group, u): HeadPolicy[] => {
    const p = hulls[u]![at[u]!]!;
    const keepRatio = telemetry.keepRatios[p.index]!;
    const keep = keptElements(keepRatio, layout.headDim, layout.group);
    return group.map((c) => ({
      layer: c.layer, head: c.head, keepRatio, keep, tokenRatio: layerTokenRatio.get(c.layer)!, lossThreshold: c.loss[p.index]!, bytesPerToken: p.bytes / group.length,
    }));
  });
  const bytes = heads.reduce((s, h) => s + h.bytesPerToken, 0);
  return {
    model: telemetry.model, source, layout, nLayers: telemetry.nLayers, nKvHeads: telemetry.nKvHeads,
    targetBytesPerToken: budget, bytesPerToken: bytes, denseBytesPerToken: dense, achievedRatio: dense / bytes,
    withinTolerance: bytes >= budget * (1 - TARGET_TOLERANCE),
    totalLoss: heads.reduce((s, h) => s + h.lossThreshold, 0), heads,
  };
}

/**
 * The static plan when no telemetry exists: every head has the same prior curve (loss = 1 - keep
 * ratio, i.e. no head is known to be more compressible than another), so every head gets the same
 * keep ratio, or one of the two neighbouring ones where a single ratio cannot meet the target.
 */
export function uniformPlan(shape: ModelShape, target: Target, options: PlanOptions = {}, keepRatios: readonly number[] = PLAN_KEEP_RATIOS): Plan {
  const curves: HeadCurve[] = [];
  for (let layer = 0; layer < shape.nLayers; layer++) {
    for (let head = 0; head < shape.nKvHeads; head++) curves.push({ layer, head, loss: keepRatios.map((r) => 1 - r) });
  }
  return planFromTelemetry({ ...shape, keepRatios: [...keepRatios], curves }, target, options, 'uniform');
}

/** The plan as a text table, one row per layer (heads side by side). */
export function formatPlan(plan: Plan): string {
  const lines = [
    `plan for ${plan.model} (${plan.source}): ${plan.nLayers} layers x ${plan.nKvHeads} KV heads, head_dim ${plan.layout.headDim}, ${plan.layout.dtype}, segment ${plan.layout.segmentLen}, summary ${plan.layout.summary}`,
    `bytes/token: ${plan.bytesPerToken.toFixed(1)} planned, ${plan.targetBytesPerToken.toFixed(1)} target, ${plan.denseBytesPerToken} dense -> ratio ${plan.achievedRatio.toFixed(3)}`,
    ...(plan.source === 'uniform' ? ['no telemetry: the loss column is the prior 1 - keep ratio, not a measurement'] : []),
    '',
    `layer  ${Array.from({ length: plan.nKvHeads }, (_, h) => `h${h} keep/tok/loss`.padEnd(20)).join('')}`,
  ];
  for (let layer = 0; layer < plan.nLayers; layer++) {
    const row = plan.heads.filter((h) => h.layer === layer)
      .map((h) => `${h.keepRatio.toFixed(4)} ${h.tokenRatio.toFixed(2)} ${h.lossThreshold.toFixed(3)}`.padEnd(20)).join('');
    lines.push(`${String(layer).padStart(5)}  ${row}`);
  }
  return lines.join('\n');
}

/** A plan's heads as the `policy` message carries them (src/protocol/protocol.ts). */
export function policyHeads(plan: Plan): HeadPolicyWire[] {
  return plan.heads.map((h) => ({ layer: h.layer, head: h.head, keep_ratio: h.keepRatio, token_ratio: h.tokenRatio, loss_threshold: h.lossThreshold }));
}
