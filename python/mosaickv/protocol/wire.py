"""The wire module: docs/PROTOCOL.md (version 1) in Python, mirrored by src/protocol/protocol.ts.

One schema table drives validation of every received header, encoding (key order, int and float
widths, tensors as raw frames) and decoding. A message is a dict ``{"type": ..., **fields}``; the
``v`` key is added by `encode` and checked and dropped by `decode`. Tensors travel as `Tensor`
values in the dict and as raw frames on the wire. Anything that does not match the schema raises
`ProtocolError` with code ``bad_message`` (or ``protocol_version`` for another version), which the
receiver answers with an ``error`` message instead of crashing.

Byte-level rules shared with msgpackr (so both languages produce identical bytes): maps in schema
order, integers in their smallest msgpack form (including uint64/int64), floats always float64 (even
when integral), engine numbers (``number``) as ints when integral and float64 otherwise, strings as
``str``, no extension types.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import msgpack

from .errors import ERROR_CATALOGUE, MosaicError

PROTOCOL_VERSION = 1

# JavaScript numbers hold integers exactly only up to 2**53 - 1; larger ones would be rounded by the
# control plane, so neither side accepts them.
MAX_SAFE_INT = 2**53 - 1

# dtype name -> bytes per element (little-endian, C-contiguous).
TENSOR_DTYPES: Mapping[str, int] = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "int32": 4,
    "int64": 8,
    "uint8": 1,
    "uint32": 4,
}


class ProtocolError(MosaicError):
    """A header or frame failed validation; `code` is ``bad_message`` or ``protocol_version``."""


def _bad(path: str, what: str) -> NoReturn:
    raise ProtocolError("bad_message", f"{path}: {what}")


def _describe(x: object) -> str:
    if x is None:
        return "nil"
    return {bool: "bool", int: "int", float: "float", str: "str", list: "array", dict: "map"}.get(
        type(x), type(x).__name__
    )


@dataclass(frozen=True)
class Tensor:
    """A tensor carried in a raw frame: `data` holds prod(shape) elements of `dtype`,
    little-endian and C-contiguous."""

    dtype: str
    shape: tuple[int, ...]
    data: bytes

    def __post_init__(self) -> None:
        if self.dtype not in TENSOR_DTYPES:
            raise ValueError(
                f"tensor dtype {self.dtype!r} is not allowed; allowed: {', '.join(TENSOR_DTYPES)}"
            )
        expected = math.prod(self.shape) * TENSOR_DTYPES[self.dtype]
        if len(self.data) != expected:
            raise ValueError(
                f"tensor of dtype {self.dtype} and shape {list(self.shape)} needs {expected} bytes, "
                f"got {len(self.data)}"
            )


class _Frames:
    """Raw frames seen while decoding (`frames`, index 0 unused) or collected while encoding."""

    def __init__(self, frames: Sequence[bytes] | None = None) -> None:
        self.frames: list[bytes] = list(frames) if frames is not None else [b""]
        self.used: set[int] = set()


# ---------------------------------------------------------------------------------------------
# Schema. Each spec validates a value (`check`: a received value or one about to be sent) and
# turns a checked value into what msgpack packs (`to_wire`).


class Spec:
    def check(self, x: Any, path: str, frames: _Frames) -> Any:
        raise NotImplementedError

    def to_wire(self, x: Any, frames: _Frames) -> Any:
        return x


@dataclass(frozen=True)
class Str(Spec):
    one_of: tuple[str, ...] = ()

    def check(self, x: Any, path: str, frames: _Frames) -> str:
        if not isinstance(x, str):
            _bad(path, f"expected str, got {_describe(x)}")
        if self.one_of and x not in self.one_of:
            _bad(path, f"must be one of {', '.join(self.one_of)}, got {x!r}")
        return x


@dataclass(frozen=True)
class Int(Spec):
    min: int | None = None

    def check(self, x: Any, path: str, frames: _Frames) -> int:
        if isinstance(x, bool) or not isinstance(x, int):
            _bad(path, f"expected int, got {_describe(x)}")
        if abs(x) > MAX_SAFE_INT:
            _bad(path, f"integer {x} is outside the safe range +-(2**53 - 1)")
        if self.min is not None and x < self.min:
            _bad(path, f"must be >= {self.min}, got {x}")
        return x


@dataclass(frozen=True)
class Float(Spec):
    """A float64; an int is accepted on receipt (JavaScript cannot tell 1.0 from 1)."""

    min: float | None = None
    max: float | None = None
    min_exclusive: bool = False

    def check(self, x: Any, path: str, frames: _Frames) -> float:
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
            _bad(path, f"expected a finite float, got {_describe(x)}")
        if self.min is not None and (x <= self.min if self.min_exclusive else x < self.min):
            _bad(path, f"must be {'>' if self.min_exclusive else '>='} {self.min}, got {x}")
        if self.max is not None and x > self.max:
            _bad(path, f"must be <= {self.max}, got {x}")
        return float(x)

    def to_wire(self, x: Any, frames: _Frames) -> float:
        return float(x)


@dataclass(frozen=True)
class Number(Spec):
    """An int or a float without a declared type: integral values are written as ints."""

    def check(self, x: Any, path: str, frames: _Frames) -> int | float:
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
            _bad(path, f"expected a finite number, got {_describe(x)}")
        if abs(x) > MAX_SAFE_INT:
            _bad(path, f"number {x} is outside the safe range +-(2**53 - 1)")
        return x

    def to_wire(self, x: Any, frames: _Frames) -> int | float:
        return int(x) if float(x).is_integer() else float(x)


@dataclass(frozen=True)
class Bool(Spec):
    def check(self, x: Any, path: str, frames: _Frames) -> bool:
        if not isinstance(x, bool):
            _bad(path, f"expected bool, got {_describe(x)}")
        return x


@dataclass(frozen=True)
class ErrorCode(Spec):
    def check(self, x: Any, path: str, frames: _Frames) -> str:
        if not isinstance(x, str) or x not in ERROR_CATALOGUE:
            _bad(path, f"unknown error code {x!r} (known: {', '.join(ERROR_CATALOGUE)})")
        return x


@dataclass(frozen=True)
class Nullable(Spec):
    of: Spec

    def check(self, x: Any, path: str, frames: _Frames) -> Any:
        return None if x is None else self.of.check(x, path, frames)

    def to_wire(self, x: Any, frames: _Frames) -> Any:
        return None if x is None else self.of.to_wire(x, frames)


@dataclass(frozen=True)
class Array(Spec):
    of: Spec

    def check(self, x: Any, path: str, frames: _Frames) -> list[Any]:
        if not isinstance(x, (list, tuple)):
            _bad(path, f"expected array, got {_describe(x)}")
        return [self.of.check(item, f"{path}[{i}]", frames) for i, item in enumerate(x)]

    def to_wire(self, x: Any, frames: _Frames) -> list[Any]:
        return [self.of.to_wire(item, frames) for item in x]


@dataclass(frozen=True)
class Field:
    name: str
    spec: Spec
    optional: bool = False


def _check_fields(
    fields: Sequence[Field], x: Any, path: str, frames: _Frames, skip: frozenset[str] = frozenset()
) -> dict[str, Any]:
    if not isinstance(x, Mapping):
        _bad(path or "header", f"expected map, got {_describe(x)}")
    known = [f.name for f in fields]
    for key in x:
        if key not in known and key not in skip:
            _bad(path or "header", f"unknown field {key!r} (allowed: {', '.join(known)})")
    out: dict[str, Any] = {}
    for field in fields:
        field_path = f"{path}.{field.name}" if path else field.name
        if field.name not in x:
            if field.optional:
                continue
            _bad(field_path, "required field missing")
        out[field.name] = field.spec.check(x[field.name], field_path, frames)
    return out


def _fields_to_wire(fields: Sequence[Field], x: Mapping[str, Any], frames: _Frames) -> dict[str, Any]:
    return {f.name: f.spec.to_wire(x[f.name], frames) for f in fields if f.name in x}


@dataclass(frozen=True)
class MapOf(Spec):
    fields: tuple[Field, ...]

    def check(self, x: Any, path: str, frames: _Frames) -> dict[str, Any]:
        return _check_fields(self.fields, x, path, frames)

    def to_wire(self, x: Any, frames: _Frames) -> dict[str, Any]:
        return _fields_to_wire(self.fields, x, frames)


@dataclass(frozen=True)
class OneOfMaps(Spec):
    """A map holding exactly one key, each option being a one-field map."""

    options: tuple[Field, ...]

    def check(self, x: Any, path: str, frames: _Frames) -> dict[str, Any]:
        if not isinstance(x, Mapping):
            _bad(path, f"expected map, got {_describe(x)}")
        chosen = [o for o in self.options if o.name in x]
        if len(x) != 1 or len(chosen) != 1:
            names = " | ".join(o.name for o in self.options)
            _bad(path, f"must hold exactly one of {names}, got {{{', '.join(map(str, x))}}}")
        return _check_fields(chosen, x, path, frames)

    def to_wire(self, x: Any, frames: _Frames) -> dict[str, Any]:
        return _fields_to_wire(self.options, x, frames)


@dataclass(frozen=True)
class Dict(Spec):
    """A map of arbitrary str keys, kept in the order received."""

    of: Spec

    def check(self, x: Any, path: str, frames: _Frames) -> dict[str, Any]:
        if not isinstance(x, Mapping):
            _bad(path, f"expected map, got {_describe(x)}")
        out: dict[str, Any] = {}
        for key, value in x.items():
            if not isinstance(key, str):
                _bad(path, f"keys must be str, got {_describe(key)}")
            out[key] = self.of.check(value, f"{path}.{key}", frames)
        return out

    def to_wire(self, x: Any, frames: _Frames) -> dict[str, Any]:
        return {key: self.of.to_wire(value, frames) for key, value in x.items()}


_TENSOR_HEADER = (
    Field("dtype", Str(tuple(TENSOR_DTYPES))),
    Field("shape", Array(Int(0))),
    Field("frame", Int(1)),
)


@dataclass(frozen=True)
class TensorSpec(Spec):
    """A tensor: ``{"dtype", "shape", "frame"}`` in the header, its bytes in raw frame `frame`."""

    dtype: str
    ndim: int

    def check(self, x: Any, path: str, frames: _Frames) -> Tensor:
        if isinstance(x, Tensor):  # about to be sent
            tensor = x
        else:  # received: resolve the frame reference
            ref = _check_fields(_TENSOR_HEADER, x, path, frames)
            index = ref["frame"]
            if index >= len(frames.frames):
                _bad(
                    f"{path}.frame",
                    f"frame {index} does not exist (the message has {len(frames.frames)} frames)",
                )
            if index in frames.used:
                _bad(f"{path}.frame", f"frame {index} is referenced twice")
            frames.used.add(index)
            try:
                tensor = Tensor(ref["dtype"], tuple(ref["shape"]), bytes(frames.frames[index]))
            except ValueError as exc:
                _bad(path, str(exc))
        if tensor.dtype != self.dtype or len(tensor.shape) != self.ndim:
            _bad(
                path,
                f"expected a {self.ndim}-d {self.dtype} tensor, "
                f"got {tensor.dtype} of shape {list(tensor.shape)}",
            )
        return tensor

    def to_wire(self, x: Any, frames: _Frames) -> dict[str, Any]:
        frames.frames.append(x.data)
        return {"dtype": x.dtype, "shape": list(x.shape), "frame": len(frames.frames) - 1}


def _f(name: str, spec: Spec, optional: bool = False) -> Field:
    return Field(name, spec, optional)


_STR = Str()
_INT0 = Int(0)
_BOOL = Bool()


def _per_head(*fields: Field) -> Spec:
    """A list of entries, one per (layer, KV head), each with ``fields``: policies, telemetry
    curves, recall."""
    return Array(MapOf((_f("layer", _INT0), _f("head", _INT0), *fields)))


SCHEMA: Mapping[str, tuple[Field, ...]] = {
    "hello": (
        _f("worker_id", _STR),
        _f("pid", _INT0),
        _f("host", _STR),
        _f("engine", _STR),
        _f("model", _STR),
        _f("backend", _STR),
        _f("device", _STR),
        _f(
            "capabilities",
            MapOf(
                (
                    _f("max_context", Int(1)),
                    _f("max_inflight", Int(1)),
                    _f("method", Nullable(_STR)),
                    _f("chat_template", _BOOL),
                )
            ),
        ),
    ),
    "ready": (_f("worker_id", _STR), _f("heartbeat_ms", Int(1))),
    "generate": (
        _f("request_id", _STR),
        _f(
            "input",
            OneOfMaps(
                (
                    _f("prompt", _STR),
                    _f("token_ids", Array(_INT0)),
                    _f("messages", Array(MapOf((_f("role", _STR), _f("content", _STR))))),
                )
            ),
        ),
        _f(
            "params",
            MapOf(
                (
                    _f("max_tokens", Int(1)),
                    _f("temperature", Float(min=0.0), True),
                    _f("top_p", Float(min=0.0, max=1.0, min_exclusive=True), True),
                    _f("seed", Nullable(Int()), True),
                    _f("stop", Array(_STR), True),
                    _f("ignore_eos", _BOOL, True),
                    _f("logprobs", _BOOL, True),
                )
            ),
        ),
    ),
    "token": (
        _f("request_id", _STR),
        _f("index", _INT0),
        _f("text", _STR),
        _f("token_ids", Array(_INT0)),
        _f("logprobs", TensorSpec("float32", 1), True),
    ),
    "done": (
        _f("request_id", _STR),
        _f("finish_reason", Str(("stop", "length", "cancelled"))),
        _f("usage", MapOf((_f("prompt_tokens", _INT0), _f("completion_tokens", _INT0)))),
        _f("kv_bytes", _INT0),
        _f("full_kv_bytes", _INT0),
        _f("timing", MapOf((_f("prefill_ms", Float(min=0.0)), _f("decode_ms", Float(min=0.0))))),
    ),
    "error": (_f("request_id", Nullable(_STR)), _f("code", ErrorCode()), _f("message", _STR)),
    "cancel": (_f("request_id", _STR),),
    "heartbeat": (_f("worker_id", _STR), _f("inflight", _INT0), _f("kv_bytes", _INT0)),
    "stats_request": (_f("nonce", _INT0),),
    "stats": (
        _f("nonce", _INT0),
        _f("worker_id", _STR),
        _f("inflight", _INT0),
        _f("requests_total", _INT0),
        _f("tokens_generated_total", _INT0),
        _f("kv_bytes", _INT0),
        _f("kv_bytes_peak", _INT0),
        _f("engine", Dict(Number())),
    ),
    "shutdown": (_f("reason", _STR),),
    "policy": (
        _f("version", Int(1)),
        _f(
            "heads",
            _per_head(
                _f("keep_ratio", Float(min=0.0, max=1.0, min_exclusive=True)),
                _f("token_ratio", Float(min=0.0, max=1.0, min_exclusive=True)),
                _f("loss_threshold", Float(min=0.0, max=1.0)),
            ),
        ),
    ),
    "policy_ack": (
        _f("worker_id", _STR),
        _f("version", _INT0),
        _f("accepted", _BOOL),
        _f("reason", Nullable(_STR)),
    ),
    "telemetry": (
        _f("worker_id", _STR),
        _f("model", _STR),
        _f("head_dim", Int(1)),
        _f("dtype", Str(("float32", "float16", "bfloat16"))),
        _f("keep_ratios", Array(Float(min=0.0, max=1.0, min_exclusive=True))),
        _f(
            "curves",
            _per_head(
                _f("loss", Array(Float(min=0.0, max=1.0))),
                _f("energy", Array(Float(min=0.0, max=1.0)), optional=True),
            ),
        ),
        _f("tokens", _INT0),
        _f("overhead_s", Float(min=0.0)),
    ),
    "recall": (
        _f("worker_id", _STR),
        _f("model", _STR),
        _f("token_ratios", Array(Float(min=0.0, max=1.0, min_exclusive=True))),
        _f(
            "heads",
            _per_head(
                _f("recall", Array(Float(min=0.0, max=1.0))),
            ),
        ),
        _f("tokens", _INT0),
        _f("overhead_s", Float(min=0.0)),
    ),
}

MESSAGE_TYPES = frozenset(SCHEMA)
WORKER_SENDS = frozenset(
    {"hello", "token", "done", "error", "heartbeat", "stats", "policy_ack", "telemetry", "recall"}
)
CONTROL_SENDS = frozenset(
    {"ready", "generate", "cancel", "heartbeat", "stats_request", "shutdown", "error", "policy"}
)

_HEADER_KEYS = frozenset({"v", "type"})


def _cross_checks(message: dict[str, Any]) -> None:
    """Constraints between fields that a per-field spec cannot express."""
    if message["type"] == "token" and "logprobs" in message:
        if message["logprobs"].shape != (len(message["token_ids"]),):
            _bad(
                "logprobs",
                f"shape {list(message['logprobs'].shape)} must be [len(token_ids)] = "
                f"[{len(message['token_ids'])}]",
            )
    if message["type"] == "telemetry":
        n = len(message["keep_ratios"])
        for i, curve in enumerate(message["curves"]):
            for name, what in (("loss", "losses"), ("energy", "energy losses")):
                if name in curve and len(curve[name]) != n:
                    got = len(curve[name])
                    _bad(f"curves[{i}].{name}", f"has {got} {what} for {n} keep_ratios (one each)")
    if message["type"] == "recall":
        n = len(message["token_ratios"])
        for i, head in enumerate(message["heads"]):
            if len(head["recall"]) != n:
                got = len(head["recall"])
                _bad(f"heads[{i}].recall", f"has {got} recalls for {n} token_ratios (one each)")


def _request_id_of(header: Any) -> str | None:
    """Best effort: the request a rejected header belongs to, so that its sender can end it."""
    if isinstance(header, Mapping):
        rid = header.get("request_id")
        if isinstance(rid, str):
            return rid
    return None


def validate(header: Any, frames: _Frames | None = None) -> dict[str, Any]:
    """Validates a header (received, or about to be sent) and returns a clean copy in schema order,
    ``{"type": ..., **fields}`` without ``v``. Raises `ProtocolError`."""
    frames = frames if frames is not None else _Frames()
    if not isinstance(header, Mapping):
        _bad("header", f"expected map, got {_describe(header)}")
    try:
        if header.get("v") != PROTOCOL_VERSION or isinstance(header.get("v"), bool):
            raise ProtocolError(
                "protocol_version",
                f"protocol version {header.get('v')!r} is not supported; "
                f"this side speaks version {PROTOCOL_VERSION}",
            )
        mtype = header.get("type")
        if not isinstance(mtype, str) or mtype not in SCHEMA:
            _bad("type", f"unknown message type {mtype!r} (known: {', '.join(SCHEMA)})")
        message = {"type": mtype, **_check_fields(SCHEMA[mtype], header, "", frames, _HEADER_KEYS)}
        _cross_checks(message)
    except ProtocolError as exc:
        exc.request_id = _request_id_of(header)
        raise
    return message


def encode(message: Mapping[str, Any]) -> list[bytes]:
    """Encodes ``{"type": ..., **fields}`` (tensors as `Tensor`) into frames: the msgpack header,
    then one raw frame per tensor. Validates first: the encoder never sends what a receiver would
    reject. Raises `ProtocolError`."""
    clean = validate({"v": PROTOCOL_VERSION, **message})
    frames = _Frames()
    header = {"v": PROTOCOL_VERSION, "type": clean["type"]}
    header.update(_fields_to_wire(SCHEMA[clean["type"]], clean, frames))
    return [msgpack.packb(header, use_bin_type=True), *frames.frames[1:]]


def _no_ext(code: int, data: bytes) -> NoReturn:
    _bad("header", f"msgpack extension type {code} is not part of the protocol")


def decode(frames: Sequence[bytes]) -> dict[str, Any]:
    """Decodes and validates a multipart message (frame 0 = header, then raw tensor frames; no
    routing id). Returns ``{"type": ..., **fields}``. Raises `ProtocolError`."""
    if not frames:
        _bad("message", "no frames")
    try:
        header = msgpack.unpackb(frames[0], raw=False, strict_map_key=False, ext_hook=_no_ext)
    except ProtocolError:
        raise
    except Exception as exc:  # untrusted bytes: any failure of the unpacker means a bad frame
        raise ProtocolError("bad_message", f"frame 0 is not a valid msgpack header: {exc}") from exc
    received = _Frames(frames)
    message = validate(header, received)
    unused = sorted(set(range(1, len(frames))) - received.used)
    if unused:
        raise ProtocolError(
            "bad_message",
            f"message: frames {unused} are not referenced by the header",
            message.get("request_id"),
        )
    return message
