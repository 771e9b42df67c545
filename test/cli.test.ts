// The `mosaickv` command line: the parser as data, and the real binary end to end — keygen, a
// `serve` over tcp:// with CurveZMQ, a remote `mosaickv worker` joining it, a peer with an unknown
// key being refused, and SIGTERM leaving no process behind.
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { Dealer, curveKeyPair } from 'zeromq';
import { parseCommandLine, UsageError } from '../src/cli/options.js';
import { encode } from '../src/protocol/protocol.js';
import { childPids, isAlive, post, waitFor } from './helpers.js';

const BIN = join(import.meta.dirname, '..', 'bin', 'mosaickv.js');

describe('command-line parser', () => {
  it('fills defaults and converts numbers', () => {
    const parsed = parseCommandLine(['serve', '--workers', '2', '--port', '9000'], {});
    expect(parsed).toEqual({
      command: 'serve',
      options: expect.objectContaining({ engine: 'hf', model: 'smollm2-135m', backend: 'stock', workers: 2, port: 9000, host: '127.0.0.1', bind: 'ipc' }),
    });
  });

  it('reads the API key from the environment when the flag is absent, the flag winning', () => {
    expect(parseCommandLine(['serve'], { MOSAICKV_API_KEY: 'env-key' })).toMatchObject({ options: { 'api-key': 'env-key' } });
    expect(parseCommandLine(['serve', '--api-key', 'flag'], { MOSAICKV_API_KEY: 'env-key' })).toMatchObject({ options: { 'api-key': 'flag' } });
  });

  it('rejects unknown commands, unknown flags, bad numbers, bad choices and missing required flags', () => {
    expect(() => parseCommandLine(['serv'], {})).toThrow(UsageError);
    expect(() => parseCommandLine(['serve', '--wrokers', '2'], {})).toThrow(/wrokers/);
    expect(() => parseCommandLine(['serve', '--port', 'eighty'], {})).toThrow(/--port must be a non-negative number/);
    expect(() => parseCommandLine(['serve', '--backend', 'turbo'], {})).toThrow(/--backend must be one of stock, mosaickv/);
    expect(() => parseCommandLine(['worker'], {})).toThrow(/--connect is required/);
  });

  it('gives help for the tool and per command', () => {
    expect(parseCommandLine([], {})).toEqual({ command: 'help' });
    expect(parseCommandLine(['demo', '--help'], {})).toEqual({ command: 'help', topic: 'demo' });
    const out = spawnSync(process.execPath, [BIN, 'serve', '--help'], { encoding: 'utf8' });
    expect(out.status).toBe(0);
    expect(out.stdout).toContain('--api-key');
    const bad = spawnSync(process.execPath, [BIN, 'serve', '--port', 'x'], { encoding: 'utf8' });
    expect(bad.status).toBe(2);
    expect(bad.stderr).toContain('--port');
  });
});

describe('mosaickv doctor', () => {
  it("reports the project's Python stack through pythonia", () => {
    const out = spawnSync(process.execPath, [BIN, 'doctor'], { encoding: 'utf8', timeout: 60_000 });
    expect(out.stdout).toMatch(/^ok +python +3\.\d+/m);
    expect(out.stdout).toMatch(/^ok +torch +\d+\.\d+/m);
    expect(out.stdout).toMatch(/^ok +transformers +\d+\./m);
    // CPU-only machines report CUDA as missing with what to do; GPU machines name the device.
    expect(out.stdout).toMatch(/^(ok +cuda +CUDA|missing +cuda +no CUDA device)/m);
    expect(out.stdout).toMatch(/^(ok|missing) +vllm/m);
    expect(out.status).toBe(0);
  });

  it('says what to do when the interpreter is missing', () => {
    const out = spawnSync(process.execPath, [BIN, 'doctor', '--python', '/nonexistent/python'], { encoding: 'utf8' });
    expect(out.status).toBe(1);
    expect(out.stdout).toContain("run 'npm run setup:python'");
  });
});

describe('mosaickv serve over tcp:// with CurveZMQ, and a remote mosaickv worker', () => {
  const children: ChildProcess[] = [];
  let dir: string | undefined;
  let serveErr = '';

  afterAll(() => {
    for (const c of children) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  it('runs the whole path and leaves nothing behind on SIGTERM', async () => {
    dir = mkdtempSync(join(tmpdir(), 'mosaickv-cli-test-'));
    const keys = dir;
    const keygen = (name: string, out: string) => spawnSync(process.execPath, [BIN, 'keygen', '--out', out, '--name', name], { encoding: 'utf8' });
    expect(keygen('server', keys).status).toBe(0);
    expect(keygen('worker1', join(keys, 'clients')).status).toBe(0);
    expect(statSync(join(keys, 'server.key_secret')).mode & 0o777).toBe(0o600);
    expect(readFileSync(join(keys, 'server.key'), 'utf8')).not.toContain('secret-key');
    expect(keygen('server', keys).stderr).toContain('already exists');

    const serve = spawn(process.execPath, [BIN, 'serve', '--workers', '0', '--port', '0', '--bind', 'tcp://127.0.0.1:*',
      '--curve-server-key', join(keys, 'server.key_secret'), '--curve-clients', join(keys, 'clients'), '--model', 'tiny-random'], { stdio: ['ignore', 'ignore', 'pipe'] });
    children.push(serve);
    serve.stderr!.on('data', (b: Buffer) => (serveErr += b.toString()));
    const [, url, endpoint] = await waitFor('serve to listen', () => /serving .* on (http:\/\/\S+) \(workers join at (tcp:\/\/\S+)\)/.exec(serveErr) ?? undefined, 30_000);

    // No worker yet: healthy process, but nothing to serve.
    expect((await fetch(`${url}/health`)).status).toBe(503);

    // A peer whose key is not in the allow-list is refused (and logged) before it can say anything.
    const rogueKeys = curveKeyPair();
    const serverPublic = /public-key = "(.{40})"/.exec(readFileSync(join(keys, 'server.key'), 'utf8'))![1]!;
    const rogue = new Dealer({ routingId: 'rogue', linger: 0, receiveTimeout: 1500, curveServerKey: serverPublic, curvePublicKey: rogueKeys.publicKey, curveSecretKey: rogueKeys.secretKey });
    rogue.connect(endpoint!);
    await rogue.send(encode({ type: 'heartbeat', worker_id: 'rogue', inflight: 0, kv_bytes: 0 })).catch(() => undefined);
    await expect(rogue.receive()).rejects.toThrow();
    rogue.close();
    await waitFor('the refusal to be logged', () => serveErr.includes(`client key ${rogueKeys.publicKey} is not in the allow-list`), 10_000);

    const worker = spawn(process.execPath, [BIN, 'worker', '--connect', endpoint!, '--worker-id', 'remote-1', '--model', 'tiny-random',
      '--curve-server-key', join(keys, 'server.key'), '--curve-client-key', join(keys, 'clients', 'worker1.key_secret')], { stdio: 'ignore' });
    children.push(worker);
    const joined = await waitFor('the remote worker to join', async () => {
      const res = await fetch(`${url}/admin/workers`);
      const workers = ((await res.json()) as { workers: { id: string; pid: number; state: string; spawned: boolean }[] }).workers;
      return workers.find((w) => w.id === 'remote-1' && w.state === 'ready');
    }, 90_000);
    expect(joined.spawned).toBe(false);
    const pythonPid = (await childPids(worker.pid!))[0]!;
    expect(joined.pid).toBe(pythonPid);

    const res = await post(`${url}/v1/completions`, { prompt: 'over curve', max_tokens: 3, ignore_eos: true });
    expect(res.status).toBe(200);
    expect(((await res.json()) as { usage: { completion_tokens: number } }).usage.completion_tokens).toBe(3);

    // SIGTERM: serve tells the worker to shut down; the worker CLI exits with its Python child.
    const exits = [serve, worker].map((c) => new Promise<number | null>((resolve) => c.once('exit', (code) => resolve(code))));
    serve.kill('SIGTERM');
    expect(await Promise.all(exits)).toEqual([0, 0]);
    expect([serve.pid!, worker.pid!, pythonPid].filter(isAlive)).toEqual([]);
  });
});

/** `mosaickv serve` with one tiny-random mosaickv worker and `args`; `err()` is its stderr so far. */
function spawnServe(args: string[]): { serve: ChildProcess; err: () => string } {
  let err = '';
  const serve = spawn(process.execPath, [BIN, 'serve', '--workers', '1', '--port', '0', '--model', 'tiny-random', '--backend', 'mosaickv', ...args],
    { stdio: ['ignore', 'ignore', 'pipe'] });
  serve.stderr!.on('data', (b: Buffer) => (err += b.toString()));
  return { serve, err: () => err };
}

/** The URL `serve` prints once it listens. */
async function listening(err: () => string): Promise<string> {
  const [, url] = await waitFor('serve to listen', () => /serving .* on (http:\/\/\S+)/.exec(err()) ?? undefined, 90_000);
  return url!;
}

/** SIGTERM, and the exit code. */
function stop(serve: ChildProcess): Promise<number | null> {
  const exited = new Promise<number | null>((resolve) => serve.once('exit', (code) => resolve(code)));
  serve.kill('SIGTERM');
  return exited;
}

describe('mosaickv serve --target-ratio', () => {
  let serve: ChildProcess | undefined;
  afterAll(() => {
    if (serve && serve.exitCode === null && serve.signalCode === null) serve.kill('SIGKILL');
  });

  it('plans a policy from the model shape and every worker acks it', async () => {
    const started = spawnServe(['--target-ratio', '2']);
    serve = started.serve;
    const url = await listening(started.err);
    expect(started.err()).toMatch(/policy 1: uniform plan at 2\.\d\dx less KV, published to every worker/);
    const acked = await waitFor('the worker to ack policy 1', async () => {
      const workers = ((await (await fetch(`${url}/admin/workers`)).json()) as { workers: { policy_version: number }[] }).workers;
      return workers.length === 1 && workers[0]!.policy_version === 1 ? workers[0] : undefined;
    }, 90_000);
    expect(acked.policy_version).toBe(1);
    expect(await stop(serve)).toBe(0);
  });
});

describe('mosaickv serve --replan-every', () => {
  let serve: ChildProcess | undefined;
  afterAll(() => {
    if (serve && serve.exitCode === null && serve.signalCode === null) serve.kill('SIGKILL');
  });

  it('re-plans from the telemetry a worker sends with a completion and publishes policy 2, then 3 with decode recall', async () => {
    const started = spawnServe(['--target-ratio', '2', '--replan-every', '1', '--telemetry-every', '1', '--recall-every', '1']);
    serve = started.serve;
    const err = started.err;
    const url = await listening(err);
    expect(err()).toMatch(/policy 1: uniform plan at 2\.\d\dx less KV/);
    const policyOf = async () => ((await (await fetch(`${url}/admin/workers`)).json()) as { workers: { policy_version: number }[] }).workers[0]?.policy_version;
    await waitFor('the worker to ack policy 1', async () => ((await policyOf()) === 1 ? true : undefined), 90_000);

    const prompt = Array.from({ length: 40 }, (_, i) => `item ${i} is ${(i * 7) % 13}.`).join(' ');
    const res = await post(`${url}/v1/completions`, { prompt, max_tokens: 2 });
    expect(res.status).toBe(200);
    await waitFor('the re-plan line', () => /policy 2: re-planned from 1 telemetry samples at \d+\.\d\dx less KV/.exec(err()) ?? undefined, 60_000);
    await waitFor('the worker to ack policy 2', async () => ((await policyOf()) === 2 ? true : undefined), 60_000);

    // The first completion's decode step sent a `recall` message: the pool shows its mean per layer x KV head...
    type Recall = { token_ratios: number[]; samples: number; heads: { layer: number; head: number; recall: number[] }[] };
    const recall = await waitFor('decode recall in /admin/workers', async () => {
      const body = (await (await fetch(`${url}/admin/workers`)).json()) as { decode_recall: Record<string, Recall> };
      return body.decode_recall['tiny-random'];
    }, 30_000);
    expect(recall.samples).toBeGreaterThanOrEqual(1);
    expect(recall.heads.map((h) => `${h.layer}/${h.head}`)).toEqual(['0/0', '0/1', '1/0', '1/1']);
    for (const h of recall.heads) {
      expect(h.recall).toHaveLength(recall.token_ratios.length);
      for (const x of h.recall) expect(x >= 0 && x <= 1).toBe(true);
    }
    // ...and the prompts' curves: attention loss and energy not kept, neither rising as more is kept
    type Curves = { keep_ratios: number[]; curves: { layer: number; loss: number[]; energy?: number[] }[] };
    const body = (await (await fetch(`${url}/admin/workers`)).json()) as { telemetry: Record<string, Curves> };
    const curves = body.telemetry['tiny-random']!;
    expect(curves.curves).toHaveLength(4);
    for (const c of curves.curves) {
      expect(c.energy).toHaveLength(curves.keep_ratios.length);
      expect(c.energy![0]!).toBeGreaterThan(c.energy!.at(-1)!);
      expect(c.loss[0]!).toBeGreaterThanOrEqual(c.loss.at(-1)!);
    }
    const metrics = await (await fetch(`${url}/metrics`)).text();
    expect(metrics).toMatch(/^mosaickv_decode_recall\{model="tiny-random",layer="1",head="1",token_ratio="0\.05"\} [\d.e-]+$/m);
    // ...and the next re-plan (the second completion's telemetry) picks its token ratios from it.
    expect((await post(`${url}/v1/completions`, { prompt, max_tokens: 2 })).status).toBe(200);
    await waitFor('the re-plan with recall', () => /policy 3: re-planned from 2 telemetry samples .* token ratios [\d., ]+ from the recall of \d+ sampled decode steps/.exec(err()) ?? undefined, 60_000);
    await waitFor('the worker to ack policy 3', async () => ((await policyOf()) === 3 ? true : undefined), 60_000);
    expect(await stop(serve)).toBe(0);
  });
});
