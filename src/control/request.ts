// One generation request as the pool tracks it, and the async stream its caller reads.
import { MosaicError } from '../protocol/errors.js';
import type { FinishReason } from '../protocol/protocol.js';

export interface TokenEvent {
  type: 'token';
  index: number;
  text: string;
  tokenIds: number[];
  /** Each token's log-probability, when the request asked for `logprobs`. */
  logprobs?: Float32Array;
}
export interface DoneEvent {
  type: 'done';
  finishReason: FinishReason;
  usage: { promptTokens: number; completionTokens: number };
  kvBytes: number;
  fullKvBytes: number;
  timing: { prefillMs: number; decodeMs: number };
  workerId: string;
}
export type GenerateEvent = TokenEvent | DoneEvent;

/**
 * A request's state in the pool plus the stream handed to its caller. Events are buffered until
 * read; a failure is thrown from the iterator; leaving the loop early (break, throw, abort signal)
 * calls `onCancel` so the worker stops generating.
 */
export class PendingRequest implements AsyncIterable<GenerateEvent> {
  /** Worker running it, or null while queued. */
  workerId: string | null = null;
  /** Dispatches so far (a request is retried once when its worker dies before streaming). */
  attempts = 0;
  streamed = false;
  /** The caller's stream has ended (done, error or cancel); the worker slot may still be held. */
  finished = false;
  readonly startedAt = performance.now();
  firstTokenAt: number | undefined;
  deadline: NodeJS.Timeout | undefined;
  cancelGrace: NodeJS.Timeout | undefined;

  private readonly buffer: GenerateEvent[] = [];
  private failure: MosaicError | undefined;
  private ended = false;
  private wake: (() => void) | undefined;

  /**
   * @param frames the encoded `generate` message, sent again as-is on a retry
   * @param model the model a worker must serve to take it, or null for any
   */
  constructor(
    readonly id: string,
    readonly frames: Buffer[],
    readonly model: string | null,
    private readonly onCancel: (request: PendingRequest) => void,
  ) {}

  push(event: GenerateEvent): void {
    if (this.finished) return;
    if (event.type === 'token') {
      this.streamed = true;
      this.firstTokenAt ??= performance.now();
    }
    this.buffer.push(event);
    if (event.type === 'done') this.finish();
    this.wake?.();
  }

  fail(error: MosaicError): void {
    if (this.finished) return;
    this.failure = error;
    this.finish();
    this.wake?.();
  }

  private finish(): void {
    this.finished = true;
    this.ended = true;
    clearTimeout(this.deadline);
  }

  async *[Symbol.asyncIterator](): AsyncGenerator<GenerateEvent> {
    let completed = false;
    try {
      for (;;) {
        const event = this.buffer.shift();
        if (event) {
          yield event;
          continue;
        }
        if (this.failure) throw this.failure;
        if (this.ended) {
          completed = true;
          return;
        }
        await new Promise<void>((resolve) => (this.wake = resolve));
        this.wake = undefined;
      }
    } finally {
      if (!completed && !this.finished) {
        this.finished = true;
        clearTimeout(this.deadline);
        this.onCancel(this);
      }
    }
  }
}
