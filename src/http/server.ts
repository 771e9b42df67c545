// The OpenAI-compatible HTTP front end (Fastify). Every error — ours, Fastify's, a route that does
// not exist — leaves as OpenAI's error body with the catalogue's status.
import { randomUUID, timingSafeEqual, createHash } from 'node:crypto';
import Fastify, { type FastifyInstance, type FastifyReply } from 'fastify';
import { MosaicError } from '../protocol/errors.js';
import type { ControlPlane, DoneEvent, GenerateEvent } from '../index.js';
import { parseChat, parseCompletion, usage, type ParsedRequest } from './openai.js';

export interface HttpOptions {
  port: number;
  /** Default 127.0.0.1: the API is not exposed beyond this machine unless asked. */
  host?: string;
  /** Requires `Authorization: Bearer <key>` on every route but /health. */
  apiKey?: string;
  /** Largest accepted request body in bytes (default 1 MiB). */
  bodyLimit?: number;
  /** Largest accepted max_tokens (default 4096). */
  maxTokens?: number;
}

export interface HttpServer {
  /** Where it listens, e.g. http://127.0.0.1:8000 */
  url: string;
  port: number;
  app: FastifyInstance;
  close(): Promise<void>;
}

type Kind = 'completion' | 'chat';

function digest(s: string): Buffer {
  return createHash('sha256').update(s).digest();
}

function sendError(reply: FastifyReply, error: MosaicError): FastifyReply {
  if (error.retryAfterS !== undefined) reply.header('retry-after', String(error.retryAfterS));
  return reply.code(error.status).type('application/json').send(error.toOpenAI());
}

/** Any thrown value as a catalogue error (Fastify's own 4xx — bad JSON, body too large — are bad requests). */
function toMosaicError(err: unknown): MosaicError {
  if (err instanceof MosaicError) return err;
  const e = err as { statusCode?: number; message?: string; code?: string };
  if (e.statusCode === 413) return new MosaicError('bad_request', `request body too large: ${e.message}`);
  if (e.statusCode && e.statusCode >= 400 && e.statusCode < 500) return new MosaicError('bad_request', e.message ?? 'bad request');
  return new MosaicError('engine_error', `internal error: ${e.message ?? String(err)}`);
}

export async function startHttpServer(cp: ControlPlane, options: HttpOptions): Promise<HttpServer> {
  const maxTokens = options.maxTokens ?? 4096;
  const app = Fastify({ bodyLimit: options.bodyLimit ?? 1 << 20, logger: false });
  const httpCounts = new Map<string, number>();
  const expectedKey = options.apiKey ? digest(options.apiKey) : null;

  app.addHook('onRequest', async (request, reply) => {
    if (!expectedKey || request.url === '/health') return;
    const header = request.headers.authorization ?? '';
    const given = header.startsWith('Bearer ') ? header.slice('Bearer '.length) : null;
    // Hashes have equal length, so the comparison takes the same time whatever was sent.
    if (given === null || !timingSafeEqual(digest(given), expectedKey)) {
      return sendError(reply, new MosaicError('unauthorized', 'missing or wrong API key: send "Authorization: Bearer <key>"'));
    }
  });
  app.addHook('onResponse', async (request, reply) => {
    const key = `${request.routeOptions.url ?? 'unmatched'}|${reply.statusCode}`;
    httpCounts.set(key, (httpCounts.get(key) ?? 0) + 1);
  });
  app.setErrorHandler((err, _request, reply) => sendError(reply, toMosaicError(err)));
  app.setNotFoundHandler((request, reply) => sendError(reply, new MosaicError('not_found', `no route ${request.method} ${request.url}; see docs/CONTROL.md for the API`)));

  app.get('/health', async (_request, reply) => {
    const workers = cp.workers();
    const ready = workers.filter((w) => w.state === 'ready').length;
    return reply.code(ready > 0 ? 200 : 503).send({ status: ready > 0 ? 'ok' : 'no_ready_workers', workers_ready: ready, workers_total: workers.length });
  });

  app.get('/v1/models', async () => ({
    object: 'list',
    data: cp.models().map((m) => ({ id: m.id, object: 'model', created: 0, owned_by: 'mosaickv', max_model_len: m.maxContext })),
  }));

  app.get('/admin/workers', async () => ({
    workers: cp.workers().map((w) => ({
      id: w.id, pid: w.pid, host: w.host, engine: w.engine, model: w.model, backend: w.backend, device: w.device,
      state: w.state, inflight: w.inflight, max_inflight: w.maxInflight, kv_bytes: w.kvBytes, spawned: w.spawned, restarts: w.restarts,
      policy_version: w.policyVersion, policy_refused: w.policyRefused,
    })),
    queue_depth: cp.pool.queueDepth,
    // Per model, the mean planner curves of sampled prompts (`telemetry` messages), per layer x KV head:
    // attention loss and, where measured, energy not kept, at each keep ratio.
    telemetry: Object.fromEntries(cp.pool.telemetryModels().map((model) => {
      const t = cp.pool.telemetry(model)!;
      return [model, { keep_ratios: t.telemetry.keepRatios, samples: t.samples, mean_overhead_s: t.meanOverheadS, mean_tokens: t.meanTokens, curves: t.telemetry.curves }];
    })),
    // Per model, the mean block-selection recall of sampled decode steps (`recall` messages), per layer x KV head.
    decode_recall: Object.fromEntries(cp.pool.recallModels().map((model) => {
      const r = cp.pool.recall(model)!;
      return [model, { token_ratios: r.tokenRatios, samples: r.samples, mean_overhead_s: r.meanOverheadS, mean_tokens: r.meanTokens, heads: r.heads }];
    })),
  }));

  app.get('/metrics', async (_request, reply) => {
    const lines = ['# HELP mosaickv_http_requests_total HTTP responses by route and status.', '# TYPE mosaickv_http_requests_total counter'];
    for (const [key, value] of httpCounts) {
      const [route, status] = key.split('|');
      lines.push(`mosaickv_http_requests_total{route="${route}",status="${status}"} ${value}`);
    }
    // Each ready worker's own numbers (a worker that does not answer within a second is left out).
    const pool = cp.pool.renderMetrics(await cp.pool.workerStats(1000));
    return reply.type('text/plain; version=0.0.4; charset=utf-8').send(`${pool}${lines.join('\n')}\n`);
  });

  app.post('/v1/completions', (request, reply) => generate(cp, 'completion', parseCompletion(request.body, maxTokens), reply));
  app.post('/v1/chat/completions', (request, reply) => generate(cp, 'chat', parseChat(request.body, maxTokens), reply));

  await app.listen({ port: options.port, host: options.host ?? '127.0.0.1' });
  const address = app.server.address();
  const port = typeof address === 'object' && address ? address.port : options.port;
  const host = options.host ?? '127.0.0.1';
  return { url: `http://${host.includes(':') ? `[${host}]` : host}:${port}`, port, app, close: () => app.close() };
}

async function generate(cp: ControlPlane, kind: Kind, parsed: ParsedRequest, reply: FastifyReply): Promise<unknown> {
  const models = cp.models();
  const model = parsed.model ?? models[0]?.id;
  if (parsed.model !== undefined && !models.some((m) => m.id === parsed.model)) {
    throw new MosaicError('not_found', `model '${parsed.model}' is not served here; available: ${models.map((m) => m.id).join(', ') || '(no ready worker yet)'}`);
  }
  // The client going away (mid-stream or while waiting) cancels the request on its worker.
  const abort = new AbortController();
  let finished = false;
  reply.raw.on('close', () => {
    if (!finished) abort.abort();
  });
  const events = cp.generate({ ...parsed.request, model, signal: abort.signal })[Symbol.asyncIterator]();
  const id = `${kind === 'chat' ? 'chatcmpl' : 'cmpl'}-${randomUUID()}`;
  const created = Math.floor(Date.now() / 1000);
  const base = { id, object: kind === 'chat' ? 'chat.completion.chunk' : 'text_completion', created, model };

  // Wait for the first event before answering: an error before any token gets a proper status.
  const first: IteratorResult<GenerateEvent> = await events.next();

  if (!parsed.stream) {
    let text = '';
    let event = first;
    let done: DoneEvent | undefined;
    for (; !event.done; event = await events.next()) {
      if (event.value.type === 'token') text += event.value.text;
      else done = event.value;
    }
    finished = true;
    if (!done) throw new MosaicError('engine_error', 'the request ended without a done event');
    const choice = kind === 'chat'
      ? { index: 0, message: { role: 'assistant', content: text }, finish_reason: done.finishReason, logprobs: null }
      : { index: 0, text, finish_reason: done.finishReason, logprobs: null };
    return reply.send({ ...base, object: kind === 'chat' ? 'chat.completion' : 'text_completion', choices: [choice], usage: usage(done) });
  }

  reply.hijack();
  const res = reply.raw;
  res.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-cache', connection: 'keep-alive' });
  const write = async (data: unknown) => {
    if (res.destroyed) return;
    if (!res.write(`data: ${typeof data === 'string' ? data : JSON.stringify(data)}\n\n`)) {
      await new Promise<void>((resolve) => {
        res.once('drain', resolve);
        res.once('close', resolve);
      });
    }
  };
  const chunk = (delta: string, finishReason: string | null) => ({
    ...base,
    choices: [kind === 'chat'
      ? { index: 0, delta: finishReason ? {} : { content: delta }, finish_reason: finishReason, logprobs: null }
      : { index: 0, text: delta, finish_reason: finishReason, logprobs: null }],
  });
  try {
    if (kind === 'chat') await write({ ...base, choices: [{ index: 0, delta: { role: 'assistant', content: '' }, finish_reason: null, logprobs: null }] });
    for (let event = first; !event.done; event = await events.next()) {
      if (event.value.type === 'token') {
        await write(chunk(event.value.text, null));
      } else {
        await write(chunk('', event.value.finishReason));
        if (parsed.includeUsage) await write({ ...base, choices: [], usage: usage(event.value) });
      }
    }
  } catch (err) {
    // Headers are gone: the error travels as an SSE event in OpenAI's error shape.
    await write(toMosaicError(err).toOpenAI());
  } finally {
    finished = true;
    await write('[DONE]');
    res.end();
  }
  return reply;
}
