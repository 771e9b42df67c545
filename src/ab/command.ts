// The `mosaickv ab` command: runs the A/B, prints the table, writes the JSON and the HTML report.
import { mkdirSync, writeFileSync } from 'node:fs';
import { dirname, resolve } from 'node:path';
import { formatTable, progressBar, runAb } from './ab.js';
import { renderReport } from './report.js';
import { UsageError } from '../cli/options.js';

export interface AbCommandOptions {
  engine: string;
  model: string;
  device?: string | undefined;
  tasks: string;
  ctx: number;
  samples: number;
  methods: string;
  'budget-ratio': number;
  seed: number;
  json?: string | undefined;
  html: string;
  python?: string | undefined;
}

const list = (s: string) => s.split(',').map((x) => x.trim()).filter(Boolean);

function write(path: string, text: string): string {
  const full = resolve(path);
  mkdirSync(dirname(full), { recursive: true });
  writeFileSync(full, text);
  return full;
}

export async function runAbCommand(o: AbCommandOptions): Promise<number> {
  if (o.engine !== 'hf' && o.engine !== 'vllm') throw new UsageError(`mosaickv ab runs on engine hf or vllm, got '${o.engine}'`);
  const result = await runAb({
    engine: o.engine,
    model: o.model,
    tasks: list(o.tasks),
    ctx: o.ctx,
    samples: o.samples,
    methods: list(o.methods),
    budgetRatio: o['budget-ratio'],
    seed: o.seed,
    ...(o.device ? { device: o.device } : {}),
    ...(o.python ? { python: o.python } : {}),
    progress: progressBar,
  });
  process.stdout.write(`${formatTable(result)}\n`);
  if (o.json) process.stdout.write(`[ab] result: ${write(o.json, JSON.stringify(result, null, 1))}\n`);
  process.stdout.write(`[ab] report: ${write(o.html, renderReport(result))}\n`);
  return 0;
}
