// `mosaickv demo`: the embedded model behind the HTTP API, a few completions printed.
import { ControlPlane } from '../index.js';

export interface DemoOptions {
  model: string;
  backend: string;
  workers: number;
  python?: string;
}

const PROMPTS = ['The three primary colors are', 'Write one sentence about the sea.'];

export async function demo(options: DemoOptions): Promise<number> {
  const started = performance.now();
  console.log(`[demo] starting ${options.workers} worker(s) with ${options.model} (${options.backend}); loading the model takes a few seconds`);
  const cp = await ControlPlane.start({
    workers: Array.from({ length: options.workers }, () => ({ engine: 'hf', backend: options.backend, model: options.model })),
    ...(options.python ? { python: options.python } : {}),
    // Pool events only; the workers' own logs would drown the completions (a failed start still
    // reports the worker's last output in its error).
    log: (line) => {
      if (line.startsWith('[pool]')) console.log(line);
    },
  });
  const http = await cp.listen({ port: 0 });
  try {
    console.log(`[demo] ready in ${((performance.now() - started) / 1000).toFixed(1)} s; HTTP API on ${http.url}`);

    // Non-streaming completion.
    const body = { model: options.model, prompt: PROMPTS[0], max_tokens: 24, temperature: 0 };
    const res = await fetch(`${http.url}/v1/completions`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) });
    const json = (await res.json()) as { choices: { text: string; finish_reason: string }[]; usage: unknown };
    console.log(`\n[demo] POST /v1/completions (status ${res.status}) prompt: ${JSON.stringify(PROMPTS[0])}`);
    console.log(`${PROMPTS[0]}${json.choices[0]?.text}`);
    console.log(`[demo] finish_reason=${json.choices[0]?.finish_reason} usage=${JSON.stringify(json.usage)}`);

    // Streaming chat completion, printed as it arrives.
    console.log(`\n[demo] POST /v1/chat/completions stream=true: ${JSON.stringify(PROMPTS[1])}`);
    const stream = await fetch(`${http.url}/v1/chat/completions`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ model: options.model, messages: [{ role: 'user', content: PROMPTS[1] }], max_tokens: 40, temperature: 0, stream: true, stream_options: { include_usage: true } }),
    });
    const decoder = new TextDecoder();
    let pending = '';
    for await (const bytes of stream.body!) {
      pending += decoder.decode(bytes as Uint8Array, { stream: true });
      const events = pending.split('\n\n');
      pending = events.pop() ?? '';
      for (const event of events) {
        const data = event.replace(/^data: /, '');
        if (data === '[DONE]') continue;
        const chunk = JSON.parse(data) as { choices: { delta: { content?: string } }[]; usage?: unknown; error?: { message: string } };
        if (chunk.error) console.log(`\n[demo] error: ${chunk.error.message}`);
        process.stdout.write(chunk.choices[0]?.delta.content ?? '');
        if (chunk.usage) console.log(`\n[demo] usage=${JSON.stringify(chunk.usage)}`);
      }
    }

    // The TypeScript API directly, two requests at once (one per worker).
    console.log('\n[demo] two concurrent requests through the TypeScript API:');
    const results = await Promise.all([
      cp.complete({ prompt: PROMPTS[0], maxTokens: 16, temperature: 0 }),
      cp.complete({ messages: [{ role: 'user', content: PROMPTS[1]! }], maxTokens: 24, temperature: 0 }),
    ]);
    console.log(`  [${results[0].done.workerId}] ${PROMPTS[0]}${results[0].text}  (kv_bytes=${results[0].done.kvBytes})`);
    console.log(`  [${results[1].done.workerId}] ${PROMPTS[1]} -> ${results[1].text}  (kv_bytes=${results[1].done.kvBytes})`);
  } finally {
    await http.close();
    await cp.close();
  }
  // A short A/B on the same model: full attention vs MosaicKV (a uniform and, for the embedded model,
  // the planned per-head policy of bench/accuracy/README.md) vs naive 2-D at 3x less real KV memory.
  const { formatTable, progressBar, runAb } = await import('../ab/ab.js');
  const { renderReport } = await import('../ab/report.js');
  const { join } = await import('node:path');
  const { PACKAGE_ROOT } = await import('../control/pool.js');
  const planned = options.model === 'smollm2-135m' ? [`mosaic:policy=${join(PACKAGE_ROOT, 'bench', 'results', 'plan_smollm2_1k.json')}`] : [];
  console.log(`\n[demo] A/B: niah_single_1 at 1024 tokens, full vs mosaic (uniform${planned.length ? ', planned' : ''}) vs naive2d at 3x less real KV memory`);
  const ab = await runAb({
    model: options.model, tasks: ['niah_single_1'], ctx: 1024, samples: 1, methods: ['full', 'mosaic', ...planned, 'naive2d'], budgetRatio: 3,
    ...(options.python ? { python: options.python } : {}), progress: progressBar,
  });
  console.log(formatTable(ab));
  const { mkdirSync, writeFileSync } = await import('node:fs');
  mkdirSync('reports', { recursive: true });
  writeFileSync('reports/demo-ab.html', renderReport(ab));
  console.log('[demo] A/B report: reports/demo-ab.html (more: mosaickv ab --help)');
  console.log(`[demo] done in ${((performance.now() - started) / 1000).toFixed(1)} s`);
  return 0;
}
