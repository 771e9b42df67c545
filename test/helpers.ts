// Shared by the end-to-end tests: HTTP and SSE helpers, process checks.

export interface SseResult {
  status: number;
  headers: Headers;
  /** Parsed JSON of every `data:` event except the final [DONE]. */
  events: Record<string, unknown>[];
  sawDone: boolean;
}

export async function post(url: string, body: unknown, headers: Record<string, string> = {}, signal?: AbortSignal): Promise<Response> {
  return fetch(url, {
    method: 'POST',
    headers: { 'content-type': 'application/json', ...headers },
    body: typeof body === 'string' ? body : JSON.stringify(body),
    ...(signal ? { signal } : {}),
  });
}

/** Reads a whole SSE response; `onEvent` sees each event as it arrives. */
export async function readSse(res: Response, onEvent?: (event: Record<string, unknown>) => void): Promise<SseResult> {
  const events: Record<string, unknown>[] = [];
  let sawDone = false;
  let pending = '';
  const decoder = new TextDecoder();
  for await (const bytes of res.body!) {
    pending += decoder.decode(bytes as Uint8Array, { stream: true });
    const parts = pending.split('\n\n');
    pending = parts.pop() ?? '';
    for (const part of parts) {
      if (!part.startsWith('data: ')) throw new Error(`not an SSE data event: ${JSON.stringify(part)}`);
      const data = part.slice('data: '.length);
      if (data === '[DONE]') {
        sawDone = true;
        continue;
      }
      const event = JSON.parse(data) as Record<string, unknown>;
      events.push(event);
      onEvent?.(event);
    }
  }
  return { status: res.status, headers: res.headers, events, sawDone };
}

export function isAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

export async function waitFor<T>(what: string, probe: () => T | undefined | Promise<T | undefined>, timeoutMs = 60_000): Promise<T> {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const value = await probe();
    if (value !== undefined && value !== false) return value;
    if (Date.now() > end) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

/** Children of a process (from /proc), to check that nothing outlives a shutdown. */
export async function childPids(pid: number): Promise<number[]> {
  const { readFileSync } = await import('node:fs');
  try {
    return readFileSync(`/proc/${pid}/task/${pid}/children`, 'utf8').trim().split(/\s+/).filter(Boolean).map(Number);
  } catch {
    return [];
  }
}
