// The TypeScript API in a script: start two workers with the embedded model, stream one request,
// run two more at once, print the pool's stats, shut down. Run after `npm install`:
//   node examples/generate.mjs [model]        (default: smollm2-135m; tiny-random is faster)
import { ControlPlane } from 'mosaickv';

const model = process.argv[2] ?? 'smollm2-135m';
const cp = await ControlPlane.start({
  workers: [
    { engine: 'hf', backend: 'stock', model },
    { engine: 'hf', backend: 'stock', model },
  ],
  log: (line) => line.startsWith('[pool]') && console.error(line),
});

try {
  process.stdout.write('Streaming: The capital of France is');
  for await (const chunk of cp.generate({ prompt: 'The capital of France is', maxTokens: 20, temperature: 0 })) {
    if (chunk.type === 'token') process.stdout.write(chunk.text);
    else console.log(`\n  -> ${chunk.finishReason}, ${chunk.usage.completionTokens} tokens on ${chunk.workerId}, KV ${chunk.kvBytes} bytes`);
  }

  const answers = await Promise.all([
    cp.complete({ messages: [{ role: 'user', content: 'Name a fruit.' }], maxTokens: 16, temperature: 0 }),
    cp.complete({ messages: [{ role: 'user', content: 'Name a colour.' }], maxTokens: 16, temperature: 0 }),
  ]);
  for (const a of answers) console.log(`[${a.done.workerId}] ${a.text.trim()}`);

  const stats = await cp.stats();
  console.log(`requests: ${JSON.stringify(stats.requests)}, tokens generated: ${stats.completionTokens}`);
} finally {
  await cp.close();
}
