// The wire module: docs/PROTOCOL.md in TypeScript (version 1), mirrored by python/mosaickv/protocol.
// One schema table drives validation (every received header), encoding (key order, integer and float
// widths) and the types below. Broad types describe what the control plane sends, narrow ones
// (`WorkerMessage`) what it accepts; anything else — unknown type, unknown field, wrong type, wrong
// version — is a `ProtocolError`, answered on the wire with `bad_message`/`protocol_version`.
import { Packr, addExtension } from 'msgpackr';
import { isErrorCode, type ErrorCode } from './errors.js';

export const PROTOCOL_VERSION = 1;

// ---------------------------------------------------------------------------------------------
// Message types

export interface Capabilities {
  max_context: number;
  max_inflight: number;
  method: string | null;
  chat_template: boolean;
}
export interface ChatMessage {
  role: string;
  content: string;
}
export type GenerateInput = { prompt: string } | { token_ids: number[] } | { messages: ChatMessage[] };
export interface SamplingParams {
  max_tokens: number;
  temperature?: number;
  top_p?: number;
  seed?: number | null;
  stop?: string[];
  ignore_eos?: boolean;
  logprobs?: boolean;
}

export const TENSOR_ITEM_BYTES = {
  float32: 4, float16: 2, bfloat16: 2, int32: 4, int64: 8, uint8: 1, uint32: 4,
} as const;
export type TensorDtype = keyof typeof TENSOR_ITEM_BYTES;
/** A tensor carried in a raw frame: `data` holds prod(shape) little-endian, C-contiguous elements. */
export interface Tensor {
  dtype: TensorDtype;
  shape: number[];
  data: Uint8Array;
}
export type FinishReason = 'stop' | 'length' | 'cancelled';

export interface HelloMsg {
  type: 'hello';
  worker_id: string;
  pid: number;
  host: string;
  engine: string;
  model: string;
  backend: string;
  device: string;
  capabilities: Capabilities;
}
export interface ReadyMsg {
  type: 'ready';
  worker_id: string;
  heartbeat_ms: number;
}
export interface GenerateMsg {
  type: 'generate';
  request_id: string;
  input: GenerateInput;
  params: SamplingParams;
}
export interface TokenMsg {
  type: 'token';
  request_id: string;
  index: number;
  text: string;
  token_ids: number[];
  /** float32 [token_ids.length]: each token's log-probability, when the request asked for it. */
  logprobs?: Tensor;
}
export interface DoneMsg {
  type: 'done';
  request_id: string;
  finish_reason: FinishReason;
  usage: { prompt_tokens: number; completion_tokens: number };
  kv_bytes: number;
  full_kv_bytes: number;
  timing: { prefill_ms: number; decode_ms: number };
}
export interface ErrorMsg {
  type: 'error';
  request_id: string | null;
  code: ErrorCode;
  message: string;
}
export interface CancelMsg {
  type: 'cancel';
  request_id: string;
}
export interface HeartbeatMsg {
  type: 'heartbeat';
  worker_id: string;
  inflight: number;
  kv_bytes: number;
}
export interface StatsRequestMsg {
  type: 'stats_request';
  nonce: number;
}
export interface StatsMsg {
  type: 'stats';
  nonce: number;
  worker_id: string;
  inflight: number;
  requests_total: number;
  tokens_generated_total: number;
  kv_bytes: number;
  kv_bytes_peak: number;
  engine: Record<string, number>;
}
export interface ShutdownMsg {
  type: 'shutdown';
  reason: string;
}
/** One layer x KV head of a segment policy (src/policy/planner.ts). */
export interface HeadPolicyWire {
  layer: number;
  head: number;
  keep_ratio: number;
  token_ratio: number;
  loss_threshold: number;
}
export interface PolicyMsg {
  type: 'policy';
  version: number;
  heads: HeadPolicyWire[];
}
export interface PolicyAckMsg {
  type: 'policy_ack';
  worker_id: string;
  version: number;
  accepted: boolean;
  /** Why the policy was refused (nil when accepted). */
  reason: string | null;
}

/** One layer x KV head of a `telemetry` message: loss[i] (and energy[i]) at keep_ratios[i]. */
export interface TelemetryCurveWire {
  layer: number;
  head: number;
  loss: number[];
  /** Energy not kept after the rotation (K and V averaged), when the worker measured it. */
  energy?: number[];
}
export interface TelemetryMsg {
  type: 'telemetry';
  worker_id: string;
  model: string;
  head_dim: number;
  dtype: 'float32' | 'float16' | 'bfloat16';
  keep_ratios: number[];
  curves: TelemetryCurveWire[];
  /** The prompt length measured. */
  tokens: number;
  /** Seconds the curves took (not the prefill). */
  overhead_s: number;
}

/** One layer x KV head of a `recall` message: recall[i] at token_ratios[i]. */
export interface RecallHeadWire {
  layer: number;
  head: number;
  recall: number[];
}
/** Block-selection recall on a sampled decode step (docs/POLICY.md, "Decode recall"). */
export interface RecallMsg {
  type: 'recall';
  worker_id: string;
  model: string;
  token_ratios: number[];
  heads: RecallHeadWire[];
  /** Tokens in the cache at the sampled step. */
  tokens: number;
  /** Seconds the measurement took (on the engine thread, inside the step). */
  overhead_s: number;
}

/** Every message of the protocol. */
export type Message =
  | HelloMsg | ReadyMsg | GenerateMsg | TokenMsg | DoneMsg | ErrorMsg | CancelMsg | HeartbeatMsg
  | StatsRequestMsg | StatsMsg | ShutdownMsg | PolicyMsg | PolicyAckMsg | TelemetryMsg | RecallMsg;
export type MessageType = Message['type'];
/** What the control plane sends (C→W, plus error and heartbeat which go both ways). */
export type ControlMessage = ReadyMsg | GenerateMsg | CancelMsg | HeartbeatMsg | StatsRequestMsg | ShutdownMsg | ErrorMsg | PolicyMsg;
/** What the control plane accepts from a worker (W→C). */
export type WorkerMessage = HelloMsg | TokenMsg | DoneMsg | ErrorMsg | HeartbeatMsg | StatsMsg | PolicyAckMsg | TelemetryMsg | RecallMsg;

const WORKER_TYPES: ReadonlySet<string> = new Set(['hello', 'token', 'done', 'error', 'heartbeat', 'stats', 'policy_ack', 'telemetry', 'recall']);

// ---------------------------------------------------------------------------------------------
// Schema

type Spec =
  | { kind: 'str'; oneOf?: readonly string[] }
  | { kind: 'int'; min?: number }
  | { kind: 'float'; min?: number; max?: number; minExclusive?: boolean }
  | { kind: 'bool' }
  | { kind: 'number' }
  | { kind: 'nullable'; of: Spec }
  | { kind: 'array'; of: Spec }
  | { kind: 'map'; fields: readonly Field[] }
  | { kind: 'oneOfMaps'; options: readonly (readonly Field[])[] }
  | { kind: 'dict'; of: Spec }
  | { kind: 'errorCode' }
  | { kind: 'tensor'; dtype: TensorDtype; ndim: number };
interface Field {
  name: string;
  spec: Spec;
  optional?: boolean;
}

const str: Spec = { kind: 'str' };
const int0: Spec = { kind: 'int', min: 0 };
const bool: Spec = { kind: 'bool' };
const f = (name: string, spec: Spec, optional = false): Field => ({ name, spec, optional });

const SCHEMA: Record<MessageType, readonly Field[]> = {
  hello: [
    f('worker_id', str), f('pid', int0), f('host', str), f('engine', str), f('model', str),
    f('backend', str), f('device', str),
    f('capabilities', {
      kind: 'map',
      fields: [
        f('max_context', { kind: 'int', min: 1 }), f('max_inflight', { kind: 'int', min: 1 }),
        f('method', { kind: 'nullable', of: str }), f('chat_template', bool),
      ],
    }),
  ],
  ready: [f('worker_id', str), f('heartbeat_ms', { kind: 'int', min: 1 })],
  generate: [
    f('request_id', str),
    f('input', {
      kind: 'oneOfMaps',
      options: [
        [f('prompt', str)],
        [f('token_ids', { kind: 'array', of: int0 })],
        [f('messages', { kind: 'array', of: { kind: 'map', fields: [f('role', str), f('content', str)] } })],
      ],
    }),
    f('params', {
      kind: 'map',
      fields: [
        f('max_tokens', { kind: 'int', min: 1 }),
        f('temperature', { kind: 'float', min: 0 }, true),
        f('top_p', { kind: 'float', min: 0, minExclusive: true, max: 1 }, true),
        f('seed', { kind: 'nullable', of: { kind: 'int' } }, true),
        f('stop', { kind: 'array', of: str }, true),
        f('ignore_eos', bool, true),
        f('logprobs', bool, true),
      ],
    }),
  ],
  token: [
    f('request_id', str), f('index', int0), f('text', str), f('token_ids', { kind: 'array', of: int0 }),
    f('logprobs', { kind: 'tensor', dtype: 'float32', ndim: 1 }, true),
  ],
  done: [
    f('request_id', str),
    f('finish_reason', { kind: 'str', oneOf: ['stop', 'length', 'cancelled'] }),
    f('usage', { kind: 'map', fields: [f('prompt_tokens', int0), f('completion_tokens', int0)] }),
    f('kv_bytes', int0), f('full_kv_bytes', int0),
    f('timing', { kind: 'map', fields: [f('prefill_ms', { kind: 'float', min: 0 }), f('decode_ms', { kind: 'float', min: 0 })] }),
  ],
  error: [f('request_id', { kind: 'nullable', of: str }), f('code', { kind: 'errorCode' }), f('message', str)],
  cancel: [f('request_id', str)],
  heartbeat: [f('worker_id', str), f('inflight', int0), f('kv_bytes', int0)],
  stats_request: [f('nonce', int0)],
  stats: [
    f('nonce', int0), f('worker_id', str), f('inflight', int0), f('requests_total', int0),
    f('tokens_generated_total', int0), f('kv_bytes', int0), f('kv_bytes_peak', int0),
    f('engine', { kind: 'dict', of: { kind: 'number' } }),
  ],
  shutdown: [f('reason', str)],
  policy: [
    f('version', { kind: 'int', min: 1 }),
    f('heads', {
      kind: 'array',
      of: {
        kind: 'map',
        fields: [
          f('layer', int0), f('head', int0),
          f('keep_ratio', { kind: 'float', min: 0, minExclusive: true, max: 1 }),
          f('token_ratio', { kind: 'float', min: 0, minExclusive: true, max: 1 }),
          f('loss_threshold', { kind: 'float', min: 0, max: 1 }),
        ],
      },
    }),
  ],
  policy_ack: [f('worker_id', str), f('version', int0), f('accepted', bool), f('reason', { kind: 'nullable', of: str })],
  telemetry: [
    f('worker_id', str), f('model', str), f('head_dim', { kind: 'int', min: 1 }),
    f('dtype', { kind: 'str', oneOf: ['float32', 'float16', 'bfloat16'] }),
    f('keep_ratios', { kind: 'array', of: { kind: 'float', min: 0, minExclusive: true, max: 1 } }),
    f('curves', {
      kind: 'array',
      of: {
        kind: 'map',
        fields: [
          f('layer', int0), f('head', int0), f('loss', { kind: 'array', of: { kind: 'float', min: 0, max: 1 } }),
          f('energy', { kind: 'array', of: { kind: 'float', min: 0, max: 1 } }, true),
        ],
      },
    }),
    f('tokens', int0), f('overhead_s', { kind: 'float', min: 0 }),
  ],
  recall: [
    f('worker_id', str), f('model', str),
    f('token_ratios', { kind: 'array', of: { kind: 'float', min: 0, minExclusive: true, max: 1 } }),
    f('heads', {
      kind: 'array',
      of: { kind: 'map', fields: [f('layer', int0), f('head', int0), f('recall', { kind: 'array', of: { kind: 'float', min: 0, max: 1 } })] },
    }),
    f('tokens', int0), f('overhead_s', { kind: 'float', min: 0 }),
  ],
};

// ---------------------------------------------------------------------------------------------
// Errors

/** A frame that failed validation; `code` is what the receiver answers with. */
export class ProtocolError extends Error {
  readonly code: 'bad_message' | 'protocol_version';
  constructor(code: 'bad_message' | 'protocol_version', message: string) {
    super(message);
    this.name = 'ProtocolError';
    this.code = code;
  }
}

function bad(path: string, what: string): never {
  throw new ProtocolError('bad_message', `${path}: ${what}`);
}

function isPlainObject(x: unknown): x is Record<string, unknown> {
  if (typeof x !== 'object' || x === null) return false;
  const proto = Object.getPrototypeOf(x);
  return proto === Object.prototype || proto === null;
}

function describe(x: unknown): string {
  if (x === null) return 'nil';
  if (Array.isArray(x)) return 'array';
  if (typeof x === 'object') return x.constructor?.name ?? 'object';
  return typeof x;
}

// ---------------------------------------------------------------------------------------------
// Validation: returns a fresh value with keys in schema order (received objects are never trusted
// to carry extra keys through). `frames` holds the raw frames of a received message (index 0
// unused) and records which ones tensor fields reference; it is null when validating an outgoing
// message, whose tensors carry their data.

interface ReceivedFrames {
  frames: readonly Uint8Array[];
  used: Set<number>;
}

const TENSOR_HEADER: readonly Field[] = [
  f('dtype', { kind: 'str', oneOf: Object.keys(TENSOR_ITEM_BYTES) }),
  f('shape', { kind: 'array', of: int0 }),
  f('frame', { kind: 'int', min: 1 }),
];

function checkTensor(spec: { dtype: TensorDtype; ndim: number }, x: unknown, path: string, received: ReceivedFrames | null): Tensor {
  let tensor: Tensor;
  if (received === null) {
    if (!isPlainObject(x) || !(x.data instanceof Uint8Array)) bad(path, 'expected a tensor {dtype, shape, data}');
    const ref = checkFields(TENSOR_HEADER.slice(0, 2), { dtype: x.dtype, shape: x.shape }, path, null);
    tensor = { dtype: ref.dtype as TensorDtype, shape: ref.shape as number[], data: x.data };
  } else {
    const ref = checkFields(TENSOR_HEADER, x, path, received);
    const index = ref.frame as number;
    if (index >= received.frames.length) bad(`${path}.frame`, `frame ${index} does not exist (the message has ${received.frames.length} frames)`);
    if (received.used.has(index)) bad(`${path}.frame`, `frame ${index} is referenced twice`);
    received.used.add(index);
    tensor = { dtype: ref.dtype as TensorDtype, shape: ref.shape as number[], data: received.frames[index]! };
  }
  const expected = tensor.shape.reduce((a, b) => a * b, 1) * TENSOR_ITEM_BYTES[tensor.dtype];
  if (tensor.data.length !== expected) {
    bad(path, `tensor of dtype ${tensor.dtype} and shape [${tensor.shape.join(', ')}] needs ${expected} bytes, its frame holds ${tensor.data.length} bytes`);
  }
  if (tensor.dtype !== spec.dtype || tensor.shape.length !== spec.ndim) {
    bad(path, `expected a ${spec.ndim}-d ${spec.dtype} tensor, got ${tensor.dtype} of shape [${tensor.shape.join(', ')}]`);
  }
  return tensor;
}

function checkInt(x: unknown, path: string): number {
  if (typeof x === 'bigint') {
    if (x > BigInt(Number.MAX_SAFE_INTEGER) || x < BigInt(-Number.MAX_SAFE_INTEGER)) bad(path, `integer ${x} is beyond ±(2^53 - 1)`);
    return Number(x);
  }
  if (typeof x !== 'number' || !Number.isInteger(x)) bad(path, `expected int, got ${typeof x === 'number' ? `float ${x}` : describe(x)}`);
  if (!Number.isSafeInteger(x)) bad(path, `integer ${x} is beyond ±(2^53 - 1)`);
  return x;
}

function checkValue(spec: Spec, x: unknown, path: string, received: ReceivedFrames | null): unknown {
  switch (spec.kind) {
    case 'str':
      if (typeof x !== 'string') bad(path, `expected str, got ${describe(x)}`);
      if (spec.oneOf && !spec.oneOf.includes(x)) bad(path, `must be one of ${spec.oneOf.join(', ')}, got '${x}'`);
      return x;
    case 'int': {
      const n = checkInt(x, path);
      if (spec.min !== undefined && n < spec.min) bad(path, `must be >= ${spec.min}, got ${n}`);
      return n;
    }
    case 'float':
      // An int is accepted where a float is expected (docs/PROTOCOL.md, "Framing").
      if (typeof x !== 'number' || !Number.isFinite(x)) bad(path, `expected a finite float, got ${typeof x === 'number' ? x : describe(x)}`);
      if (spec.min !== undefined && (spec.minExclusive ? x <= spec.min : x < spec.min)) {
        bad(path, `must be ${spec.minExclusive ? '>' : '>='} ${spec.min}, got ${x}`);
      }
      if (spec.max !== undefined && x > spec.max) bad(path, `must be <= ${spec.max}, got ${x}`);
      return x;
    case 'number':
      if (typeof x === 'bigint' || (typeof x === 'number' && Number.isInteger(x))) return checkInt(x, path);
      if (typeof x !== 'number' || !Number.isFinite(x)) bad(path, `expected a finite number, got ${describe(x)}`);
      return x;
    case 'bool':
      if (typeof x !== 'boolean') bad(path, `expected bool, got ${describe(x)}`);
      return x;
    case 'nullable':
      return x === null ? null : checkValue(spec.of, x, path, received);
    case 'array':
      if (!Array.isArray(x)) bad(path, `expected array, got ${describe(x)}`);
      return x.map((item, i) => checkValue(spec.of, item, `${path}[${i}]`, received));
    case 'map':
      return checkFields(spec.fields, x, path, received);
    case 'oneOfMaps': {
      if (!isPlainObject(x)) bad(path, `expected map, got ${describe(x)}`);
      const keys = Object.keys(x);
      const option = spec.options.find((fields) => keys.length === 1 && fields[0]?.name === keys[0]);
      if (!option) {
        const allowed = spec.options.map((o) => o.map((fl) => fl.name).join('+')).join(' | ');
        bad(path, `must hold exactly one of ${allowed}, got {${keys.join(', ')}}`);
      }
      return checkFields(option, x, path, received);
    }
    case 'dict': {
      if (!isPlainObject(x)) bad(path, `expected map, got ${describe(x)}`);
      const out: Record<string, unknown> = {};
      for (const [k, v] of Object.entries(x)) out[k] = checkValue(spec.of, v, `${path}.${k}`, received);
      return out;
    }
    case 'errorCode':
      if (!isErrorCode(x)) bad(path, `unknown error code ${JSON.stringify(x)}`);
      return x;
    case 'tensor':
      return checkTensor(spec, x, path, received);
  }
}

function checkFields(
  fields: readonly Field[], x: unknown, path: string, received: ReceivedFrames | null, skip: ReadonlySet<string> = new Set(),
): Record<string, unknown> {
  if (!isPlainObject(x)) bad(path || 'header', `expected map, got ${describe(x)}`);
  const known = new Set(fields.map((fl) => fl.name));
  for (const key of Object.keys(x)) {
    if (!known.has(key) && !skip.has(key)) bad(path ? `${path}.${key}` : key, `unknown field '${key}' (allowed: ${[...known].join(', ')})`);
  }
  const out: Record<string, unknown> = {};
  for (const field of fields) {
    const fieldPath = path ? `${path}.${field.name}` : field.name;
    if (!Object.hasOwn(x, field.name) || x[field.name] === undefined) {
      if (field.optional) continue;
      bad(fieldPath, 'required field missing');
    }
    out[field.name] = checkValue(field.spec, x[field.name], fieldPath, received);
  }
  return out;
}

const HEADER_KEYS: ReadonlySet<string> = new Set(['v', 'type']);

function validate(header: unknown, received: ReceivedFrames | null): Message {
  if (!isPlainObject(header)) bad('header', `expected map, got ${describe(header)}`);
  if (header.v !== PROTOCOL_VERSION) {
    throw new ProtocolError('protocol_version', `protocol version ${JSON.stringify(header.v ?? null)} is not supported; this control plane speaks version ${PROTOCOL_VERSION}`);
  }
  const type = header.type;
  if (typeof type !== 'string' || !Object.hasOwn(SCHEMA, type)) {
    bad('type', `unknown message type ${JSON.stringify(type ?? null)} (known: ${Object.keys(SCHEMA).join(', ')})`);
  }
  const body = checkFields(SCHEMA[type as MessageType], header, '', received, HEADER_KEYS);
  if (type === 'token' && body.logprobs) {
    const length = (body.logprobs as Tensor).shape[0];
    const tokens = (body.token_ids as number[]).length;
    if (length !== tokens) bad('logprobs', `has ${length} entries for ${tokens} token_ids (one per token)`);
  }
  if (type === 'telemetry') {
    const n = (body.keep_ratios as number[]).length;
    (body.curves as TelemetryCurveWire[]).forEach((curve, i) => {
      if (curve.loss.length !== n) bad(`curves[${i}].loss`, `has ${curve.loss.length} losses for ${n} keep_ratios (one each)`);
      if (curve.energy && curve.energy.length !== n) bad(`curves[${i}].energy`, `has ${curve.energy.length} energy losses for ${n} keep_ratios (one each)`);
    });
  }
  if (type === 'recall') {
    const n = (body.token_ratios as number[]).length;
    (body.heads as RecallHeadWire[]).forEach((head, i) => {
      if (head.recall.length !== n) bad(`heads[${i}].recall`, `has ${head.recall.length} recalls for ${n} token_ratios (one each)`);
    });
  }
  return { type, ...body } as unknown as Message;
}

// ---------------------------------------------------------------------------------------------
// Encoding. msgpackr writes integral numbers as ints and everything above 32 bits as float64, and
// BigInts always as signed int64; the protocol wants floats as float64 and ints in their smallest
// form (as Python's msgpack does). Those values are therefore written as pre-encoded bytes through an
// extension whose `pack` writes into msgpackr's buffer directly and returns nothing (no ext header).

class RawMsgpack {
  constructor(readonly bytes: Uint8Array) {}
}
const RAW_EXTENSION_TYPE = 0x4d;
addExtension({
  Class: RawMsgpack,
  type: RAW_EXTENSION_TYPE,
  pack(value: RawMsgpack, allocate: (size: number) => { target: Uint8Array; position: number }) {
    const { target, position } = allocate(value.bytes.length);
    target.set(value.bytes, position);
  },
  unpack() {
    throw new ProtocolError('bad_message', 'msgpack extension types are not part of the protocol');
  },
} as never);

function float64(x: number): RawMsgpack {
  const b = Buffer.alloc(9);
  b[0] = 0xcb;
  b.writeDoubleBE(x, 1);
  return new RawMsgpack(b);
}

function wideInt(x: number): number | RawMsgpack {
  if (x >= -0x80000000 && x <= 0xffffffff) return x;
  const b = Buffer.alloc(9);
  if (x > 0) {
    b[0] = 0xcf;
    b.writeBigUInt64BE(BigInt(x), 1);
  } else {
    b[0] = 0xd3;
    b.writeBigInt64BE(BigInt(x), 1);
  }
  return new RawMsgpack(b);
}

function toWire(spec: Spec, x: unknown, out: Uint8Array[]): unknown {
  switch (spec.kind) {
    case 'int':
      return wideInt(x as number);
    case 'float':
      return float64(x as number);
    case 'number':
      // The engine map of `stats` has no per-key type: integral values go out as ints.
      return Number.isInteger(x) ? wideInt(x as number) : float64(x as number);
    case 'nullable':
      return x === null ? null : toWire(spec.of, x, out);
    case 'array':
      return (x as unknown[]).map((item) => toWire(spec.of, item, out));
    case 'map':
      return fieldsToWire(spec.fields, x as Record<string, unknown>, out);
    case 'oneOfMaps': {
      const key = Object.keys(x as object)[0];
      return fieldsToWire(spec.options.find((o) => o[0]?.name === key) ?? [], x as Record<string, unknown>, out);
    }
    case 'dict': {
      const wire: Record<string, unknown> = {};
      for (const [k, v] of Object.entries(x as Record<string, unknown>)) wire[k] = toWire(spec.of, v, out);
      return wire;
    }
    case 'tensor': {
      const tensor = x as Tensor;
      out.push(tensor.data);
      return { dtype: tensor.dtype, shape: tensor.shape, frame: out.length };
    }
    default:
      return x;
  }
}

function fieldsToWire(fields: readonly Field[], x: Record<string, unknown>, out: Uint8Array[]): Record<string, unknown> {
  const wire: Record<string, unknown> = {};
  for (const field of fields) {
    if (x[field.name] === undefined) continue;
    wire[field.name] = toWire(field.spec, x[field.name], out);
  }
  return wire;
}

const packr = new Packr({ useRecords: false, variableMapSize: true, mapsAsObjects: true, int64AsType: 'bigint' });

/**
 * Encodes a message (validated first: the encoder never sends junk) as its frames: the msgpack
 * header, then one raw frame per tensor field.
 */
export function encode(message: Message): Buffer[] {
  const clean = validate({ v: PROTOCOL_VERSION, ...message }, null);
  const { type, ...body } = clean as unknown as Record<string, unknown> & { type: MessageType };
  const tensors: Uint8Array[] = [];
  const wire = fieldsToWire(SCHEMA[type], body, tensors);
  return [packr.pack({ v: PROTOCOL_VERSION, type, ...wire }), ...tensors.map((t) => Buffer.from(t.buffer, t.byteOffset, t.byteLength))];
}

/** Decodes and validates a multipart message of any direction (header frame, then tensor frames; no routing id). */
export function decode(frames: readonly Uint8Array[]): Message {
  if (frames.length === 0) bad('message', 'no frames: frame 0 (the msgpack header) is missing');
  let header: unknown;
  try {
    header = packr.unpack(frames[0]!);
  } catch (err) {
    if (err instanceof ProtocolError) throw err;
    throw new ProtocolError('bad_message', `frame 0 is not a valid msgpack header: ${(err as Error).message}`);
  }
  const received: ReceivedFrames = { frames, used: new Set() };
  const message = validate(header, received);
  const unused = frames.map((_, i) => i).filter((i) => i > 0 && !received.used.has(i));
  if (unused.length > 0) bad('message', `frames [${unused.join(', ')}] are not referenced by the header`);
  return message;
}

/** Decodes a message sent by a worker; control-plane-only types are rejected. */
export function decodeFromWorker(frames: readonly Uint8Array[]): WorkerMessage {
  const message = decode(frames);
  if (!WORKER_TYPES.has(message.type)) bad('type', `'${message.type}' is not sent by workers`);
  return message as WorkerMessage;
}
