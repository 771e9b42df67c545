// WorkerPool setup paths that need no model: socket files and permissions, bind validation,
// a worker that cannot start. Real sockets and real processes throughout.
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { WorkerPool } from '../src/control/pool.js';
import { MosaicError } from '../src/protocol/errors.js';

const quiet = { log: () => undefined };
const dir = mkdtempSync(join(tmpdir(), 'mosaickv-pool-test-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

describe('WorkerPool sockets', () => {
  it('binds a private ipc socket (file 0600 in a 0700 directory) and removes it on close', async () => {
    const pool = await WorkerPool.start({ workers: [], ...quiet });
    const path = pool.endpoint.slice('ipc://'.length);
    expect(statSync(path).mode & 0o777).toBe(0o600);
    expect(statSync(dirname(path)).mode & 0o777).toBe(0o700);
    await pool.close();
    expect(existsSync(path)).toBe(false);
  });

  it('replaces a stale socket file left by a dead process', async () => {
    const path = join(dir, 'stale.sock');
    // A process that binds a unix socket and exits leaves its file behind.
    const r = spawnSync('python3', ['-c', `import socket; socket.socket(socket.AF_UNIX).bind(${JSON.stringify(path)})`]);
    expect(r.status).toBe(0);
    expect(statSync(path).isSocket()).toBe(true);
    const pool = await WorkerPool.start({ workers: [], bind: `ipc://${path}`, ...quiet });
    expect(pool.endpoint).toBe(`ipc://${path}`);
    expect(statSync(path).mode & 0o777).toBe(0o600);
    await pool.close();
  });

  it('refuses to replace a file that is not a socket', async () => {
    const path = join(dir, 'precious.txt');
    writeFileSync(path, 'data');
    await expect(WorkerPool.start({ workers: [], bind: `ipc://${path}`, ...quiet })).rejects.toThrow(/not a socket; refusing to replace it/);
    expect(existsSync(path)).toBe(true);
  });

  it('refuses tcp:// without CurveZMQ keys and unknown bind schemes', async () => {
    await expect(WorkerPool.start({ workers: [], bind: 'tcp://127.0.0.1:*', ...quiet })).rejects.toThrow(/CurveZMQ/);
    await expect(WorkerPool.start({ workers: [], bind: 'udp://x', ...quiet })).rejects.toThrow(/unknown bind address/);
  });
});

describe('WorkerPool startup failures', () => {
  it('rejects start() with a clear error when the interpreter does not exist', async () => {
    const start = WorkerPool.start({ workers: [{ engine: 'hf', backend: 'stock', model: 'tiny-random' }], python: join(dir, 'no-python'), ...quiet });
    await expect(start).rejects.toBeInstanceOf(MosaicError);
    await expect(start).rejects.toThrow(/worker w0 could not start .*no-python.*--python/);
  });

  it('rejects start() with the worker output when the worker exits before its handshake', async () => {
    // `python3 -m mosaickv.worker` outside the venv: the module is missing, the process exits 1.
    const start = WorkerPool.start({ workers: [{ engine: 'hf', backend: 'stock', model: 'tiny-random' }], python: '/usr/bin/python3', ...quiet });
    await expect(start).rejects.toThrow(/worker w0 exited with code 1 before its handshake[\s\S]*No module named/);
  });
});
