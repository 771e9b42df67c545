"""Writes the protocol test vectors to test/vectors/ (run: ``python -m mosaickv.protocol.vectors``).

Per case: ``NAME.msgpack`` (the exact bytes of frame 0), ``NAME.frameK.bin`` for raw tensor frames,
and ``NAME.json``: ``{"name", "description", "valid", "frames": [file names, frame 0 first]}`` plus,
for a valid case, ``"message"`` (the decoded message, ``{"type", ...fields}``, tensors as their
``{"dtype", "shape", "frame"}`` reference) and, for an invalid one, ``"error"``: ``{"code",
"mentions"}`` (the code the receiver must answer with and a substring its message must contain).
``index.json`` lists every case. Both test suites decode every valid case to ``message`` and
re-encode it to the same bytes, and reject every invalid case with ``code``.

The messages below are written by hand, not produced by the decoder; valid cases are encoded with
`encode`, invalid ones packed raw (they could not pass `encode`).
"""

from __future__ import annotations

import argparse
import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

from .wire import PROTOCOL_VERSION, Tensor, encode

V = PROTOCOL_VERSION


@dataclass(frozen=True)
class Case:
    name: str
    description: str
    message: dict[str, Any] | None = None  # valid: the message as the sender builds it
    raw: bytes = b""  # invalid: frame 0 exactly
    extra_frames: Sequence[bytes] = ()  # invalid: raw frames after frame 0
    error: dict[str, str] = field(default_factory=dict)  # invalid: {"code", "mentions"}


def _raw(header: Any) -> bytes:
    return msgpack.packb(header, use_bin_type=True)


LOGPROBS = Tensor("float32", (3,), struct.pack("<3f", -0.125, -2.5, -10.0))

_HELLO = {
    "type": "hello",
    "worker_id": "w-0",
    "pid": 4242,
    "host": "node-1",
    "engine": "hf",
    "model": "smollm2-135m",
    "backend": "stock",
    "device": "cpu",
    "capabilities": {"max_context": 8192, "max_inflight": 4, "method": None, "chat_template": True},
}
_GENERATE_MIN = {
    "type": "generate",
    "request_id": "req-1",
    "input": {"prompt": "Hello"},
    "params": {"max_tokens": 16},
}

VALID: list[Case] = [
    Case("hello", "handshake, stock backend (method nil)", _HELLO),
    Case(
        "hello_mosaickv",
        "handshake, mosaickv backend on a GPU; unicode host",
        {
            **_HELLO,
            "worker_id": "gpu-worker-ü",
            "host": "hôte-🚀",
            "backend": "mosaickv",
            "device": "cuda:0 (NVIDIA H200)",
            "capabilities": {
                "max_context": 1048576,
                "max_inflight": 64,
                "method": "mosaic",
                "chat_template": False,
            },
        },
    ),
    Case("ready", "handshake answer", {"type": "ready", "worker_id": "w-0", "heartbeat_ms": 1000}),
    Case("generate_prompt_minimal", "prompt input, only the required param", _GENERATE_MIN),
    Case(
        "generate_prompt_all_params",
        "every optional param present; seed above 32 bits, unicode stop",
        {
            "type": "generate",
            "request_id": "req-2",
            "input": {"prompt": "Write a haiku about caches.\n"},
            "params": {
                "max_tokens": 300,
                "temperature": 0.7,
                "top_p": 0.95,
                "seed": 1099511627776,
                "stop": ["\n\n", "END", "ünïcödé ✓"],
                "ignore_eos": True,
                "logprobs": True,
            },
        },
    ),
    Case(
        "generate_integral_floats",
        "float params with integral values stay float64 on the wire",
        {
            "type": "generate",
            "request_id": "req-3",
            "input": {"prompt": ""},
            "params": {"max_tokens": 1, "temperature": 1.0, "top_p": 1.0, "seed": None},
        },
    ),
    Case(
        "generate_token_ids",
        "token-id input across the integer widths; negative seed",
        {
            "type": "generate",
            "request_id": "req-4",
            "input": {
                "token_ids": [
                    0,
                    1,
                    31,
                    32,
                    63,
                    64,
                    127,
                    128,
                    255,
                    256,
                    65535,
                    65536,
                    4294967295,
                    4294967296,
                    9007199254740991,
                ]
            },
            "params": {"max_tokens": 128, "temperature": 0.0, "seed": -2147483649, "stop": []},
        },
    ),
    Case(
        "generate_negative_seeds",
        "a negative fixint seed, an empty token-id list, max_tokens as uint32",
        {
            "type": "generate",
            "request_id": "req-5",
            "input": {"token_ids": []},
            "params": {"max_tokens": 65536, "seed": -3},
        },
    ),
    Case(
        "generate_messages",
        "chat input with unicode content",
        {
            "type": "generate",
            "request_id": "req-6",
            "input": {
                "messages": [
                    {"role": "system", "content": "Réponds en français."},
                    {"role": "user", "content": "What is 2+2? 你好 🙂"},
                ]
            },
            "params": {"max_tokens": 32, "temperature": 0.0, "ignore_eos": False},
        },
    ),
    Case(
        "token",
        "a streamed chunk",
        {"type": "token", "request_id": "req-1", "index": 0, "text": " Hello", "token_ids": [22557]},
    ),
    Case(
        "token_empty_text",
        "a chunk holding half of a multi-byte character: no text yet",
        {"type": "token", "request_id": "req-1", "index": 1, "text": "", "token_ids": [216]},
    ),
    Case(
        "token_unicode",
        "text with characters of 2, 3 and 4 UTF-8 bytes; a 40-byte string (str8)",
        {
            "type": "token",
            "request_id": "req-1",
            "index": 70000,
            "text": "é€🙂 and a longer string of text",
            "token_ids": [1, 2, 3],
        },
    ),
    Case(
        "token_logprobs",
        "a chunk with its log-probabilities as a float32 tensor in frame 1",
        {
            "type": "token",
            "request_id": "req-2",
            "index": 3,
            "text": "abc",
            "token_ids": [10, 300, 70000],
            "logprobs": LOGPROBS,
        },
    ),
    Case(
        "done",
        "finished by a stop string; KV bytes above 32 bits",
        {
            "type": "done",
            "request_id": "req-1",
            "finish_reason": "stop",
            "usage": {"prompt_tokens": 12, "completion_tokens": 7},
            "kv_bytes": 8589934597,
            "full_kv_bytes": 25769803776,
            "timing": {"prefill_ms": 12.5, "decode_ms": 1234.0625},
        },
    ),
    Case(
        "done_length",
        "finished by max_tokens; integral float timings",
        {
            "type": "done",
            "request_id": "req-2",
            "finish_reason": "length",
            "usage": {"prompt_tokens": 1, "completion_tokens": 300},
            "kv_bytes": 1536,
            "full_kv_bytes": 1536,
            "timing": {"prefill_ms": 3.0, "decode_ms": 0.0},
        },
    ),
    Case(
        "done_cancelled",
        "cancelled before any token",
        {
            "type": "done",
            "request_id": "req-3",
            "finish_reason": "cancelled",
            "usage": {"prompt_tokens": 0, "completion_tokens": 0},
            "kv_bytes": 0,
            "full_kv_bytes": 0,
            "timing": {"prefill_ms": 0.001, "decode_ms": 0.0},
        },
    ),
    Case(
        "error_request",
        "an error that ends a request",
        {
            "type": "error",
            "request_id": "req-4",
            "code": "engine_error",
            "message": "CUDA out of memory while decoding; lower max_tokens or the batch",
        },
    ),
    Case(
        "error_connection",
        "a connection-level error (request_id nil)",
        {
            "type": "error",
            "request_id": None,
            "code": "bad_message",
            "message": "params.max_tokens: must be >= 1, got 0",
        },
    ),
    Case("cancel", "cancel a request", {"type": "cancel", "request_id": "req-1"}),
    Case(
        "heartbeat_worker",
        "worker heartbeat",
        {"type": "heartbeat", "worker_id": "w-0", "inflight": 2, "kv_bytes": 4294967296},
    ),
    Case(
        "heartbeat_control",
        "control-plane heartbeat",
        {"type": "heartbeat", "worker_id": "w-0", "inflight": 0, "kv_bytes": 0},
    ),
    Case(
        "stats_request",
        "stats request, nonce above 32 bits",
        {"type": "stats_request", "nonce": 123456789012},
    ),
    Case(
        "stats",
        "stats with engine numbers: ints (one above 32 bits, one negative) and floats",
        {
            "type": "stats",
            "nonce": 7,
            "worker_id": "w-0",
            "inflight": 1,
            "requests_total": 1000,
            "tokens_generated_total": 123456,
            "kv_bytes": 0,
            "kv_bytes_peak": 5000000000,
            "engine": {
                "decode_tokens_per_s": 41.25,
                "load_ms": 1800,
                "steps": 5000000000,
                "delta": -3,
                "ratio": 0.1,
            },
        },
    ),
    Case(
        "stats_empty_engine",
        "stats with an empty engine map",
        {
            "type": "stats",
            "nonce": 0,
            "worker_id": "w-1",
            "inflight": 0,
            "requests_total": 0,
            "tokens_generated_total": 0,
            "kv_bytes": 0,
            "kv_bytes_peak": 0,
            "engine": {},
        },
    ),
    Case(
        "shutdown",
        "shutdown with a unicode reason",
        {"type": "shutdown", "reason": "control plane stopping — bye"},
    ),
    Case(
        "policy",
        "policy with two heads (integral floats go out as float64)",
        {
            "type": "policy",
            "version": 3,
            "heads": [
                {"layer": 0, "head": 0, "keep_ratio": 0.125, "token_ratio": 0.1, "loss_threshold": 0.2},
                {"layer": 0, "head": 1, "keep_ratio": 1.0, "token_ratio": 0.25, "loss_threshold": 0.0},
            ],
        },
    ),
    Case(
        "policy_ack_accepted",
        "policy_ack of an accepted policy (reason nil)",
        {"type": "policy_ack", "worker_id": "w-0", "version": 3, "accepted": True, "reason": None},
    ),
    Case(
        "policy_ack_refused",
        "policy_ack refusing a policy with the reason",
        {"type": "policy_ack", "worker_id": "w-1", "version": 4, "accepted": False,
         "reason": "layer 30 is outside the model (30 layers)"},
    ),
    Case(
        "telemetry",
        "telemetry: attention-loss curves of two heads at three keep ratios, one with its energy losses "
        "(integral floats as float64)",
        {
            "type": "telemetry",
            "worker_id": "w-0",
            "model": "smollm2-135m",
            "head_dim": 64,
            "dtype": "bfloat16",
            "keep_ratios": [0.125, 0.5, 0.75],
            "curves": [
                {"layer": 0, "head": 0, "loss": [0.5, 0.125, 0.0], "energy": [0.25, 0.0625, 0.0]},
                {"layer": 0, "head": 1, "loss": [1.0, 0.25, 0.0625]},
            ],
            "tokens": 1024,
            "overhead_s": 0.375,
        },
    ),
    Case(
        "recall",
        "recall: block-selection recall of two heads at two token ratios on a sampled decode step",
        {
            "type": "recall",
            "worker_id": "w-0",
            "model": "smollm2-135m",
            "token_ratios": [0.1, 0.5],
            "heads": [
                {"layer": 3, "head": 0, "recall": [0.75, 1.0]},
                {"layer": 3, "head": 1, "recall": [0.5, 0.875]},
            ],
            "tokens": 2048,
            "overhead_s": 0.125,
        },
    ),
]


def _gen(**params: Any) -> dict[str, Any]:
    return {"v": V, "type": "generate", "request_id": "bad-1", "input": {"prompt": "x"}, "params": params}


def _bad(
    name: str, description: str, raw: bytes, code: str, mentions: str, frames: Sequence[bytes] = ()
) -> Case:
    return Case(name, description, raw=raw, extra_frames=frames, error={"code": code, "mentions": mentions})


_TENSOR_REF = {"dtype": "float32", "shape": [2], "frame": 1}
_TOKEN = {"v": V, "type": "token", "request_id": "r", "index": 0, "text": "ab", "token_ids": [1, 2]}
_F32X2 = struct.pack("<2f", -1.0, -2.0)

INVALID: list[Case] = [
    _bad(
        "invalid_wrong_version",
        "v is 2",
        _raw({"v": 2, "type": "cancel", "request_id": "r"}),
        "protocol_version",
        "2",
    ),
    _bad(
        "invalid_missing_version",
        "no v",
        _raw({"type": "cancel", "request_id": "r"}),
        "protocol_version",
        "version",
    ),
    _bad(
        "invalid_unknown_type",
        "type not in the schema",
        _raw({"v": V, "type": "explode", "request_id": "r"}),
        "bad_message",
        "explode",
    ),
    _bad("invalid_missing_type", "no type", _raw({"v": V, "request_id": "r"}), "bad_message", "type"),
    _bad(
        "invalid_missing_field",
        "generate without params",
        _raw({"v": V, "type": "generate", "request_id": "r", "input": {"prompt": "x"}}),
        "bad_message",
        "params",
    ),
    _bad(
        "invalid_extra_field",
        "an unknown top-level field",
        _raw({"v": V, "type": "cancel", "request_id": "r", "priority": 1}),
        "bad_message",
        "priority",
    ),
    _bad(
        "invalid_extra_nested_field",
        "an unknown field inside params",
        _raw(_gen(max_tokens=4, beam_width=2)),
        "bad_message",
        "beam_width",
    ),
    _bad(
        "invalid_wrong_type_str",
        "max_tokens as a string",
        _raw(_gen(max_tokens="5")),
        "bad_message",
        "max_tokens",
    ),
    _bad(
        "invalid_wrong_type_bool_as_int",
        "inflight is a bool",
        _raw({"v": V, "type": "heartbeat", "worker_id": "w", "inflight": True, "kv_bytes": 0}),
        "bad_message",
        "inflight",
    ),
    _bad(
        "invalid_float_as_int",
        "an int field holding a float",
        _raw(_gen(max_tokens=4.5)),
        "bad_message",
        "max_tokens",
    ),
    _bad(
        "invalid_max_tokens_zero", "max_tokens below 1", _raw(_gen(max_tokens=0)), "bad_message", "max_tokens"
    ),
    _bad(
        "invalid_top_p_zero",
        "top_p must be in (0, 1]",
        _raw(_gen(max_tokens=1, top_p=0.0)),
        "bad_message",
        "top_p",
    ),
    _bad(
        "invalid_temperature_negative",
        "temperature below 0",
        _raw(_gen(max_tokens=1, temperature=-0.5)),
        "bad_message",
        "temperature",
    ),
    _bad(
        "invalid_temperature_nan",
        "a NaN float",
        _raw(_gen(max_tokens=1, temperature=float("nan"))),
        "bad_message",
        "temperature",
    ),
    _bad(
        "invalid_int_unsafe",
        "an integer above 2**53 - 1",
        _raw({"v": V, "type": "stats_request", "nonce": 2**53}),
        "bad_message",
        "nonce",
    ),
    _bad(
        "invalid_policy_keep_ratio_zero",
        "a policy head's keep_ratio must be in (0, 1]",
        _raw({"v": V, "type": "policy", "version": 1, "heads": [
            {"layer": 0, "head": 0, "keep_ratio": 0.0, "token_ratio": 0.1, "loss_threshold": 0.1}]}),
        "bad_message",
        "keep_ratio",
    ),
    _bad(
        "invalid_telemetry_loss_above_one",
        "a telemetry loss must be in [0, 1]",
        _raw({"v": V, "type": "telemetry", "worker_id": "w", "model": "m", "head_dim": 16, "dtype": "float32",
              "keep_ratios": [0.5], "curves": [{"layer": 0, "head": 0, "loss": [1.5]}], "tokens": 8,
              "overhead_s": 0.1}),
        "bad_message",
        "loss",
    ),
    _bad(
        "invalid_telemetry_loss_length",
        "a telemetry curve needs one loss per keep ratio",
        _raw({"v": V, "type": "telemetry", "worker_id": "w", "model": "m", "head_dim": 16, "dtype": "float32",
              "keep_ratios": [0.25, 0.5], "curves": [{"layer": 0, "head": 0, "loss": [0.5]}], "tokens": 8,
              "overhead_s": 0.1}),
        "bad_message",
        "keep_ratios",
    ),
    _bad(
        "invalid_telemetry_energy_length",
        "a telemetry curve's energy losses, when sent, need one per keep ratio",
        _raw({"v": V, "type": "telemetry", "worker_id": "w", "model": "m", "head_dim": 16, "dtype": "float32",
              "keep_ratios": [0.25, 0.5], "curves": [{"layer": 0, "head": 0, "loss": [0.5, 0.25],
                                                      "energy": [0.5]}], "tokens": 8, "overhead_s": 0.1}),
        "bad_message",
        "energy",
    ),
    _bad(
        "invalid_recall_above_one",
        "a recall is a share of attention mass, in [0, 1]",
        _raw({"v": V, "type": "recall", "worker_id": "w", "model": "m", "token_ratios": [0.1],
              "heads": [{"layer": 0, "head": 0, "recall": [1.25]}], "tokens": 8, "overhead_s": 0.1}),
        "bad_message",
        "recall",
    ),
    _bad(
        "invalid_recall_length",
        "a recall head needs one recall per token ratio",
        _raw({"v": V, "type": "recall", "worker_id": "w", "model": "m", "token_ratios": [0.1, 0.2],
              "heads": [{"layer": 0, "head": 0, "recall": [0.5]}], "tokens": 8, "overhead_s": 0.1}),
        "bad_message",
        "token_ratios",
    ),
    _bad(
        "invalid_recall_token_ratio_zero",
        "recall token ratios are in (0, 1]",
        _raw({"v": V, "type": "recall", "worker_id": "w", "model": "m", "token_ratios": [0.0],
              "heads": [{"layer": 0, "head": 0, "recall": [0.5]}], "tokens": 8, "overhead_s": 0.1}),
        "bad_message",
        "token_ratios",
    ),
    _bad(
        "invalid_policy_version_zero",
        "policy versions start at 1",
        _raw({"v": V, "type": "policy", "version": 0, "heads": []}),
        "bad_message",
        "version",
    ),
    _bad(
        "invalid_negative_token_id",
        "token ids are >= 0",
        _raw(
            {
                "v": V,
                "type": "generate",
                "request_id": "r",
                "input": {"token_ids": [5, -1]},
                "params": {"max_tokens": 1},
            }
        ),
        "bad_message",
        "token_ids",
    ),
    _bad(
        "invalid_input_two_kinds",
        "input with both prompt and token_ids",
        _raw(
            {
                "v": V,
                "type": "generate",
                "request_id": "r",
                "input": {"prompt": "x", "token_ids": [1]},
                "params": {"max_tokens": 1},
            }
        ),
        "bad_message",
        "input",
    ),
    _bad(
        "invalid_input_empty",
        "input with no kind",
        _raw({"v": V, "type": "generate", "request_id": "r", "input": {}, "params": {"max_tokens": 1}}),
        "bad_message",
        "input",
    ),
    _bad(
        "invalid_finish_reason",
        "finish_reason not in the enum",
        _raw(
            {
                "v": V,
                "type": "done",
                "request_id": "r",
                "finish_reason": "eos",
                "usage": {"prompt_tokens": 1, "completion_tokens": 1},
                "kv_bytes": 0,
                "full_kv_bytes": 0,
                "timing": {"prefill_ms": 0.5, "decode_ms": 0.5},
            }
        ),
        "bad_message",
        "finish_reason",
    ),
    _bad(
        "invalid_error_code",
        "an error code outside the catalogue",
        _raw({"v": V, "type": "error", "request_id": None, "code": "oops", "message": "m"}),
        "bad_message",
        "oops",
    ),
    _bad(
        "invalid_null_not_nullable",
        "nil in a non-nullable field",
        _raw({"v": V, "type": "cancel", "request_id": None}),
        "bad_message",
        "request_id",
    ),
    _bad(
        "invalid_not_msgpack",
        "frame 0 is not msgpack (0xc1 is never used)",
        b"\xc1\x00",
        "bad_message",
        "msgpack",
    ),
    _bad(
        "invalid_truncated",
        "frame 0 cut in the middle of a map",
        _raw({"v": V, "type": "cancel", "request_id": "r"})[:-3],
        "bad_message",
        "msgpack",
    ),
    _bad(
        "invalid_trailing_bytes",
        "a valid header followed by extra bytes",
        _raw({"v": V, "type": "cancel", "request_id": "r"}) + b"\x00",
        "bad_message",
        "msgpack",
    ),
    _bad("invalid_header_not_map", "frame 0 is an array", _raw([V, "cancel", "r"]), "bad_message", "map"),
    _bad(
        "invalid_extension_type",
        "a msgpack extension record in a field",
        _raw({"v": V, "type": "cancel", "request_id": msgpack.ExtType(1, b"r")}),
        "bad_message",
        "extension",
    ),
    _bad(
        "invalid_tensor_missing_frame",
        "logprobs references frame 1, which was not sent",
        _raw({**_TOKEN, "logprobs": _TENSOR_REF}),
        "bad_message",
        "frame",
    ),
    _bad(
        "invalid_tensor_wrong_size",
        "the frame holds 3 bytes, not 2 float32",
        _raw({**_TOKEN, "logprobs": _TENSOR_REF}),
        "bad_message",
        "bytes",
        frames=[b"\x00\x00\x00"],
    ),
    _bad(
        "invalid_tensor_wrong_dtype",
        "logprobs must be float32",
        _raw({**_TOKEN, "logprobs": {**_TENSOR_REF, "dtype": "int32"}}),
        "bad_message",
        "float32",
        frames=[_F32X2],
    ),
    _bad(
        "invalid_tensor_shape_mismatch",
        "logprobs has 1 entry for 2 token ids",
        _raw({**_TOKEN, "logprobs": {**_TENSOR_REF, "shape": [1]}}),
        "bad_message",
        "logprobs",
        frames=[_F32X2[:4]],
    ),
    _bad(
        "invalid_unreferenced_frame",
        "an extra frame no header field points at",
        _raw({"v": V, "type": "cancel", "request_id": "r"}),
        "bad_message",
        "frame",
        frames=[b"\x01"],
    ),
]

CASES: list[Case] = VALID + INVALID


def _as_json(message: dict[str, Any]) -> dict[str, Any]:
    """The message with each tensor replaced by the frame reference it has on the wire."""
    out: dict[str, Any] = {}
    frame = 1
    for key, value in message.items():
        if isinstance(value, Tensor):
            out[key] = {"dtype": value.dtype, "shape": list(value.shape), "frame": frame}
            frame += 1
        else:
            out[key] = value
    return out


def write_vectors(out_dir: Path) -> list[str]:
    """Writes every case into `out_dir` (replacing stale vector files) and returns the case names."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in [*out_dir.glob("*.msgpack"), *out_dir.glob("*.bin"), *out_dir.glob("*.json")]:
        stale.unlink()
    for case in CASES:
        if case.message is not None:
            frames = encode(case.message)
            doc: dict[str, Any] = {"name": case.name, "description": case.description, "valid": True}
        else:
            frames = [case.raw, *case.extra_frames]
            doc = {"name": case.name, "description": case.description, "valid": False}
        names = [f"{case.name}.msgpack"] + [f"{case.name}.frame{i}.bin" for i in range(1, len(frames))]
        for fname, data in zip(names, frames, strict=True):
            (out_dir / fname).write_bytes(data)
        doc["frames"] = names
        if case.message is not None:
            doc["message"] = _as_json(case.message)
        else:
            doc["error"] = case.error
        (out_dir / f"{case.name}.json").write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    index = {
        "protocol_version": PROTOCOL_VERSION,
        "generator": "python -m mosaickv.protocol.vectors",
        "valid": [c.name for c in VALID],
        "invalid": [c.name for c in INVALID],
    }
    (out_dir / "index.json").write_text(json.dumps(index, indent=2) + "\n")
    return [c.name for c in CASES]


def main(argv: Sequence[str] | None = None) -> None:
    default = Path(__file__).resolve().parents[3] / "test" / "vectors"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=default, help=f"output directory (default: {default})")
    args = parser.parse_args(argv)
    names = write_vectors(args.out)
    print(f"wrote {len(names)} protocol vectors ({len(VALID)} valid, {len(INVALID)} invalid) to {args.out}")


if __name__ == "__main__":
    main()
