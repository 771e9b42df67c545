// The one error catalogue (docs/PROTOCOL.md, "Error codes"): every error that leaves the control
// plane — on the wire, in the TypeScript API, or over HTTP — carries one of these codes, and the
// HTTP status comes from this table only.

export const ERROR_CATALOGUE = {
  bad_message: { status: 400, type: 'invalid_request_error', summary: 'a frame failed validation' },
  bad_request: { status: 400, type: 'invalid_request_error', summary: "a request's fields are invalid" },
  protocol_version: { status: 500, type: 'server_error', summary: 'the peer speaks another protocol version' },
  context_too_long: { status: 400, type: 'invalid_request_error', summary: "prompt + max_tokens exceed the model's context" },
  unsupported: { status: 400, type: 'invalid_request_error', summary: 'the engine/backend cannot do what was asked' },
  engine_error: { status: 500, type: 'server_error', summary: 'the engine failed while running the request' },
  worker_lost: { status: 502, type: 'server_error', summary: 'the worker died while the request was streaming' },
  overloaded: { status: 503, type: 'server_error', summary: 'queue full; retry after the Retry-After seconds' },
  timeout: { status: 504, type: 'server_error', summary: 'the request ran past its deadline' },
  unauthorized: { status: 401, type: 'authentication_error', summary: 'missing or wrong API key' },
  not_found: { status: 404, type: 'invalid_request_error', summary: 'unknown route or model' },
} as const;

export type ErrorCode = keyof typeof ERROR_CATALOGUE;

export function isErrorCode(code: unknown): code is ErrorCode {
  return typeof code === 'string' && Object.hasOwn(ERROR_CATALOGUE, code);
}

/** An error with a catalogue code; `retryAfterS` is set for `overloaded`. */
export class MosaicError extends Error {
  readonly code: ErrorCode;
  readonly retryAfterS: number | undefined;

  constructor(code: ErrorCode, message: string, options: { retryAfterS?: number; cause?: unknown } = {}) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    this.name = 'MosaicError';
    this.code = code;
    this.retryAfterS = options.retryAfterS;
  }

  get status(): number {
    return ERROR_CATALOGUE[this.code].status;
  }

  /** OpenAI's error body: `{"error": {"message", "type", "param", "code"}}`. */
  toOpenAI(): { error: { message: string; type: string; param: null; code: ErrorCode } } {
    return { error: { message: this.message, type: ERROR_CATALOGUE[this.code].type, param: null, code: this.code } };
  }
}
