// The CLI's commands and options as typed data, and the parser (exported for tests). Commands
// themselves live in main.ts and stay thin; heavy modules load only when a command needs them.
import { parseArgs } from 'node:util';

interface OptionSpec {
  type: 'string' | 'number' | 'boolean';
  description: string;
  default?: string | number | boolean;
  choices?: readonly string[];
  /** Environment variable read when the flag is absent. */
  env?: string;
  required?: boolean;
}

const ENGINE = { type: 'string', description: 'engine: hf (transformers, embedded default), vllm, sglang', default: 'hf', choices: ['hf', 'vllm', 'sglang'] } as const satisfies OptionSpec;
const BACKEND = { type: 'string', description: 'attention backend', default: 'stock', choices: ['stock', 'mosaickv'] } as const satisfies OptionSpec;
const MODEL = { type: 'string', description: 'model: smollm2-135m (embedded), tiny-random (tests), or a path/name the engine loads', default: 'smollm2-135m' } as const satisfies OptionSpec;
const DEVICE = { type: 'string', description: 'device for the engine, e.g. cpu or cuda:0 (default: the worker picks)' } as const satisfies OptionSpec;
const PYTHON = { type: 'string', description: "Python interpreter with the mosaickv package (default: the project's .venv/bin/python)", env: 'MOSAICKV_WORKER_PYTHON' } as const satisfies OptionSpec;

export const COMMANDS = {
  serve: {
    description: 'start workers and the OpenAI-compatible HTTP server',
    options: {
      engine: ENGINE,
      model: MODEL,
      backend: BACKEND,
      device: DEVICE,
      workers: { type: 'number', description: 'worker processes to spawn (0: only remote workers)', default: 1 },
      port: { type: 'number', description: 'HTTP port', default: 8000 },
      host: { type: 'string', description: 'HTTP address to bind (use 0.0.0.0 to expose it)', default: '127.0.0.1' },
      'api-key': { type: 'string', description: 'require "Authorization: Bearer KEY" on every route but /health', env: 'MOSAICKV_API_KEY' },
      bind: { type: 'string', description: "worker socket: 'ipc' (private socket file) or tcp://HOST:PORT (needs --curve-server-key)", default: 'ipc' },
      'curve-server-key': { type: 'string', description: "the server's secret key file (mosaickv keygen --name server) for tcp://" },
      'curve-clients': { type: 'string', description: 'directory of public client key files (*.key) allowed to join over tcp://' },
      'max-inflight': { type: 'number', description: 'requests per worker at once', default: 4 },
      'max-queue': { type: 'number', description: 'requests waiting for a worker before new ones get 503', default: 64 },
      'max-tokens': { type: 'number', description: 'largest max_tokens a request may ask for', default: 4096 },
      'request-timeout': { type: 'number', description: 'deadline of one request, in seconds', default: 600 },
      'target-ratio': { type: 'number', description: 'plan a segment policy for this dense / KV bytes ratio and publish it to every worker (backend mosaickv, method mosaic)' },
      telemetry: { type: 'string', description: 'with --target-ratio: plan from this telemetry JSON (python -m mosaickv.policy); default: the uniform plan' },
      'token-ratio': { type: 'number', description: 'with --target-ratio: token selection ratio of the plan (1: attend every block)', default: 0.1 },
      'replan-every': { type: 'number', description: 'with --target-ratio: re-plan from the workers\' telemetry after every N telemetry messages and publish it (0: plan once at start)', default: 0 },
      'telemetry-every': { type: 'number', description: 'with --replan-every: each worker measures the attention-loss curves of its 1st, (N+1)-th, ... prompt (backend option telemetry_every)', default: 8 },
      'recall-every': { type: 'number', description: 'each mosaickv worker measures block-selection recall on its 1st, (N+1)-th, ... decode step (backend option recall_every); shown in /admin/workers and /metrics, and with --replan-every the re-plans pick per-layer token ratios from it (0: off)', default: 0 },
      python: PYTHON,
    },
  },
  worker: {
    description: 'run one worker in the foreground, joining a control plane',
    options: {
      connect: { type: 'string', description: 'the control plane socket, e.g. tcp://host:5555 or ipc:///path', required: true },
      'worker-id': { type: 'string', description: 'worker id (default: HOST-PID)' },
      engine: ENGINE,
      model: MODEL,
      backend: BACKEND,
      device: DEVICE,
      'curve-server-key': { type: 'string', description: "the server's public key file (server.key)" },
      'curve-client-key': { type: 'string', description: "this worker's secret key file (NAME.key_secret)" },
      python: PYTHON,
    },
  },
  doctor: {
    description: 'report Python, torch, CUDA/GPU, transformers, vLLM and SGLang availability',
    options: { python: PYTHON },
  },
  keygen: {
    description: 'write a CurveZMQ key pair: NAME.key (public) and NAME.key_secret',
    options: {
      out: { type: 'string', description: 'directory for the key files', default: 'keys' },
      name: { type: 'string', description: "key name: 'server' for the control plane, anything else for a worker", default: 'server' },
    },
  },
  ab: {
    description: 'A/B accuracy: one RULER-style workload over several methods at the same real KV memory',
    options: {
      engine: ENGINE,
      model: MODEL,
      device: DEVICE,
      tasks: { type: 'string', description: 'comma-separated tasks (niah_single_1..3, niah_multikey_1..3, niah_multivalue, niah_multiquery, vt, fwe)', default: 'niah_single_1,niah_multikey_1' },
      ctx: { type: 'number', description: 'prompt + answer length in tokens', default: 1024 },
      samples: { type: 'number', description: 'samples per task', default: 2 },
      methods: { type: 'string', description: 'comma-separated: full, quest, think, naive2d, mosaic (with :key=value, e.g. mosaic:policy=PLAN.json), kvpress:<press>; on --engine vllm: stock, mosaickv (with :key=value)', default: 'full,mosaic,naive2d' },
      'budget-ratio': { type: 'number', description: 'dense KV bytes / method bytes, for methods that fit it', default: 3 },
      seed: { type: 'number', description: 'task generator seed', default: 0 },
      json: { type: 'string', description: 'write the result JSON here' },
      html: { type: 'string', description: 'write the HTML report here', default: 'reports/ab.html' },
      python: PYTHON,
    },
  },
  plan: {
    description: 'plan keep ratio, token ratio and loss threshold per layer and KV head under a memory target',
    options: {
      model: MODEL,
      'target-ratio': { type: 'number', description: 'dense KV bytes / planned bytes, e.g. 4' },
      'target-bytes': { type: 'number', description: 'planned KV bytes per token, summed over layers and KV heads' },
      telemetry: { type: 'string', description: 'plan from this telemetry JSON (python -m mosaickv.policy writes it)' },
      calibrate: { type: 'boolean', description: 'measure telemetry now: a forward pass of the model over a shipped text', default: false },
      tokens: { type: 'number', description: 'prompt tokens for --calibrate', default: 1024 },
      dtype: { type: 'string', description: 'KV storage dtype to plan for (default: the model\'s): float32, float16, bfloat16' },
      'segment-len': { type: 'number', description: 'segment length: rotations are amortised over it', default: 4096 },
      'token-ratio': { type: 'number', description: 'token selection ratio for heads without a recall curve (1: no block selection, no summaries)', default: 0.1 },
      'per-layer': { type: 'boolean', description: 'one keep ratio per layer for all its KV heads (default: one per head)', default: false },
      json: { type: 'boolean', description: 'print the plan as JSON, with the achieved ratio', default: false },
      python: PYTHON,
    },
  },
  demo: {
    description: 'start a server with the embedded model and 2 workers, run a few completions, print them',
    options: {
      model: MODEL,
      backend: BACKEND,
      workers: { type: 'number', description: 'worker processes', default: 2 },
      python: PYTHON,
    },
  },
} as const satisfies Record<string, { description: string; options: Record<string, OptionSpec> }>;

export type CommandName = keyof typeof COMMANDS;

type ValueOf<S extends OptionSpec> = S['type'] extends 'number' ? number : S['type'] extends 'boolean' ? boolean : string;
/** A command's parsed options: flags with a default (or required) are always present. */
export type OptionsOf<C extends CommandName> = {
  [K in keyof (typeof COMMANDS)[C]['options']]: (typeof COMMANDS)[C]['options'][K] extends infer S extends OptionSpec
    ? S extends { default: unknown } | { required: true } ? ValueOf<S> : ValueOf<S> | undefined
    : never;
};

export type ParsedCommand = { [C in CommandName]: { command: C; options: OptionsOf<C> } }[CommandName];

export class UsageError extends Error {
  override name = 'UsageError';
}

export function usage(command?: CommandName): string {
  if (!command) {
    const lines = Object.entries(COMMANDS).map(([name, c]) => `  ${name.padEnd(8)} ${c.description}`);
    return `usage: mosaickv <command> [options]\n\ncommands:\n${lines.join('\n')}\n\nmosaickv <command> --help shows its options.`;
  }
  const spec = COMMANDS[command];
  const lines = Object.entries(spec.options).map(([name, o]: [string, OptionSpec]) => {
    const extra = [o.choices ? `one of ${o.choices.join('|')}` : '', o.default !== undefined ? `default ${o.default}` : '', o.env ? `env ${o.env}` : '', o.required ? 'required' : '']
      .filter(Boolean).join('; ');
    return `  --${name.padEnd(18)} ${o.description}${extra ? ` (${extra})` : ''}`;
  });
  return `usage: mosaickv ${command} [options]\n\n${spec.description}\n\noptions:\n${lines.join('\n')}`;
}

/** Parses `argv` (without node and the script). Throws `UsageError` with what was wrong. */
export function parseCommandLine(argv: readonly string[], env: NodeJS.ProcessEnv = process.env): ParsedCommand | { command: 'help'; topic?: CommandName } {
  const [name, ...rest] = argv;
  if (name === undefined || name === 'help' || name === '--help' || name === '-h') return { command: 'help' };
  if (!Object.hasOwn(COMMANDS, name)) throw new UsageError(`unknown command '${name}'; commands: ${Object.keys(COMMANDS).join(', ')}`);
  const command = name as CommandName;
  if (rest.includes('--help') || rest.includes('-h')) return { command: 'help', topic: command };
  const specs: Record<string, OptionSpec> = COMMANDS[command].options;
  let values: Record<string, string | boolean | undefined>;
  try {
    ({ values } = parseArgs({
      args: [...rest],
      options: Object.fromEntries(Object.entries(specs).map(([k, s]) => [k, { type: s.type === 'boolean' ? 'boolean' : 'string' }])),
      strict: true,
      allowPositionals: false,
    }) as { values: Record<string, string | boolean | undefined> });
  } catch (err) {
    throw new UsageError(`${(err as Error).message}\n\n${usage(command)}`);
  }
  const options: Record<string, unknown> = {};
  for (const [key, spec] of Object.entries(specs)) {
    const raw = values[key] ?? (spec.env ? env[spec.env] : undefined) ?? spec.default;
    if (raw === undefined) {
      if (spec.required) throw new UsageError(`mosaickv ${command}: --${key} is required (${spec.description})`);
      continue;
    }
    if (spec.type === 'number') {
      const n = typeof raw === 'number' ? raw : Number(raw);
      if (!Number.isFinite(n) || n < 0) throw new UsageError(`--${key} must be a non-negative number, got '${String(raw)}'`);
      options[key] = n;
    } else {
      if (spec.choices && !spec.choices.includes(String(raw))) {
        throw new UsageError(`--${key} must be one of ${spec.choices.join(', ')}, got '${String(raw)}'`);
      }
      options[key] = raw;
    }
  }
  return { command, options } as ParsedCommand;
}
