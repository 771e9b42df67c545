// WorkerPool: binds the ROUTER socket, spawns and supervises Python workers, accepts remote ones,
// routes requests to the least loaded worker, and never leaves a request or a process behind.
// States, timeouts and retry rules are documented in docs/CONTROL.md.
import { spawn, type ChildProcess } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { chmodSync, existsSync, lstatSync, mkdirSync, mkdtempSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Context, Router } from 'zeromq';
import { MosaicError } from '../protocol/errors.js';
import {
  decodeFromWorker, encode, ProtocolError, type ControlMessage, type GenerateInput, type HelloMsg,
  type HeadPolicyWire, type PolicyMsg, type RecallMsg, type SamplingParams, type StatsMsg, type TelemetryMsg, type WorkerMessage,
} from '../protocol/protocol.js';
import type { Telemetry } from '../policy/planner.js';
import { readAllowList, readCertificate, writeKeyPair, writePublicCertificate, ZapHandler, type KeyPair } from './curve.js';
import { engineFamilies, family, PoolMetrics } from './metrics.js';
import { PendingRequest, type GenerateEvent, type TokenEvent } from './request.js';

export const PACKAGE_ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..');

/** A worker the pool spawns (and restarts) itself. */
export interface WorkerSpec {
  engine: string;
  backend: string;
  model: string;
  device?: string;
  /** Extra command-line flags for `python -m mosaickv.worker`. */
  args?: string[];
}

export interface CurveOptions {
  /** The server's key pair (`mosaickv keygen`, `*.key_secret`). */
  serverKeys: KeyPair;
  /** Public keys of the clients allowed to join (the pool adds one for the workers it spawns). */
  allowedClients: string[];
}

export interface PoolOptions {
  workers: WorkerSpec[];
  /** `ipc` (a private socket file, the default), `ipc:///path/to.sock`, or `tcp://host:port` (needs `curve`). */
  bind?: string;
  curve?: CurveOptions;
  /** Python interpreter for spawned workers (default: the project's `.venv/bin/python`). */
  python?: string;
  heartbeatMs?: number;
  /** How long a spawned worker may take to load its model and say hello. */
  handshakeTimeoutMs?: number;
  /** Deadline of a request, from submission to its last event. */
  requestTimeoutMs?: number;
  maxInflightPerWorker?: number;
  maxQueue?: number;
  restartBackoffMs?: { initial: number; max: number };
  /** How long `close()` waits for workers to exit after `shutdown` before SIGTERM, then SIGKILL. */
  shutdownGraceMs?: number;
  log?: (line: string) => void;
}

/** Per model: the running mean of every layer x KV head curve over the `telemetry` messages received. */
interface TelemetryAccumulator {
  model: string;
  headDim: number;
  dtype: TelemetryMsg['dtype'];
  keepRatios: number[];
  /** energy / energyCount: the energy losses, from the messages that carried them. */
  sums: Map<string, { layer: number; head: number; loss: number[]; count: number; energy: number[] | null; energyCount: number }>;
  samples: number;
  overheadS: number;
  tokens: number;
}

/** Per model: the running mean recall of every layer x KV head over the `recall` messages received. */
interface RecallAccumulator {
  tokenRatios: number[];
  sums: Map<string, { layer: number; head: number; recall: number[]; count: number }>;
  samples: number;
  overheadS: number;
  tokens: number;
}

/** The running mean of one layer x KV head's decode recall: recall[i] at tokenRatios[i]. */
export interface HeadRecall {
  layer: number;
  head: number;
  recall: number[];
}

/** `pool.recall(model)`: mean block-selection recall per layer x KV head over the sampled decode steps. */
export interface RecallSummary {
  tokenRatios: number[];
  heads: HeadRecall[];
  samples: number;
  meanOverheadS: number;
  meanTokens: number;
}

export type WorkerState = 'starting' | 'ready' | 'dead' | 'backoff' | 'stopping';

export interface WorkerInfo {
  id: string;
  pid: number | null;
  host: string | null;
  engine: string;
  model: string;
  backend: string;
  device: string | null;
  state: WorkerState;
  inflight: number;
  maxInflight: number;
  kvBytes: number;
  spawned: boolean;
  restarts: number;
  /** The segment policy version this worker acked (0: none yet, its backend's own settings). */
  policyVersion: number;
  /** The last policy it refused, with its reason (it keeps running `policyVersion`). */
  policyRefused: { version: number; reason: string } | null;
}

interface WorkerEntry {
  id: string;
  spec: WorkerSpec | null;
  state: WorkerState;
  hello: HelloMsg | null;
  child: ChildProcess | null;
  inflight: Map<string, PendingRequest>;
  maxInflight: number;
  kvBytes: number;
  lastSeen: number;
  restarts: number;
  consecutiveFailures: number;
  readySince: number;
  timer: NodeJS.Timeout | undefined;
  stderrTail: string[];
  /** Resolves `start()`'s wait for this worker's first handshake. */
  onReady: (() => void) | undefined;
  policyVersion: number;
  policyRefused: { version: number; reason: string } | null;
}

export interface SubmitOptions {
  /** Only workers serving this model take the request (any worker when absent). */
  model?: string;
  signal?: AbortSignal;
}

const DEFAULTS = {
  heartbeatMs: 2000,
  handshakeTimeoutMs: 300_000,
  requestTimeoutMs: 600_000,
  maxInflightPerWorker: 4,
  maxQueue: 64,
  restartBackoffMs: { initial: 500, max: 30_000 },
  shutdownGraceMs: 10_000,
};
/** A worker that does not acknowledge a cancel within this time is considered hung and replaced. */
const CANCEL_GRACE_MS = 30_000;
/** Bound on sends waiting for the socket (sends are serialised: zeromq allows one at a time). */
const MAX_PENDING_SENDS = 10_000;

export class WorkerPool {
  readonly endpoint: string;
  readonly metrics = new PoolMetrics();
  private readonly opts: Required<Omit<PoolOptions, 'curve' | 'bind' | 'python' | 'log'>> & { python: string };
  private readonly log: (line: string) => void;
  private readonly workers = new Map<string, WorkerEntry>();
  private readonly queue: PendingRequest[] = [];
  private readonly pendingStats = new Map<number, (stats: StatsMsg) => void>();
  private nonce = 0;
  private policy: PolicyMsg | null = null;
  private readonly telemetryByModel = new Map<string, TelemetryAccumulator>();
  private readonly telemetryListeners = new Set<(model: string, samples: number) => void>();
  private readonly recallByModel = new Map<string, RecallAccumulator>();
  private closing = false;
  private sendChain: Promise<void> = Promise.resolve();
  private pendingSends = 0;
  private heartbeatTimer: NodeJS.Timeout | undefined;
  private readonly receiveLoop: Promise<void>;
  private readonly startupWaiters = new Set<{ resolve: () => void; reject: (e: Error) => void }>();
  private readonly onProcessExit = () => this.killAllNow();

  private constructor(
    private readonly router: Router,
    endpoint: string,
    private readonly runtimeDir: string,
    private readonly zap: ZapHandler | null,
    private readonly spawnCurveArgs: string[],
    options: PoolOptions,
  ) {
    this.endpoint = endpoint;
    this.log = options.log ?? ((line) => process.stderr.write(`${line}\n`));
    this.opts = {
      workers: options.workers,
      python: options.python ?? process.env.MOSAICKV_WORKER_PYTHON ?? join(PACKAGE_ROOT, '.venv', 'bin', 'python'),
      heartbeatMs: options.heartbeatMs ?? DEFAULTS.heartbeatMs,
      handshakeTimeoutMs: options.handshakeTimeoutMs ?? DEFAULTS.handshakeTimeoutMs,
      requestTimeoutMs: options.requestTimeoutMs ?? DEFAULTS.requestTimeoutMs,
      maxInflightPerWorker: options.maxInflightPerWorker ?? DEFAULTS.maxInflightPerWorker,
      maxQueue: options.maxQueue ?? DEFAULTS.maxQueue,
      restartBackoffMs: options.restartBackoffMs ?? DEFAULTS.restartBackoffMs,
      shutdownGraceMs: options.shutdownGraceMs ?? DEFAULTS.shutdownGraceMs,
    };
    this.receiveLoop = this.receive();
    this.heartbeatTimer = setInterval(() => this.tickHeartbeats(), this.opts.heartbeatMs);
    process.on('exit', this.onProcessExit);
  }

  /** Binds the ROUTER and spawns the workers; resolves once every spawned worker is ready. */
  static async start(options: PoolOptions): Promise<WorkerPool> {
    const runtimeDir = mkdtempSync(join(tmpdir(), 'mosaickv-')); // mode 0700
    const context = new Context();
    const router = new Router({
      context,
      linger: 0,
      mandatory: true, // an unroutable send fails instead of vanishing
      handover: true, // a restarted worker reuses its id; the new connection takes it over
      sendHighWaterMark: 1000,
      receiveHighWaterMark: 1000,
      sendTimeout: 2000,
    });
    let zap: ZapHandler | null = null;
    let spawnCurveArgs: string[] = [];
    const log = options.log ?? ((line: string) => process.stderr.write(`${line}\n`));
    try {
      const bind = options.bind ?? 'ipc';
      let endpoint: string;
      if (bind === 'ipc' || bind.startsWith('ipc://')) {
        const path = bind === 'ipc' ? join(runtimeDir, 'router.sock') : bind.slice('ipc://'.length);
        prepareIpcPath(path, log);
        await router.bind(`ipc://${path}`);
        chmodSync(path, 0o600);
        endpoint = `ipc://${path}`;
      } else if (bind.startsWith('tcp://')) {
        if (!options.curve) {
          throw new MosaicError('bad_request', `binding ${bind} needs CurveZMQ keys: pass a server key (mosaickv keygen) so that only known workers can join`);
        }
        // Spawned workers get a key pair of their own, allowed alongside the configured clients.
        const serverCert = join(runtimeDir, 'server.key');
        const own = writeKeyPair(runtimeDir, 'spawned');
        writePublicCertificate(serverCert, options.curve.serverKeys.publicKey);
        spawnCurveArgs = ['--curve-server-key', serverCert, '--curve-client-key', own.secretFile];
        zap = await ZapHandler.start(context, [...options.curve.allowedClients, own.keys.publicKey], (address, key) =>
          log(`[pool] refused a CURVE peer from ${address}: client key ${key} is not in the allow-list`),
        );
        router.curveServer = true;
        router.curveSecretKey = options.curve.serverKeys.secretKey;
        router.zapDomain = 'mosaickv';
        await router.bind(bind);
        endpoint = router.lastEndpoint ?? bind;
      } else {
        throw new MosaicError('bad_request', `unknown bind address '${bind}': use 'ipc', 'ipc:///path/to.sock' or 'tcp://host:port'`);
      }
      const pool = new WorkerPool(router, endpoint, runtimeDir, zap, spawnCurveArgs, options);
      pool.log(`[pool] listening on ${endpoint}`);
      await pool.spawnAll();
      return pool;
    } catch (err) {
      router.close();
      await zap?.close();
      rmSync(runtimeDir, { recursive: true, force: true });
      throw err;
    }
  }

  // ------------------------------------------------------------------------------------------
  // Spawning and supervision

  private async spawnAll(): Promise<void> {
    const ready = this.opts.workers.map((spec, slot) => {
      const entry = this.newEntry(`w${slot}`, spec);
      this.workers.set(entry.id, entry);
      return new Promise<void>((resolve, reject) => {
        const waiter = { resolve, reject };
        this.startupWaiters.add(waiter);
        this.spawnWorker(entry, waiter);
      });
    });
    try {
      await Promise.all(ready);
    } catch (err) {
      await this.close();
      throw err;
    }
  }

  private newEntry(id: string, spec: WorkerSpec | null): WorkerEntry {
    return {
      id, spec, state: 'starting', hello: null, child: null, inflight: new Map(), maxInflight: 0, kvBytes: 0,
      lastSeen: Date.now(), restarts: 0, consecutiveFailures: 0, readySince: 0, timer: undefined, stderrTail: [], onReady: undefined,
      policyVersion: 0, policyRefused: null,
    };
  }

  private spawnWorker(entry: WorkerEntry, waiter?: { resolve: () => void; reject: (e: Error) => void }): void {
    const spec = entry.spec!;
    const args = [
      '-m', 'mosaickv.worker', '--connect', this.endpoint, '--worker-id', entry.id,
      '--engine', spec.engine, '--backend', spec.backend, '--model', spec.model,
      ...(spec.device ? ['--device', spec.device] : []),
      ...this.spawnCurveArgs,
      ...(spec.args ?? []),
    ];
    entry.state = 'starting';
    entry.hello = null;
    entry.stderrTail = [];
    this.log(`[pool] starting worker ${entry.id}: ${spec.engine}/${spec.backend} ${spec.model} (loading the model)`);
    const child = spawn(this.opts.python, args, {
      cwd: PACKAGE_ROOT,
      env: { ...process.env, PYTHONUNBUFFERED: '1' },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    entry.child = child;
    const relay = (stream: NodeJS.ReadableStream | null, keepTail: boolean) => {
      let partial = '';
      stream?.setEncoding('utf8');
      stream?.on('data', (chunk: string) => {
        const lines = (partial + chunk).split('\n');
        partial = lines.pop() ?? '';
        for (const line of lines) {
          this.log(`[${entry.id}] ${line}`);
          if (keepTail) {
            entry.stderrTail.push(line);
            if (entry.stderrTail.length > 20) entry.stderrTail.shift();
          }
        }
      });
    };
    relay(child.stdout, false);
    relay(child.stderr, true);
    const ended = (how: string) => {
      if (entry.child !== child) return;
      entry.child = null;
      if (waiter && this.startupWaiters.has(waiter) && entry.hello === null) {
        this.startupWaiters.delete(waiter);
        const tail = entry.stderrTail.slice(-8).join('\n');
        waiter.reject(new MosaicError('engine_error', `worker ${entry.id} ${how} before its handshake (${this.opts.python} -m mosaickv.worker).${tail ? ` Its last output:\n${tail}` : ''}`));
      }
      this.markDead(entry, `process ${how}`);
    };
    // A spawn failure (no such interpreter) emits 'error' and no 'exit'.
    child.on('error', (err) => ended(`could not start (${err.message}; pass the interpreter with --python or run 'npm run setup:python')`));
    child.on('exit', (code, signal) => ended(signal ? `killed by ${signal}` : `exited with code ${code}`));
    clearTimeout(entry.timer);
    entry.timer = setTimeout(() => {
      if (entry.state === 'starting') {
        this.log(`[pool] worker ${entry.id} sent no hello within ${this.opts.handshakeTimeoutMs} ms; killing it`);
        if (waiter && this.startupWaiters.delete(waiter)) {
          waiter.reject(new MosaicError('timeout', `worker ${entry.id} did not finish loading within ${this.opts.handshakeTimeoutMs} ms`));
        }
        this.markDead(entry, 'handshake timeout');
      }
    }, this.opts.handshakeTimeoutMs);
    if (waiter) {
      const check = () => {
        if (entry.state === 'ready' && this.startupWaiters.delete(waiter)) waiter.resolve();
      };
      entry.onReady = check;
    }
  }

  /** A worker is gone (exit, missed heartbeats, handshake timeout, broken socket). */
  private markDead(entry: WorkerEntry, reason: string): void {
    if (entry.state === 'dead' || entry.state === 'backoff') return;
    const wasStopping = entry.state === 'stopping';
    entry.state = 'dead';
    clearTimeout(entry.timer);
    if (!wasStopping) this.log(`[pool] worker ${entry.id} lost: ${reason}`);
    entry.child?.kill('SIGKILL');
    for (const request of entry.inflight.values()) {
      clearTimeout(request.cancelGrace);
      request.workerId = null;
      if (request.finished) continue;
      if (!request.streamed && request.attempts < 2 && !this.closing) {
        this.metrics.retries += 1;
        this.log(`[pool] retrying ${request.id} on another worker (worker ${entry.id} died before streaming)`);
        this.queue.unshift(request);
      } else {
        this.endWithError(request, new MosaicError('worker_lost', `worker ${entry.id} died while the request was running (${reason}); ${request.streamed ? 'the partial output above is incomplete' : 'it was already retried once'}. Send the request again.`));
      }
    }
    entry.inflight.clear();
    entry.kvBytes = 0;
    if (this.closing) return;
    if (entry.spec) {
      const { initial, max } = this.opts.restartBackoffMs;
      // A worker that stayed up for a minute starts the backoff afresh.
      if (entry.readySince && Date.now() - entry.readySince > 60_000) entry.consecutiveFailures = 0;
      const delay = Math.min(max, initial * 2 ** entry.consecutiveFailures);
      entry.consecutiveFailures += 1;
      entry.state = 'backoff';
      this.log(`[pool] restarting worker ${entry.id} in ${delay} ms`);
      entry.timer = setTimeout(() => {
        if (this.closing) return;
        entry.restarts += 1;
        this.metrics.restarts += 1;
        this.spawnWorker(entry);
      }, delay);
    } else {
      this.workers.delete(entry.id);
    }
    this.pump();
  }

  private tickHeartbeats(): void {
    const now = Date.now();
    for (const entry of this.workers.values()) {
      if (entry.state !== 'ready') continue;
      if (now - entry.lastSeen > 3 * this.opts.heartbeatMs) {
        this.markDead(entry, `missed 3 heartbeats (${now - entry.lastSeen} ms of silence)`);
        continue;
      }
      this.send(entry.id, { type: 'heartbeat', worker_id: entry.id, inflight: 0, kv_bytes: 0 });
    }
  }

  // ------------------------------------------------------------------------------------------
  // The socket

  private send(id: string, message: ControlMessage): Promise<boolean> {
    return this.sendFrames(id, message.type, encode(message));
  }

  private sendFrames(id: string, type: string, frames: Buffer[]): Promise<boolean> {
    if (this.pendingSends >= MAX_PENDING_SENDS) {
      this.log(`[pool] send queue full (${MAX_PENDING_SENDS}); dropping ${type} to ${id}`);
      return Promise.resolve(false);
    }
    this.pendingSends += 1;
    const result = this.sendChain.then(async () => {
      try {
        await this.router.send([id, ...frames]);
        return true;
      } catch (err) {
        if (!this.router.closed) this.log(`[pool] cannot send ${type} to ${id}: ${(err as Error).message}`);
        return false;
      } finally {
        this.pendingSends -= 1;
      }
    });
    this.sendChain = result.then(() => undefined);
    return result;
  }

  private async receive(): Promise<void> {
    try {
      for await (const [idFrame, ...frames] of this.router) {
        this.handleFrames(idFrame!.toString('utf8'), frames);
      }
    } catch (err) {
      if (!this.router.closed) this.log(`[pool] receive loop failed: ${(err as Error).message}`);
    }
  }

  private handleFrames(senderId: string, frames: Buffer[]): void {
    let message: WorkerMessage;
    try {
      message = decodeFromWorker(frames);
    } catch (err) {
      const protocolError = err instanceof ProtocolError ? err : new ProtocolError('bad_message', String(err));
      this.log(`[pool] rejected a frame from '${senderId}': ${protocolError.message}`);
      this.send(senderId, { type: 'error', request_id: null, code: protocolError.code, message: protocolError.message });
      return;
    }
    const entry = this.workers.get(senderId);
    if (message.type === 'hello') {
      this.handleHello(senderId, entry, message);
      return;
    }
    if (!entry || (entry.state !== 'ready' && entry.state !== 'stopping')) {
      this.send(senderId, { type: 'error', request_id: null, code: 'bad_message', message: `'${message.type}' from '${senderId}' before its hello: send hello first` });
      return;
    }
    entry.lastSeen = Date.now();
    switch (message.type) {
      case 'heartbeat':
        entry.kvBytes = message.kv_bytes;
        return;
      case 'stats':
        entry.kvBytes = message.kv_bytes;
        this.pendingStats.get(message.nonce)?.(message);
        return;
      case 'token': {
        const request = entry.inflight.get(message.request_id);
        if (!request) return;
        const event: TokenEvent = { type: 'token', index: message.index, text: message.text, tokenIds: message.token_ids };
        // Copied: a frame's bytes need not be 4-byte aligned for a Float32Array view.
        if (message.logprobs) event.logprobs = new Float32Array(new Uint8Array(message.logprobs.data).buffer);
        request.push(event);
        return;
      }
      case 'done': {
        const request = entry.inflight.get(message.request_id);
        if (!request) return;
        this.release(entry, request);
        const outcome = request.finished ? 'cancelled' : message.finish_reason;
        if (!request.finished) {
          this.metrics.promptTokens += message.usage.prompt_tokens;
          this.metrics.completionTokens += message.usage.completion_tokens;
          this.metrics.latency.observe((performance.now() - request.startedAt) / 1000);
          if (request.firstTokenAt) this.metrics.firstToken.observe((request.firstTokenAt - request.startedAt) / 1000);
          this.metrics.count(outcome);
        }
        request.push({
          type: 'done', finishReason: message.finish_reason, workerId: entry.id,
          usage: { promptTokens: message.usage.prompt_tokens, completionTokens: message.usage.completion_tokens },
          kvBytes: message.kv_bytes, fullKvBytes: message.full_kv_bytes,
          timing: { prefillMs: message.timing.prefill_ms, decodeMs: message.timing.decode_ms },
        });
        return;
      }
      case 'policy_ack':
        if (message.accepted) {
          entry.policyVersion = message.version;
        } else {
          entry.policyRefused = { version: message.version, reason: message.reason ?? 'no reason given' };
          this.log(`[pool] worker ${entry.id} refused policy ${message.version} (keeps ${entry.policyVersion}): ${message.reason}`);
        }
        return;
      case 'telemetry':
        this.addTelemetry(message);
        return;
      case 'recall':
        this.addRecall(message);
        return;
      case 'error': {
        if (message.request_id === null) {
          this.log(`[pool] worker ${entry.id} reported: ${message.code}: ${message.message}`);
          return;
        }
        const request = entry.inflight.get(message.request_id);
        if (!request) return;
        this.release(entry, request);
        this.endWithError(request, new MosaicError(message.code, message.message));
        return;
      }
    }
  }

  private handleHello(senderId: string, entry: WorkerEntry | undefined, hello: HelloMsg): void {
    if (hello.worker_id !== senderId) {
      this.send(senderId, { type: 'error', request_id: null, code: 'bad_message', message: `hello.worker_id '${hello.worker_id}' differs from the socket's routing id '${senderId}'; set both to the same id` });
      return;
    }
    if (this.closing) {
      this.send(senderId, { type: 'shutdown', reason: 'the control plane is shutting down' });
      return;
    }
    if (entry && entry.state === 'ready' && entry.spec === null) {
      // A remote worker reconnecting under its id: with `handover`, the new connection already owns
      // the id, so the old one is unreachable.
      this.markDead(entry, 'replaced by a new connection with the same worker id');
      entry = undefined;
    }
    if (entry && entry.state !== 'starting') {
      this.send(senderId, { type: 'error', request_id: null, code: 'bad_message', message: `worker id '${senderId}' is already in use (state ${entry.state}); pick another --worker-id` });
      return;
    }
    const worker = entry ?? this.newEntry(senderId, null);
    this.workers.set(senderId, worker);
    clearTimeout(worker.timer);
    worker.hello = hello;
    worker.state = 'ready';
    worker.readySince = Date.now();
    worker.lastSeen = Date.now();
    worker.maxInflight = Math.max(1, Math.min(this.opts.maxInflightPerWorker, hello.capabilities.max_inflight));
    this.send(senderId, { type: 'ready', worker_id: senderId, heartbeat_ms: this.opts.heartbeatMs });
    // A new process starts from its backend's settings: a late joiner (or a restart) gets the current policy.
    worker.policyVersion = 0;
    worker.policyRefused = null;
    if (this.policy) this.send(senderId, this.policy);
    this.log(`[pool] worker ${senderId} ready: pid ${hello.pid} on ${hello.host}, ${hello.engine}/${hello.backend} ${hello.model} on ${hello.device}${worker.spec ? '' : ' (joined remotely)'}`);
    worker.onReady?.();
    worker.onReady = undefined;
    this.pump();
  }

  // ------------------------------------------------------------------------------------------
  // Requests

  /**
   * Queues a request and returns its event stream. Throws `overloaded` at once when the queue is
   * full; every other failure is thrown from the stream.
   */
  submit(input: GenerateInput, params: SamplingParams, options: SubmitOptions = {}): AsyncIterable<GenerateEvent> {
    if (this.closing) throw new MosaicError('overloaded', 'the server is shutting down', { retryAfterS: 5 });
    if (this.queue.length >= this.opts.maxQueue && !this.hasFreeSlot()) {
      this.metrics.count('error', 'overloaded');
      throw new MosaicError('overloaded', `all workers are busy and ${this.queue.length} requests are already queued (limit ${this.opts.maxQueue}); retry later`, { retryAfterS: this.retryAfterS() });
    }
    const id = randomUUID();
    let frames: Buffer[];
    try {
      frames = encode({ type: 'generate', request_id: id, input, params });
    } catch (err) {
      if (err instanceof ProtocolError) throw new MosaicError('bad_request', `invalid generate request: ${err.message}`);
      throw err;
    }
    const request = new PendingRequest(id, frames, options.model ?? null, (r) => {
      this.metrics.count('cancelled');
      this.cancel(r);
    });
    request.deadline = setTimeout(() => {
      this.endWithError(request, new MosaicError('timeout', `the request ran past its deadline of ${this.opts.requestTimeoutMs} ms`));
      this.cancel(request);
    }, this.opts.requestTimeoutMs);
    options.signal?.addEventListener('abort', () => {
      if (!request.finished) {
        request.fail(new MosaicError('bad_request', 'the request was cancelled by its caller'));
        this.metrics.count('cancelled');
        this.cancel(request);
      }
    }, { once: true });
    this.queue.push(request);
    this.pump();
    return request;
  }

  private hasFreeSlot(): boolean {
    return [...this.workers.values()].some((w) => w.state === 'ready' && w.inflight.size < w.maxInflight);
  }

  /** Seconds a client should wait before retrying: a rough guess from the current queue. */
  private retryAfterS(): number {
    const ready = [...this.workers.values()].filter((w) => w.state === 'ready').length;
    return Math.max(1, Math.min(60, Math.ceil(this.queue.length / Math.max(1, ready))));
  }

  private endWithError(request: PendingRequest, error: MosaicError): void {
    if (request.finished) return;
    this.metrics.count('error', error.code);
    request.fail(error);
  }

  /** The caller stopped reading (or the deadline passed): stop the work wherever it is. */
  private cancel(request: PendingRequest): void {
    const queued = this.queue.indexOf(request);
    if (queued >= 0) {
      this.queue.splice(queued, 1);
      return;
    }
    const entry = request.workerId ? this.workers.get(request.workerId) : undefined;
    if (!entry || !entry.inflight.has(request.id)) return;
    this.send(entry.id, { type: 'cancel', request_id: request.id });
    request.cancelGrace = setTimeout(() => {
      if (entry.inflight.has(request.id)) this.markDead(entry, `request ${request.id} was not released ${CANCEL_GRACE_MS} ms after cancel`);
    }, CANCEL_GRACE_MS);
  }

  private release(entry: WorkerEntry, request: PendingRequest): void {
    entry.inflight.delete(request.id);
    clearTimeout(request.cancelGrace);
    request.workerId = null;
    this.pump();
  }

  /** Dispatches queued requests to the least loaded ready workers. */
  private pump(): void {
    while (this.queue.length > 0) {
      let best: WorkerEntry | undefined;
      for (const w of this.workers.values()) {
        if (w.state !== 'ready' || w.inflight.size >= w.maxInflight) continue;
        if (this.queue[0]!.model !== null && w.hello?.model !== this.queue[0]!.model) continue;
        if (!best || w.inflight.size / w.maxInflight < best.inflight.size / best.maxInflight) best = w;
      }
      if (!best) return;
      const request = this.queue.shift()!;
      if (request.finished) continue;
      const worker = best;
      request.workerId = worker.id;
      request.attempts += 1;
      worker.inflight.set(request.id, request);
      void this.sendFrames(worker.id, 'generate', request.frames).then((sent) => {
        if (!sent && worker.inflight.has(request.id)) this.markDead(worker, 'its socket refused a request');
      });
    }
  }

  // ------------------------------------------------------------------------------------------
  // Introspection

  /**
   * Publishes a segment policy to every ready worker (and, later, to each worker that joins); returns
   * its version. Workers ack it: see `workerInfo()`'s policyVersion / policyRefused.
   */
  publishPolicy(heads: HeadPolicyWire[]): number {
    const policy: PolicyMsg = { type: 'policy', version: (this.policy?.version ?? 0) + 1, heads };
    encode(policy); // validates now: a bad policy throws here and the current one stays
    this.policy = policy;
    for (const w of this.workers.values()) if (w.state === 'ready') this.send(w.id, this.policy);
    return this.policy.version;
  }

  private addTelemetry(message: TelemetryMsg): void {
    let acc = this.telemetryByModel.get(message.model);
    const same = acc && acc.headDim === message.head_dim && acc.dtype === message.dtype
      && acc.keepRatios.length === message.keep_ratios.length && acc.keepRatios.every((r, i) => r === message.keep_ratios[i]);
    if (!acc || !same) {
      if (acc) this.log(`[pool] telemetry for ${message.model} from ${message.worker_id} has other keep ratios or shape; starting over from it`);
      acc = {
        model: message.model, headDim: message.head_dim, dtype: message.dtype, keepRatios: [...message.keep_ratios],
        sums: new Map(), samples: 0, overheadS: 0, tokens: 0,
      };
      this.telemetryByModel.set(message.model, acc);
    }
    for (const curve of message.curves) {
      const key = `${curve.layer}/${curve.head}`;
      const sum = acc.sums.get(key);
      const s = sum ?? { layer: curve.layer, head: curve.head, loss: curve.loss.map(() => 0), count: 0, energy: null, energyCount: 0 };
      if (!sum) acc.sums.set(key, s);
      curve.loss.forEach((x, i) => (s.loss[i]! += x));
      s.count += 1;
      if (curve.energy) {
        const energy = (s.energy ??= curve.energy.map(() => 0));
        curve.energy.forEach((x, i) => (energy[i]! += x));
        s.energyCount += 1;
      }
    }
    acc.samples += 1;
    acc.overheadS += message.overhead_s;
    acc.tokens += message.tokens;
    for (const listener of this.telemetryListeners) listener(message.model, acc.samples);
  }

  private addRecall(message: RecallMsg): void {
    let acc = this.recallByModel.get(message.model);
    const same = acc && acc.tokenRatios.length === message.token_ratios.length && acc.tokenRatios.every((r, i) => r === message.token_ratios[i]);
    if (!acc || !same) {
      if (acc) this.log(`[pool] recall for ${message.model} from ${message.worker_id} has other token ratios; starting over from it`);
      acc = { tokenRatios: [...message.token_ratios], sums: new Map(), samples: 0, overheadS: 0, tokens: 0 };
      this.recallByModel.set(message.model, acc);
    }
    for (const head of message.heads) {
      const key = `${head.layer}/${head.head}`;
      const sum = acc.sums.get(key);
      if (sum) {
        head.recall.forEach((x, i) => (sum.recall[i]! += x));
        sum.count += 1;
      } else {
        acc.sums.set(key, { layer: head.layer, head: head.head, recall: [...head.recall], count: 1 });
      }
    }
    acc.samples += 1;
    acc.overheadS += message.overhead_s;
    acc.tokens += message.tokens;
  }

  /** The running mean decode recall per layer x KV head of the workers serving `model` (`recall`
   *  messages), ordered by layer and head; null before the first. */
  recall(model: string): RecallSummary | null {
    const acc = this.recallByModel.get(model);
    if (!acc) return null;
    const heads = [...acc.sums.values()]
      .sort((a, b) => a.layer - b.layer || a.head - b.head)
      .map((h) => ({ layer: h.layer, head: h.head, recall: h.recall.map((x) => x / h.count) }));
    return { tokenRatios: [...acc.tokenRatios], heads, samples: acc.samples, meanOverheadS: acc.overheadS / acc.samples, meanTokens: acc.tokens / acc.samples };
  }

  /** Models with telemetry (`telemetry` messages) received. */
  telemetryModels(): string[] {
    return [...this.telemetryByModel.keys()];
  }

  /** Models with decode recall samples (`recall` messages) received. */
  recallModels(): string[] {
    return [...this.recallByModel.keys()];
  }

  /**
   * The running mean of every curve the workers serving `model` sent (`telemetry` messages), in the
   * planner's shape, with the number of messages averaged (`samples`) and their mean overhead and
   * prompt length; null before the first. A head with decode recall samples (`recall` messages) carries
   * its mean recall curve too (token ratios below 1), from which the planner picks its token ratio.
   */
  telemetry(model: string): { telemetry: Telemetry; samples: number; meanOverheadS: number; meanTokens: number } | null {
    const acc = this.telemetryByModel.get(model);
    if (!acc) return null;
    const recall = new Map(this.recall(model)?.heads.map((h) => [`${h.layer}/${h.head}`, h]));
    const ratios = this.recallByModel.get(model)?.tokenRatios ?? [];
    const below1 = ratios.flatMap((r, i) => (r < 1 ? [i] : [])); // ratio 1 selects every block: nothing to choose
    const curves = [...acc.sums.values()]
      .sort((a, b) => a.layer - b.layer || a.head - b.head)
      .map((c) => {
        const loss = c.loss.map((x) => x / c.count); // means of [0, 1] (checked on the wire)
        const energy = c.energy ? { energy: c.energy.map((x) => x / c.energyCount) } : {};
        const r = recall.get(`${c.layer}/${c.head}`);
        return r && below1.length
          ? { layer: c.layer, head: c.head, loss, ...energy, recall: { tokenRatios: below1.map((i) => ratios[i]!), recall: below1.map((i) => r.recall[i]!) } }
          : { layer: c.layer, head: c.head, loss, ...energy };
      });
    return {
      telemetry: {
        model, nLayers: curves.length ? Math.max(...curves.map((c) => c.layer)) + 1 : 0, nKvHeads: curves.length ? Math.max(...curves.map((c) => c.head)) + 1 : 0,
        headDim: acc.headDim, dtype: acc.dtype, keepRatios: [...acc.keepRatios], curves, overheadS: acc.overheadS,
      },
      samples: acc.samples,
      meanOverheadS: acc.overheadS / acc.samples,
      meanTokens: acc.tokens / acc.samples,
    };
  }

  /** Calls `listener(model, samples)` after every `telemetry` message; returns the unsubscribe function. */
  onTelemetry(listener: (model: string, samples: number) => void): () => void {
    this.telemetryListeners.add(listener);
    return () => this.telemetryListeners.delete(listener);
  }

  workerInfo(): WorkerInfo[] {
    return [...this.workers.values()].map((w) => ({
      id: w.id,
      // The handshake's pid while the worker is up; a restarting worker's old hello is stale.
      pid: (w.state === 'ready' || w.state === 'stopping' ? w.hello?.pid : undefined) ?? w.child?.pid ?? null,
      host: w.hello?.host ?? null,
      engine: w.hello?.engine ?? w.spec?.engine ?? '',
      model: w.hello?.model ?? w.spec?.model ?? '',
      backend: w.hello?.backend ?? w.spec?.backend ?? '',
      device: w.hello?.device ?? null,
      state: w.state,
      inflight: w.inflight.size,
      maxInflight: w.maxInflight,
      kvBytes: w.kvBytes,
      spawned: w.spec !== null,
      restarts: w.restarts,
      policyVersion: w.policyVersion,
      policyRefused: w.policyRefused,
    }));
  }

  get queueDepth(): number {
    return this.queue.length;
  }

  /** Models of the workers that have said hello (restarting ones included), with the largest context each offers. */
  models(): { id: string; maxContext: number; chatTemplate: boolean }[] {
    const out = new Map<string, { id: string; maxContext: number; chatTemplate: boolean }>();
    for (const w of this.workers.values()) {
      if (!w.hello) continue;
      const caps = w.hello.capabilities;
      const prev = out.get(w.hello.model);
      out.set(w.hello.model, {
        id: w.hello.model,
        maxContext: Math.max(prev?.maxContext ?? 0, caps.max_context),
        chatTemplate: (prev?.chatTemplate ?? false) || caps.chat_template,
      });
    }
    return [...out.values()];
  }

  /** Asks every ready worker for `stats`; workers that do not answer within `timeoutMs` are left out. */
  async workerStats(timeoutMs = 2000): Promise<StatsMsg[]> {
    const ready = [...this.workers.values()].filter((w) => w.state === 'ready');
    const replies = ready.map((w) => new Promise<StatsMsg | null>((resolve) => {
      const nonce = ++this.nonce;
      const timer = setTimeout(() => {
        this.pendingStats.delete(nonce);
        resolve(null);
      }, timeoutMs);
      this.pendingStats.set(nonce, (stats) => {
        clearTimeout(timer);
        this.pendingStats.delete(nonce);
        resolve(stats);
      });
      this.send(w.id, { type: 'stats_request', nonce });
    }));
    return (await Promise.all(replies)).filter((s): s is StatsMsg => s !== null);
  }

  /** Prometheus text for the pool's own metrics, plus the engine numbers of `workerStats` (from `workerStats()`). */
  renderMetrics(workerStats: readonly StatsMsg[] = []): string {
    const m = this.metrics;
    const workers = this.workerInfo();
    const outcomes = (['stop', 'length', 'cancelled', 'error'] as const).map((o) => ({ labels: { outcome: o }, value: m.requests.get(o) ?? 0 }));
    const lines = [
      ...family('mosaickv_requests_total', 'counter', 'Finished requests by outcome.', outcomes),
      ...family('mosaickv_errors_total', 'counter', 'Failed requests by error code.', [...m.errors].map(([code, value]) => ({ labels: { code }, value }))),
      ...family('mosaickv_prompt_tokens_total', 'counter', 'Prompt tokens of completed requests.', [{ labels: {}, value: m.promptTokens }]),
      ...family('mosaickv_completion_tokens_total', 'counter', 'Generated tokens of completed requests.', [{ labels: {}, value: m.completionTokens }]),
      ...family('mosaickv_retries_total', 'counter', 'Requests retried after their worker died before streaming.', [{ labels: {}, value: m.retries }]),
      ...family('mosaickv_worker_restarts_total', 'counter', 'Worker restarts.', [{ labels: {}, value: m.restarts }]),
      ...m.latency.render('mosaickv_request_duration_seconds', 'Time from submission to the last token.'),
      ...m.firstToken.render('mosaickv_time_to_first_token_seconds', 'Time from submission to the first token.'),
      ...family('mosaickv_queue_depth', 'gauge', 'Requests waiting for a worker.', [{ labels: {}, value: this.queue.length }]),
      ...family('mosaickv_inflight', 'gauge', 'Requests running on each worker.', workers.map((w) => ({ labels: { worker: w.id }, value: w.inflight }))),
      ...family('mosaickv_worker_kv_bytes', 'gauge', 'KV cache bytes held by each worker (from its heartbeats).', workers.map((w) => ({ labels: { worker: w.id, backend: w.backend }, value: w.kvBytes }))),
      ...family('mosaickv_worker_up', 'gauge', '1 when the worker is ready.', workers.map((w) => ({ labels: { worker: w.id, state: w.state }, value: w.state === 'ready' ? 1 : 0 }))),
      ...engineFamilies(workerStats),
      ...family('mosaickv_decode_recall', 'gauge', 'Mean share of full attention mass on the blocks selected at token_ratio, per layer and KV head, over sampled decode steps.',
        this.recallModels().flatMap((model) => {
          const r = this.recall(model)!;
          return r.heads.flatMap((h) => h.recall.map((value, i) => ({
            labels: { model, layer: String(h.layer), head: String(h.head), token_ratio: String(r.tokenRatios[i]) }, value,
          })));
        })),
      ...family('mosaickv_decode_recall_samples', 'gauge', 'Sampled decode steps averaged into mosaickv_decode_recall.',
        this.recallModels().map((model) => ({ labels: { model }, value: this.recall(model)!.samples }))),
    ];
    return `${lines.join('\n')}\n`;
  }

  // ------------------------------------------------------------------------------------------
  // Shutdown

  /** Stops accepting work, asks workers to shut down, escalates to SIGTERM then SIGKILL. */
  async close(): Promise<void> {
    if (this.closing) return;
    this.closing = true;
    clearInterval(this.heartbeatTimer);
    for (const waiter of this.startupWaiters) waiter.reject(new MosaicError('engine_error', 'the pool was closed during startup'));
    this.startupWaiters.clear();
    for (const request of this.queue.splice(0)) {
      this.endWithError(request, new MosaicError('overloaded', 'the server is shutting down', { retryAfterS: 5 }));
    }
    const exits: Promise<void>[] = [];
    for (const entry of this.workers.values()) {
      clearTimeout(entry.timer);
      const wasReady = entry.state === 'ready';
      if (wasReady) this.send(entry.id, { type: 'shutdown', reason: 'the control plane is closing' });
      entry.state = 'stopping';
      const child = entry.child;
      if (child && child.exitCode === null && child.signalCode === null) {
        exits.push(new Promise<void>((resolve) => {
          child.once('exit', () => resolve());
          // A worker still loading its model cannot read `shutdown`: it gets SIGTERM at once.
          const term = setTimeout(() => child.kill('SIGTERM'), wasReady ? this.opts.shutdownGraceMs : 0);
          const kill = setTimeout(() => child.kill('SIGKILL'), (wasReady ? this.opts.shutdownGraceMs : 0) + 2000);
          child.once('exit', () => {
            clearTimeout(term);
            clearTimeout(kill);
          });
        }));
      }
    }
    await Promise.all(exits);
    // Requests still open had their worker exit under them.
    for (const entry of this.workers.values()) {
      for (const request of entry.inflight.values()) {
        this.endWithError(request, new MosaicError('worker_lost', 'the server shut down while the request was running'));
      }
      entry.inflight.clear();
    }
    await this.sendChain;
    this.router.close();
    await this.receiveLoop;
    await this.zap?.close();
    process.off('exit', this.onProcessExit);
    rmSync(this.runtimeDir, { recursive: true, force: true });
  }

  /** Last resort when Node exits without `close()`: no worker process may outlive it. */
  private killAllNow(): void {
    for (const entry of this.workers.values()) entry.child?.kill('SIGKILL');
  }
}

function prepareIpcPath(path: string, log: (line: string) => void): void {
  const dir = dirname(path);
  if (!existsSync(dir)) mkdirSync(dir, { recursive: true, mode: 0o700 });
  const mode = statSync(dir).mode & 0o777;
  if (mode & 0o077) log(`[pool] warning: ${dir} is mode ${mode.toString(8)}; other users may reach the socket directory (0700 recommended)`);
  if (existsSync(path)) {
    if (!lstatSync(path).isSocket()) throw new MosaicError('bad_request', `${path} exists and is not a socket; refusing to replace it`);
    rmSync(path); // a stale socket from a previous run
  }
}

/** Loads the server key pair and the allow-list directory written by `mosaickv keygen`. */
export function loadCurveOptions(serverSecretFile: string, clientsDir: string): CurveOptions {
  const cert = readCertificate(serverSecretFile);
  if (!cert.secretKey) throw new MosaicError('bad_request', `${serverSecretFile} has no secret-key: pass the server's *.key_secret file`);
  return { serverKeys: { publicKey: cert.publicKey, secretKey: cert.secretKey }, allowedClients: readAllowList(clientsDir) };
}
