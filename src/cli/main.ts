// `mosaickv` command line. Commands are thin wrappers over the TypeScript API (src/index.ts);
// each one loads what it needs lazily so that `mosaickv keygen` does not pay for Fastify.
import { COMMANDS, parseCommandLine, usage, UsageError, type OptionsOf } from './options.js';

type Handlers = { [C in keyof typeof COMMANDS]: (options: OptionsOf<C>) => Promise<number> };

/** Runs `close` on the first SIGINT/SIGTERM; a second signal exits at once (workers are SIGKILLed on exit). */
function onSignals(close: () => Promise<void>): void {
  let closing = false;
  const handler = (signal: NodeJS.Signals) => {
    if (closing) {
      process.stderr.write(`[mosaickv] ${signal} again: exiting now\n`);
      process.exit(130);
    }
    closing = true;
    process.stderr.write(`[mosaickv] ${signal}: shutting down (send it again to force)\n`);
    close().then(() => process.exit(0), (err: unknown) => {
      process.stderr.write(`[mosaickv] shutdown failed: ${(err as Error).message}\n`);
      process.exit(1);
    });
  };
  process.on('SIGINT', handler);
  process.on('SIGTERM', handler);
}

const handlers: Handlers = {
  async serve(o) {
    const { ControlPlane, loadCurveOptions } = await import('../index.js');
    let curve;
    if (o.bind.startsWith('tcp://')) {
      if (!o['curve-server-key'] || !o['curve-clients']) {
        throw new UsageError('--bind tcp://... needs --curve-server-key (keys/server.key_secret) and --curve-clients (a directory of worker *.key files); create them with mosaickv keygen');
      }
      curve = loadCurveOptions(o['curve-server-key'], o['curve-clients']);
    }
    const replanEvery = o['replan-every'];
    const telemetryEvery = o['telemetry-every'];
    if (!Number.isInteger(replanEvery) || replanEvery < 0) throw new UsageError(`--replan-every must be an integer >= 0, got ${replanEvery}`);
    if (replanEvery > 0 && o['target-ratio'] === undefined) throw new UsageError('--replan-every re-plans for --target-ratio: give it too');
    if (replanEvery > 0 && (!Number.isInteger(telemetryEvery) || telemetryEvery < 1)) throw new UsageError(`--telemetry-every must be an integer >= 1, got ${telemetryEvery}`);
    const recallEvery = o['recall-every'];
    if (!Number.isInteger(recallEvery) || recallEvery < 0) throw new UsageError(`--recall-every must be an integer >= 0, got ${recallEvery}`);
    // Workers measure telemetry only when it is used (the mosaickv backend's options telemetry_every, recall_every).
    const workerArgs = [
      ...(replanEvery > 0 ? ['--backend-option', `telemetry_every=${telemetryEvery}`] : []),
      ...(recallEvery > 0 ? ['--backend-option', `recall_every=${recallEvery}`] : []),
    ];
    const cp = await ControlPlane.start({
      workers: Array.from({ length: o.workers }, () => ({
        engine: o.engine, backend: o.backend, model: o.model, ...(o.device ? { device: o.device } : {}), ...(workerArgs.length ? { args: workerArgs } : {}),
      })),
      bind: o.bind,
      ...(curve ? { curve } : {}),
      ...(o.python ? { python: o.python } : {}),
      maxInflightPerWorker: o['max-inflight'],
      maxQueue: o['max-queue'],
      requestTimeoutMs: o['request-timeout'] * 1000,
    });
    if (o['target-ratio'] !== undefined) {
      const { servePolicy } = await import('../policy/serve.js');
      await servePolicy(cp.pool, {
        model: o.model, targetRatio: o['target-ratio'], telemetry: o.telemetry, tokenRatio: o['token-ratio'], replanEvery,
        python: o.python, log: (line) => process.stderr.write(`[mosaickv] ${line}\n`),
      });
    }
    const http = await cp.listen({ port: o.port, host: o.host, maxTokens: o['max-tokens'], ...(o['api-key'] ? { apiKey: o['api-key'] } : {}) });
    process.stderr.write(`[mosaickv] serving ${o.model} on ${http.url} (workers join at ${cp.endpoint})${o['api-key'] ? ', API key required' : ''}\n`);
    onSignals(async () => {
      await http.close();
      await cp.close();
    });
    await new Promise(() => undefined); // runs until a signal
    return 0;
  },

  async worker(o) {
    const { spawn } = await import('node:child_process');
    const { hostname } = await import('node:os');
    const { join } = await import('node:path');
    const { PACKAGE_ROOT } = await import('../control/pool.js');
    const python = o.python ?? join(PACKAGE_ROOT, '.venv', 'bin', 'python');
    const args = ['-m', 'mosaickv.worker', '--connect', o.connect, '--worker-id', o['worker-id'] ?? `${hostname()}-${process.pid}`,
      '--engine', o.engine, '--backend', o.backend, '--model', o.model];
    if (o.device) args.push('--device', o.device);
    if (o['curve-server-key']) args.push('--curve-server-key', o['curve-server-key']);
    if (o['curve-client-key']) args.push('--curve-client-key', o['curve-client-key']);
    const child = spawn(python, args, { stdio: 'inherit', env: { ...process.env, PYTHONUNBUFFERED: '1' } });
    // Signals are relayed to the worker; if it does not exit within 10 s it is killed.
    for (const signal of ['SIGINT', 'SIGTERM'] as const) {
      process.on(signal, () => {
        child.kill(signal);
        setTimeout(() => child.kill('SIGKILL'), 10_000).unref();
      });
    }
    return new Promise<number>((resolve) => {
      child.on('error', (err) => {
        process.stderr.write(`[mosaickv] cannot run ${python}: ${err.message}; run 'npm run setup:python' or pass --python\n`);
        resolve(1);
      });
      child.on('exit', (code, signal) => resolve(code ?? (signal ? 128 + 15 : 1)));
    });
  },

  async doctor(o) {
    const { doctor } = await import('./doctor.js');
    return doctor(o.python);
  },

  async keygen(o) {
    const { writeKeyPair } = await import('../control/curve.js');
    const { publicFile, secretFile } = writeKeyPair(o.out, o.name);
    process.stdout.write(`wrote ${publicFile} (public) and ${secretFile} (secret, mode 0600)\n`);
    if (o.name === 'server') {
      process.stdout.write(`serve with: mosaickv serve --bind tcp://0.0.0.0:5555 --curve-server-key ${secretFile} --curve-clients DIR_OF_WORKER_KEYS\n`);
    } else {
      process.stdout.write(`copy ${publicFile} into the server's --curve-clients directory; the worker runs with --curve-client-key ${secretFile} --curve-server-key server.key\n`);
    }
    return 0;
  },

  async ab(o) {
    const { runAbCommand } = await import('../ab/command.js');
    return runAbCommand(o);
  },

  async plan(o) {
    const { runPlanCommand } = await import('../policy/command.js');
    return runPlanCommand(o);
  },

  async demo(o) {
    const { demo } = await import('./demo.js');
    return demo({ model: o.model, backend: o.backend, workers: o.workers, ...(o.python ? { python: o.python } : {}) });
  },
};

export async function main(argv: readonly string[]): Promise<number> {
  try {
    const parsed = parseCommandLine(argv);
    if (parsed.command === 'help') {
      process.stdout.write(`${usage(parsed.topic)}\n`);
      return 0;
    }
    return await (handlers[parsed.command] as (o: unknown) => Promise<number>)(parsed.options);
  } catch (err) {
    if (err instanceof UsageError) {
      process.stderr.write(`mosaickv: ${err.message}\n`);
      return 2;
    }
    process.stderr.write(`mosaickv: ${(err as Error).message}\n`);
    return 1;
  }
}
