// Counters and histograms kept by the pool, rendered in the Prometheus text format (version 0.0.4).

const LATENCY_BUCKETS_S = [0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300];

export class Histogram {
  readonly counts = new Array<number>(LATENCY_BUCKETS_S.length).fill(0);
  sum = 0;
  count = 0;

  observe(seconds: number): void {
    this.sum += seconds;
    this.count += 1;
    LATENCY_BUCKETS_S.forEach((bound, i) => {
      if (seconds <= bound) this.counts[i]! += 1;
    });
  }

  render(name: string, help: string): string[] {
    const lines = [`# HELP ${name} ${help}`, `# TYPE ${name} histogram`];
    LATENCY_BUCKETS_S.forEach((bound, i) => lines.push(`${name}_bucket{le="${bound}"} ${this.counts[i]}`));
    lines.push(`${name}_bucket{le="+Inf"} ${this.count}`, `${name}_sum ${this.sum}`, `${name}_count ${this.count}`);
    return lines;
  }
}

/** Request outcome as counted in `mosaickv_requests_total{outcome=...}`. */
export type Outcome = 'stop' | 'length' | 'cancelled' | 'error';

export class PoolMetrics {
  readonly requests = new Map<Outcome, number>();
  /** Errors by catalogue code. */
  readonly errors = new Map<string, number>();
  promptTokens = 0;
  completionTokens = 0;
  retries = 0;
  restarts = 0;
  readonly latency = new Histogram();
  readonly firstToken = new Histogram();

  count(outcome: Outcome, code?: string): void {
    this.requests.set(outcome, (this.requests.get(outcome) ?? 0) + 1);
    if (code) this.errors.set(code, (this.errors.get(code) ?? 0) + 1);
  }
}

function labelValue(value: string): string {
  return value.replace(/\\/g, '\\\\').replace(/"/g, '\\"').replace(/\n/g, '\\n');
}

export interface GaugeSample {
  labels: Record<string, string>;
  value: number;
}

/** One metric family: `# HELP`, `# TYPE`, then a sample per label set. */
export function family(name: string, type: 'counter' | 'gauge', help: string, samples: GaugeSample[]): string[] {
  const lines = [`# HELP ${name} ${help}`, `# TYPE ${name} ${type}`];
  for (const { labels, value } of samples) {
    const entries = Object.entries(labels);
    const text = entries.length ? `{${entries.map(([k, v]) => `${k}="${labelValue(v)}"`).join(',')}}` : '';
    lines.push(`${name}${text} ${value}`);
  }
  return lines;
}

/**
 * Each worker's `stats.engine` map (engine and KV-backend numbers, e.g. the cache manager's
 * `cache_page_bytes`) as one gauge family per key, `mosaickv_engine_<key>{worker="..."}`. The map is
 * untyped on the wire: counters among them (`steps`, `cache_reencodes`) are exported as gauges too.
 */
export function engineFamilies(stats: readonly { worker_id: string; engine: Record<string, number> }[]): string[] {
  const byKey = new Map<string, GaugeSample[]>();
  for (const s of stats) {
    for (const [key, value] of Object.entries(s.engine)) {
      const samples = byKey.get(key) ?? [];
      samples.push({ labels: { worker: s.worker_id }, value });
      byKey.set(key, samples);
    }
  }
  return [...byKey.keys()].sort().flatMap((key) => family(
    `mosaickv_engine_${key.replace(/[^a-zA-Z0-9_]/g, '_')}`, 'gauge', `Engine number ${key} from each worker's stats.`, byKey.get(key)!,
  ));
}
