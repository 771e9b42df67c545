// End to end with the real thing: two Python worker processes (`python -m mosaickv.worker`, model
// `tiny-random`: a small randomly initialised Llama, real transformers code) behind the real ROUTER
// socket and the real HTTP server. Tests run in order and share the pool; the last one shuts it down.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Dealer } from 'zeromq';
import { ControlPlane, type HttpServer } from '../src/index.js';
import { encode } from '../src/protocol/protocol.js';
import { isAlive, post, readSse, waitFor } from './helpers.js';

const API_KEY = 'test-key-123';
const AUTH = { authorization: `Bearer ${API_KEY}` };
const MAX_INFLIGHT = 2;
const MAX_QUEUE = 2;

let cp: ControlPlane;
let http: HttpServer;
const logs: string[] = [];

interface AdminWorker {
  id: string;
  pid: number;
  state: string;
  inflight: number;
  engine: string;
  model: string;
  backend: string;
  host: string;
}

async function adminWorkers(): Promise<AdminWorker[]> {
  const res = await fetch(`${http.url}/admin/workers`, { headers: AUTH });
  expect(res.status).toBe(200);
  return ((await res.json()) as { workers: AdminWorker[] }).workers;
}

beforeAll(async () => {
  cp = await ControlPlane.start({
    workers: [
      { engine: 'hf', backend: 'stock', model: 'tiny-random', device: 'cpu' },
      { engine: 'hf', backend: 'stock', model: 'tiny-random', device: 'cpu' },
    ],
    heartbeatMs: 1000,
    maxInflightPerWorker: MAX_INFLIGHT,
    maxQueue: MAX_QUEUE,
    requestTimeoutMs: 60_000,
    restartBackoffMs: { initial: 200, max: 2000 },
    log: (line) => logs.push(line),
  });
  http = await cp.listen({ port: 0, apiKey: API_KEY, maxTokens: 512, bodyLimit: 64 * 1024 });
});

// Normally the last test has closed both already; this covers a failure before it (close is idempotent).
afterAll(async () => {
  await http?.close().catch(() => undefined);
  await cp?.close();
});

describe('HTTP API over real workers', () => {
  it('binds loopback and serves /health without a key', async () => {
    expect(http.url).toMatch(/^http:\/\/127\.0\.0\.1:\d+$/);
    const res = await fetch(`${http.url}/health`);
    expect(res.status).toBe(200);
    expect(await res.json()).toMatchObject({ status: 'ok', workers_ready: 2, workers_total: 2 });
  });

  it('requires the API key on every other route, admin included', async () => {
    for (const [method, path] of [['GET', '/v1/models'], ['GET', '/admin/workers'], ['GET', '/metrics'], ['POST', '/v1/completions']] as const) {
      const missing = await fetch(`${http.url}${path}`, { method });
      expect(missing.status, `${method} ${path}`).toBe(401);
      const body = (await missing.json()) as { error: { code: string; type: string; message: string } };
      expect(body.error.code).toBe('unauthorized');
      expect(body.error.type).toBe('authentication_error');
      const wrong = await fetch(`${http.url}${path}`, { method, headers: { authorization: 'Bearer nope' } });
      expect(wrong.status).toBe(401);
    }
  });

  it('lists the model and the workers with their real pids', async () => {
    const models = (await (await fetch(`${http.url}/v1/models`, { headers: AUTH })).json()) as { data: { id: string }[] };
    expect(models.data.map((m) => m.id)).toEqual(['tiny-random']);
    const workers = await adminWorkers();
    expect(workers).toHaveLength(2);
    for (const w of workers) {
      expect(w).toMatchObject({ state: 'ready', engine: 'hf', backend: 'stock', model: 'tiny-random', inflight: 0 });
      expect(isAlive(w.pid)).toBe(true);
      expect(w.pid).not.toBe(process.pid);
    }
  });

  it('answers a non-streaming completion and a chat completion with usage', async () => {
    const res = await post(`${http.url}/v1/completions`, { model: 'tiny-random', prompt: 'Hello there', max_tokens: 5, temperature: 0, ignore_eos: true }, AUTH);
    expect(res.status).toBe(200);
    const body = (await res.json()) as { object: string; choices: { text: string; finish_reason: string }[]; usage: Record<string, number> };
    expect(body.object).toBe('text_completion');
    expect(body.choices[0]!.finish_reason).toBe('length');
    expect(typeof body.choices[0]!.text).toBe('string');
    expect(body.usage.completion_tokens).toBe(5);
    expect(body.usage.prompt_tokens).toBeGreaterThan(0);
    expect(body.usage.total_tokens).toBe(body.usage.prompt_tokens! + 5);

    const chat = await post(`${http.url}/v1/chat/completions`, { messages: [{ role: 'user', content: 'Hi' }], max_tokens: 4, ignore_eos: true }, AUTH);
    expect(chat.status).toBe(200);
    const chatBody = (await chat.json()) as { object: string; choices: { message: { role: string; content: string } }[]; usage: Record<string, number> };
    expect(chatBody.object).toBe('chat.completion');
    expect(chatBody.choices[0]!.message.role).toBe('assistant');
    expect(chatBody.usage.completion_tokens).toBe(4);
  });

  it('streams concurrent requests over SSE, spread over both workers', async () => {
    const n = 4;
    const seenWorkers = new Set<string>();
    const watcher = setInterval(() => cp.workers().forEach((w) => w.inflight > 0 && seenWorkers.add(w.id)), 20);
    const results = await Promise.all(Array.from({ length: n }, (_, i) =>
      post(`${http.url}/v1/completions`, { prompt: `Request number ${i}`, max_tokens: 12, ignore_eos: true, stream: true, stream_options: { include_usage: true } }, AUTH).then((r) => readSse(r)),
    ));
    clearInterval(watcher);
    for (const r of results) {
      expect(r.status).toBe(200);
      expect(r.headers.get('content-type')).toContain('text/event-stream');
      expect(r.sawDone).toBe(true);
      const choices = r.events.filter((e) => (e.choices as unknown[]).length > 0).map((e) => (e.choices as { text: string; finish_reason: string | null }[])[0]!);
      expect(choices.at(-1)!.finish_reason).toBe('length');
      expect(choices.slice(0, -1).every((c) => c.finish_reason === null)).toBe(true);
      expect(choices.length).toBeGreaterThan(1);
      const usage = r.events.at(-1)!.usage as Record<string, number>;
      expect(usage.completion_tokens).toBe(12);
    }
    expect(seenWorkers.size).toBe(2);
  });
});

describe('bad requests', () => {
  const cases: [string, string | Record<string, unknown>, number, string, string][] = [
    ['invalid JSON', '{"prompt": ', 400, 'bad_request', ''],
    ['a JSON array body', '[1, 2]', 400, 'bad_request', 'JSON object'],
    ['missing prompt', { max_tokens: 3 }, 400, 'bad_request', 'prompt'],
    ['max_tokens 0', { prompt: 'a', max_tokens: 0 }, 400, 'bad_request', 'max_tokens'],
    ['max_tokens above the bound', { prompt: 'a', max_tokens: 100_000 }, 400, 'bad_request', 'max_tokens'],
    ['a fractional max_tokens', { prompt: 'a', max_tokens: 2.5 }, 400, 'bad_request', 'max_tokens'],
    ['temperature as a string', { prompt: 'a', temperature: 'hot' }, 400, 'bad_request', 'temperature'],
    ['top_p of 0', { prompt: 'a', top_p: 0 }, 400, 'bad_request', 'top_p'],
    ['an unknown field', { prompt: 'a', frobnicate: true }, 400, 'bad_request', 'frobnicate'],
    ['n = 2', { prompt: 'a', n: 2 }, 400, 'unsupported', "'n'"],
    ['a prompt of objects', { prompt: [{ a: 1 }] }, 400, 'bad_request', 'prompt'],
    ['an unknown model', { prompt: 'a', model: 'gpt-9' }, 404, 'not_found', 'gpt-9'],
    ['a body over the size limit', { prompt: 'x'.repeat(100 * 1024) }, 400, 'bad_request', 'too large'],
  ];
  for (const [name, body, status, code, mentions] of cases) {
    it(`rejects ${name} with ${status} ${code}`, async () => {
      const res = await post(`${http.url}/v1/completions`, body, AUTH);
      expect(res.status).toBe(status);
      const json = (await res.json()) as { error: { code: string; message: string; type: string } };
      expect(json.error.code).toBe(code);
      expect(json.error.message).toContain(mentions);
      expect(json.error.type).toMatch(/error$/);
    });
  }

  it("passes the worker's context_too_long through as a 400, before any stream starts", async () => {
    const models = (await (await fetch(`${http.url}/v1/models`, { headers: AUTH })).json()) as { data: { max_model_len: number }[] };
    const maxContext = models.data[0]!.max_model_len;
    const res = await post(`${http.url}/v1/completions`, { prompt: new Array(maxContext).fill(1), max_tokens: 8, stream: true }, AUTH);
    expect(res.status).toBe(400);
    expect(res.headers.get('content-type')).toContain('application/json');
    const json = (await res.json()) as { error: { code: string; message: string } };
    expect(json.error.code).toBe('context_too_long');
    expect(json.error.message).toContain(String(maxContext));
  });

  it('rejects a chat request without messages and an unknown route', async () => {
    const chat = await post(`${http.url}/v1/chat/completions`, { messages: [] }, AUTH);
    expect(chat.status).toBe(400);
    expect(((await chat.json()) as { error: { message: string } }).error.message).toContain('messages');
    const route = await fetch(`${http.url}/v2/nothing`, { headers: AUTH });
    expect(route.status).toBe(404);
    expect(((await route.json()) as { error: { code: string } }).error.code).toBe('not_found');
  });
});

describe('backpressure and cancellation', () => {
  it('answers 503 with Retry-After beyond in-flight + queue capacity, and frees slots when clients leave', async () => {
    const capacity = 2 * MAX_INFLIGHT + MAX_QUEUE;
    const abort = new AbortController();
    const long = { prompt: 'Keep going', max_tokens: 500, ignore_eos: true, stream: true };
    const accepted: Promise<unknown>[] = [];
    for (let i = 0; i < capacity; i++) {
      accepted.push(post(`${http.url}/v1/completions`, long, AUTH, abort.signal).then((r) => readSse(r)).catch(() => 'aborted'));
    }
    await waitFor('the pool to be full', () => cp.workers().every((w) => w.inflight === MAX_INFLIGHT) && cp.pool.queueDepth === MAX_QUEUE);
    const rejected = await post(`${http.url}/v1/completions`, { prompt: 'one more', max_tokens: 2 }, AUTH);
    expect(rejected.status).toBe(503);
    expect(Number(rejected.headers.get('retry-after'))).toBeGreaterThanOrEqual(1);
    expect(((await rejected.json()) as { error: { code: string } }).error.code).toBe('overloaded');

    // Clients hang up: their requests are cancelled on the workers and the slots come back.
    abort.abort();
    await Promise.all(accepted);
    await waitFor('slots to be released', () => cp.workers().every((w) => w.inflight === 0) && cp.pool.queueDepth === 0, 30_000);
    const after = await post(`${http.url}/v1/completions`, { prompt: 'after', max_tokens: 2, ignore_eos: true }, AUTH);
    expect(after.status).toBe(200);
  });
});

describe('worker failures', () => {
  it('survives kill -9 of a worker mid-request: clear error or completion, restart, later requests succeed', async () => {
    const before = await adminWorkers();
    const streams = [0, 1].map((i) => {
      let tokens = 0;
      const done = post(`${http.url}/v1/completions`, { prompt: `Victim ${i}`, max_tokens: 60, ignore_eos: true, stream: true }, AUTH)
        .then((r) => readSse(r, () => (tokens += 1)));
      return { done, tokens: () => tokens };
    });
    await waitFor('both requests to stream', () => streams.every((s) => s.tokens() >= 2));
    const victim = (await adminWorkers()).find((w) => w.inflight > 0)!;
    process.kill(victim.pid, 'SIGKILL');

    for (const result of await Promise.all(streams.map((s) => s.done))) {
      expect(result.sawDone).toBe(true);
      const last = result.events.at(-1)!;
      if ('error' in last) {
        const error = last.error as { code: string; message: string };
        expect(error.code).toBe('worker_lost');
        expect(error.message).toContain(victim.id);
      } else {
        expect((last.choices as { finish_reason: string }[])[0]!.finish_reason).toBe('length');
      }
    }
    // At least the victim's own request must have ended with the error (it had streamed tokens).
    const errors = (await Promise.all(streams.map((s) => s.done))).filter((r) => 'error' in r.events.at(-1)!);
    expect(errors.length).toBeGreaterThanOrEqual(1);

    const restarted = await waitFor('the pool to restart the worker', async () => {
      const w = (await adminWorkers()).find((x) => x.id === victim.id);
      return w && w.state === 'ready' && w.pid !== victim.pid ? w : undefined;
    });
    expect(isAlive(restarted.pid)).toBe(true);
    expect(isAlive(victim.pid)).toBe(false);
    expect(before.find((w) => w.id === victim.id)!.pid).toBe(victim.pid);

    const results = await Promise.all([0, 1, 2].map((i) => post(`${http.url}/v1/completions`, { prompt: `after ${i}`, max_tokens: 3, ignore_eos: true }, AUTH)));
    expect(results.map((r) => r.status)).toEqual([200, 200, 200]);
    const metrics = await (await fetch(`${http.url}/metrics`, { headers: AUTH })).text();
    expect(metrics).toMatch(/^mosaickv_worker_restarts_total [1-9]/m);
    expect(metrics).toMatch(/^mosaickv_errors_total\{code="worker_lost"\} [1-9]/m);
  });

  it('answers malformed frames sent straight to the ROUTER with errors and keeps serving', async () => {
    const intruder = new Dealer({ routingId: 'intruder', linger: 0, receiveTimeout: 5000 });
    intruder.connect(cp.endpoint);
    const ask = async (frames: (Buffer | string)[]) => {
      await intruder.send(frames);
      const [header] = await intruder.receive();
      const { decode } = await import('../src/protocol/protocol.js');
      return decode([header!]) as { type: string; code: string; message: string; request_id: string | null };
    };
    try {
      const garbage = await ask([Buffer.from([0xc1, 0xff, 0x00])]);
      expect(garbage).toMatchObject({ type: 'error', code: 'bad_message', request_id: null });
      const unknown = await ask([Buffer.from([0x82, 0xa1, 0x76, 0x01, 0xa4, 0x74, 0x79, 0x70, 0x65, 0xa3, 0x62, 0x61, 0x64])]); // {v: 1, type: "bad"}
      expect(unknown.code).toBe('bad_message');
      expect(unknown.message).toContain('unknown message type');
      const wrongVersion = await ask([Buffer.from([0x82, 0xa1, 0x76, 0x07, 0xa4, 0x74, 0x79, 0x70, 0x65, 0xa5, 0x68, 0x65, 0x6c, 0x6c, 0x6f])]); // {v: 7, type: "hello"}
      expect(wrongVersion.code).toBe('protocol_version');
      const beforeHello = await ask(encode({ type: 'token', request_id: 'x', index: 0, text: 'a', token_ids: [1] }));
      expect(beforeHello.message).toContain('hello first');
      const stray = await ask([...encode({ type: 'heartbeat', worker_id: 'intruder', inflight: 0, kv_bytes: 0 }), Buffer.from('extra')]);
      expect(stray.message).toContain('not referenced');
    } finally {
      intruder.close();
    }
    const res = await post(`${http.url}/v1/completions`, { prompt: 'still here', max_tokens: 2, ignore_eos: true }, AUTH);
    expect(res.status).toBe(200);
    expect(cp.workers().filter((w) => w.state === 'ready')).toHaveLength(2);
  });

  it('reports stats from the workers themselves', async () => {
    const stats = await cp.stats();
    expect(stats.workerStats.map((s) => s.worker_id).sort()).toEqual(['w0', 'w1']);
    expect(stats.workerStats.reduce((a, s) => a + s.requests_total, 0)).toBeGreaterThan(0);
    expect(stats.queueDepth).toBe(0);
    // /metrics carries each worker's engine map (tests/policy_e2e checks the cache manager's cache_*)
    const metrics = await (await fetch(`${http.url}/metrics`, { headers: AUTH })).text();
    for (const id of ['w0', 'w1']) expect(metrics).toMatch(new RegExp(`^mosaickv_engine_decode_tokens\\{worker="${id}"\\} \\d+$`, 'm'));
  });

  it('retries a request on another worker when its worker dies before streaming anything', async () => {
    // w0 is frozen (SIGSTOP) so that the request dispatched to it cannot stream; then it is killed.
    const [w0] = cp.workers();
    expect(w0!.id).toBe('w0');
    process.kill(w0!.pid!, 'SIGSTOP');
    const retriesBefore = cp.pool.metrics.retries;
    const completion = cp.complete({ prompt: 'retry me', maxTokens: 4, ignoreEos: true });
    // Ties go to the first worker, so the request lands on the frozen w0.
    await waitFor('the request to reach w0', () => cp.workers().find((w) => w.id === 'w0')!.inflight === 1, 5000);
    process.kill(w0!.pid!, 'SIGKILL');
    const result = await completion;
    expect(result.done.workerId).toBe('w1');
    expect(result.done.usage.completionTokens).toBe(4);
    expect(cp.pool.metrics.retries).toBe(retriesBefore + 1);
  });

  it('shuts down leaving no worker process behind', async () => {
    // w0 may still be restarting after the previous test: its loading process must go too.
    const pids = cp.workers().map((w) => w.pid).filter((pid): pid is number => pid !== null);
    expect(pids.length).toBeGreaterThanOrEqual(1);
    expect(pids.every(isAlive)).toBe(true);
    await http.close();
    await cp.close();
    expect(pids.filter(isAlive)).toEqual([]);
    expect(logs.some((l) => l.includes('[pool] worker w0 ready'))).toBe(true);
  });
});
