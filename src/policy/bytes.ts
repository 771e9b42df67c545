// Bytes per token of one KV head in a mosaic cache: docs/FORMAT.md section 7 mirrored for the planner,
// amortised per token over whole segments (sinks, the dense window and pending tokens are per
// sequence, not per token, and vanish at long context). Tested against the Python cache's real
// `nbytes` in test/policy.test.ts.

export const SUMMARY_KINDS = ['mean', 'minmax', 'compact', 'compact_minmax'] as const;
export type SummaryKind = (typeof SUMMARY_KINDS)[number];

export const DTYPE_BYTES = { float32: 4, float16: 2, bfloat16: 2 } as const;
export type DType = keyof typeof DTYPE_BYTES;

/** How one mosaic stripe is laid out; the same for every layer and head of a plan. */
export interface Layout {
  headDim: number;
  dtype: DType;
  /** Element group g (one bitmap bit per g elements). */
  group: 1 | 2 | 4;
  /** Tokens per selection block B. */
  blockSize: number;
  summary: SummaryKind;
  /** m, the channels of a compact summary. */
  summaryChannels: number;
  segmentLen: number;
}

/** Mosaic's defaults (python/mosaickv/core/methods/mosaic.py) with 4096-token segments, the length
 *  FORMAT.md's analysis uses: at 1024 the per-segment rotations alone cost 1/8 of a bf16 segment. */
export function defaultLayout(headDim: number, dtype: DType): Layout {
  return { headDim, dtype, group: 1, blockSize: 8, summary: 'compact_minmax', summaryChannels: 16, segmentLen: 4096 };
}

export function checkLayout(l: Layout): void {
  if (!Number.isInteger(l.headDim) || l.headDim < 1) throw new RangeError(`headDim must be a positive integer, got ${l.headDim}`);
  if (!Object.hasOwn(DTYPE_BYTES, l.dtype)) throw new RangeError(`dtype must be one of ${Object.keys(DTYPE_BYTES).join(', ')}, got '${l.dtype}'`);
  if (![1, 2, 4].includes(l.group) || l.headDim % l.group) throw new RangeError(`group must be 1, 2 or 4 and divide headDim ${l.headDim}, got ${l.group}`);
  for (const [name, v] of [['blockSize', l.blockSize], ['summaryChannels', l.summaryChannels], ['segmentLen', l.segmentLen]] as const) {
    if (!Number.isInteger(v) || v < 1) throw new RangeError(`${name} must be a positive integer, got ${v}`);
  }
  if (!SUMMARY_KINDS.includes(l.summary)) throw new RangeError(`summary must be one of ${SUMMARY_KINDS.join(', ')}, got '${l.summary}'`);
}

/** Python's round(): halves go to the even neighbour, so that keeps match `fixed_strategy` exactly. */
function roundHalfEven(x: number): number {
  const f = Math.floor(x);
  const diff = x - f;
  if (diff > 0.5) return f + 1;
  if (diff < 0.5) return f;
  return f % 2 === 0 ? f : f + 1;
}

/** Kept elements per vector for a keep ratio: `max(g, round(r * D / g) * g)`, at most D (strategy.py). */
export function keptElements(keepRatio: number, headDim: number, group: number): number {
  if (!(keepRatio > 0 && keepRatio <= 1)) throw new RangeError(`keep ratio must be in (0, 1], got ${keepRatio}`);
  return Math.min(headDim, Math.max(group, roundHalfEven((keepRatio * headDim) / group) * group));
}

/** Dense K+V bytes per token of one KV head: 2 * D * e. */
export function denseBytesPerToken(headDim: number, dtype: DType): number {
  return 2 * headDim * DTYPE_BYTES[dtype];
}

/**
 * Stored bytes per token of one KV head (K and V, same keep ratio), averaged over one full segment:
 * packed values + bitmaps + the two float32 rotations / L + block summaries (only when blocks are
 * selected, i.e. token ratio < 1) / L.
 */
export function mosaicBytesPerToken(layout: Layout, keepRatio: number, selects: boolean): number {
  const { headDim: d, group: g, blockSize: b, segmentLen: len, summaryChannels: m } = layout;
  const e = DTYPE_BYTES[layout.dtype];
  const k = keptElements(keepRatio, d, g);
  const perVector = k * e + 4 * Math.ceil(d / g / 32);
  const rotations = 2 * d * d * 4;
  const width = { mean: d, minmax: 2 * d, compact: m, compact_minmax: 2 * m }[layout.summary];
  const summaries = selects ? Math.ceil(len / b) * width * e : 0;
  return 2 * perVector + (rotations + summaries) / len;
}
