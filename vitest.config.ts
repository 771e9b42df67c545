import { defineConfig } from 'vitest/config';

// End-to-end tests start real Python workers (model load, ZeroMQ handshakes): generous timeouts,
// and one file at a time so that they do not fight over the machine's few cores.
export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    testTimeout: 120_000,
    hookTimeout: 180_000,
    fileParallelism: false,
    pool: 'forks',
    poolOptions: { forks: { singleFork: true } },
  },
});
