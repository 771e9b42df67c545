// OpenAI request bodies → GenerateRequest (with every check that earns a 400), and the response
// shapes of /v1/completions and /v1/chat/completions.
import { MosaicError } from '../protocol/errors.js';
import type { ChatMessage, GenerateRequest } from '../index.js';
import type { DoneEvent } from '../control/request.js';

export interface ParsedRequest {
  request: GenerateRequest;
  stream: boolean;
  includeUsage: boolean;
  model: string | undefined;
}

type Body = Record<string, unknown>;

function badParam(param: string, what: string): never {
  throw new MosaicError('bad_request', `'${param}' ${what}`);
}

/** Fields OpenAI clients commonly send that we accept when they hold their neutral value. */
const NEUTRAL: Record<string, (v: unknown) => boolean> = {
  n: (v) => v === 1 || v === null,
  best_of: (v) => v === 1 || v === null,
  echo: (v) => v === false || v === null,
  presence_penalty: (v) => v === 0 || v === null,
  frequency_penalty: (v) => v === 0 || v === null,
  logit_bias: (v) => v === null || (typeof v === 'object' && Object.keys(v as object).length === 0),
  user: () => true,
  suffix: (v) => v === null,
  logprobs: (v) => v === null || v === false,
};

const COMMON = ['model', 'max_tokens', 'temperature', 'top_p', 'seed', 'stop', 'stream', 'stream_options', 'ignore_eos'];
const COMPLETION_FIELDS = new Set([...COMMON, 'prompt', ...Object.keys(NEUTRAL)]);
const CHAT_FIELDS = new Set([...COMMON, 'messages', 'max_completion_tokens', ...Object.keys(NEUTRAL)]);

function checkFields(body: Body, allowed: Set<string>): void {
  for (const key of Object.keys(body)) {
    if (!allowed.has(key)) badParam(key, `is not supported (supported: ${[...allowed].filter((k) => !(k in NEUTRAL)).join(', ')})`);
    const neutral = NEUTRAL[key];
    if (neutral && !neutral(body[key])) throw new MosaicError('unsupported', `'${key}' = ${JSON.stringify(body[key])} is not supported; leave it out`);
  }
}

function optNumber(body: Body, key: string, check: (n: number) => boolean, rule: string): number | undefined {
  const v = body[key];
  if (v === undefined || v === null) return undefined;
  if (typeof v !== 'number' || !Number.isFinite(v) || !check(v)) badParam(key, `must be ${rule}, got ${JSON.stringify(v)}`);
  return v;
}

function common(body: Body, maxTokensLimit: number, maxTokensKey: string): Omit<ParsedRequest, 'request'> & { request: Omit<GenerateRequest, 'prompt' | 'tokenIds' | 'messages'> } {
  if (body.model !== undefined && typeof body.model !== 'string') badParam('model', 'must be a string');
  const maxTokens = optNumber(body, maxTokensKey, (n) => Number.isInteger(n) && n >= 1 && n <= maxTokensLimit, `an integer in [1, ${maxTokensLimit}]`) ?? Math.min(16, maxTokensLimit);
  const request: Omit<GenerateRequest, 'prompt' | 'tokenIds' | 'messages'> = { maxTokens };
  const temperature = optNumber(body, 'temperature', (n) => n >= 0 && n <= 2, 'a number in [0, 2]');
  if (temperature !== undefined) request.temperature = temperature;
  const topP = optNumber(body, 'top_p', (n) => n > 0 && n <= 1, 'a number in (0, 1]');
  if (topP !== undefined) request.topP = topP;
  const seed = optNumber(body, 'seed', Number.isSafeInteger, 'an integer');
  if (seed !== undefined) request.seed = seed;
  if (body.stop !== undefined && body.stop !== null) {
    const stop = typeof body.stop === 'string' ? [body.stop] : body.stop;
    if (!Array.isArray(stop) || stop.length > 4 || !stop.every((s) => typeof s === 'string' && s.length > 0)) {
      badParam('stop', 'must be a non-empty string or an array of up to 4 non-empty strings');
    }
    request.stop = stop as string[];
  }
  if (body.ignore_eos !== undefined) {
    if (typeof body.ignore_eos !== 'boolean') badParam('ignore_eos', 'must be a boolean');
    request.ignoreEos = body.ignore_eos;
  }
  if (body.stream !== undefined && body.stream !== null && typeof body.stream !== 'boolean') badParam('stream', 'must be a boolean');
  let includeUsage = false;
  if (body.stream_options !== undefined && body.stream_options !== null) {
    const so = body.stream_options as Body;
    if (typeof so !== 'object' || Array.isArray(so) || Object.keys(so).some((k) => k !== 'include_usage') || (so.include_usage !== undefined && typeof so.include_usage !== 'boolean')) {
      badParam('stream_options', 'must be {"include_usage": boolean}');
    }
    includeUsage = so.include_usage === true;
  }
  return { request, stream: body.stream === true, includeUsage, model: body.model as string | undefined };
}

function asBody(body: unknown): Body {
  if (typeof body !== 'object' || body === null || Array.isArray(body)) {
    throw new MosaicError('bad_request', 'the request body must be a JSON object (Content-Type: application/json)');
  }
  return body as Body;
}

export function parseCompletion(raw: unknown, maxTokensLimit: number): ParsedRequest {
  const body = asBody(raw);
  checkFields(body, COMPLETION_FIELDS);
  const parsed = common(body, maxTokensLimit, 'max_tokens');
  let prompt = body.prompt;
  if (prompt === undefined) badParam('prompt', 'is required');
  // A one-element batch is the same request; larger batches need n separate requests.
  if (Array.isArray(prompt) && prompt.length === 1 && (typeof prompt[0] === 'string' || Array.isArray(prompt[0]))) prompt = prompt[0];
  if (typeof prompt === 'string') return { ...parsed, request: { ...parsed.request, prompt } };
  if (Array.isArray(prompt) && prompt.length > 0 && prompt.every((t) => Number.isSafeInteger(t) && (t as number) >= 0)) {
    return { ...parsed, request: { ...parsed.request, tokenIds: prompt as number[] } };
  }
  return badParam('prompt', 'must be a string, a one-element array of strings, or an array of token ids');
}

export function parseChat(raw: unknown, maxTokensLimit: number): ParsedRequest {
  const body = asBody(raw);
  checkFields(body, CHAT_FIELDS);
  if (body.max_tokens !== undefined && body.max_completion_tokens !== undefined) badParam('max_completion_tokens', 'and max_tokens are mutually exclusive');
  const parsed = common(body, maxTokensLimit, body.max_completion_tokens !== undefined ? 'max_completion_tokens' : 'max_tokens');
  const messages = body.messages;
  if (!Array.isArray(messages) || messages.length === 0) badParam('messages', 'must be a non-empty array of {role, content}');
  const out: ChatMessage[] = messages.map((m: unknown, i) => {
    const msg = m as Body;
    if (typeof msg !== 'object' || msg === null) badParam(`messages[${i}]`, 'must be an object {role, content}');
    if (!['system', 'user', 'assistant', 'developer'].includes(msg.role as string)) badParam(`messages[${i}].role`, 'must be system, developer, user or assistant');
    let content = msg.content;
    // Content parts: only text parts can be served by a text model.
    if (Array.isArray(content)) {
      if (!content.every((p: Body) => p && p.type === 'text' && typeof p.text === 'string')) {
        throw new MosaicError('unsupported', `messages[${i}].content: only {"type": "text"} parts are supported`);
      }
      content = content.map((p: Body) => p.text).join('');
    }
    if (typeof content !== 'string') badParam(`messages[${i}].content`, 'must be a string or an array of text parts');
    return { role: msg.role as string, content };
  });
  return { ...parsed, request: { ...parsed.request, messages: out } };
}

export function usage(done: DoneEvent): { prompt_tokens: number; completion_tokens: number; total_tokens: number } {
  const { promptTokens, completionTokens } = done.usage;
  return { prompt_tokens: promptTokens, completion_tokens: completionTokens, total_tokens: promptTokens + completionTokens };
}
