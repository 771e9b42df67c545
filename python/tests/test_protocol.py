"""The wire protocol against the committed test vectors (test/vectors/, shared with vitest) and
against bytes written out by hand from the msgpack specification."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Any

import msgpack
import pytest

from mosaickv.protocol import ERROR_CATALOGUE, ProtocolError, Tensor, decode, encode
from mosaickv.protocol.vectors import write_vectors

ROOT = Path(__file__).resolve().parents[2]
VECTORS = ROOT / "test" / "vectors"
INDEX = json.loads((VECTORS / "index.json").read_text())


def _load(name: str) -> tuple[dict[str, Any], list[bytes]]:
    doc = json.loads((VECTORS / f"{name}.json").read_text())
    return doc, [(VECTORS / f).read_bytes() for f in doc["frames"]]


def _as_json(message: dict[str, Any]) -> dict[str, Any]:
    """A decoded message with tensors shown as the references the JSON files hold."""
    out = dict(message)
    frame = 1
    for key, value in message.items():
        if isinstance(value, Tensor):
            out[key] = {"dtype": value.dtype, "shape": list(value.shape), "frame": frame}
            frame += 1
    return out


@pytest.mark.parametrize("name", INDEX["valid"])
def test_valid_vector_decodes_and_reencodes_byte_for_byte(name: str) -> None:
    doc, frames = _load(name)
    message = decode(frames)
    assert _as_json(message) == doc["message"]
    for key, value in message.items():
        if isinstance(value, Tensor):
            assert value.data == frames[doc["message"][key]["frame"]]
    assert encode(message) == frames


@pytest.mark.parametrize("name", INDEX["invalid"])
def test_invalid_vector_is_rejected_with_its_code(name: str) -> None:
    doc, frames = _load(name)
    with pytest.raises(ProtocolError) as info:
        decode(frames)
    assert info.value.code == doc["error"]["code"]
    assert doc["error"]["mentions"] in info.value.message


def test_every_message_type_has_a_vector() -> None:
    types = {json.loads((VECTORS / f"{n}.json").read_text())["message"]["type"] for n in INDEX["valid"]}
    documented = set(re.findall(r"^### (\w+)", (ROOT / "docs" / "PROTOCOL.md").read_text(), re.M))
    documented |= {"stats"}  # documented in the "stats_request / stats" heading
    assert types == documented


def test_vectors_on_disk_are_up_to_date(tmp_path: Path) -> None:
    write_vectors(tmp_path)
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == sorted(p.name for p in VECTORS.iterdir())
    for fname in written:
        assert (tmp_path / fname).read_bytes() == (VECTORS / fname).read_bytes(), (
            f"{fname} is stale: run `python -m mosaickv.protocol.vectors`"
        )


def _s(text: str) -> bytes:
    """A msgpack fixstr (< 32 bytes)."""
    raw = text.encode()
    return bytes([0xA0 | len(raw)]) + raw


def test_bytes_match_the_msgpack_spec_written_by_hand() -> None:
    # heartbeat with a kv_bytes of 2**32: fixmap of 5, positive fixint, uint64 (0xcf) for the big int.
    expected = (
        b"\x85" + _s("v") + b"\x01" + _s("type") + _s("heartbeat") + _s("worker_id") + _s("w")
        + _s("inflight") + b"\xcc\xc8" + _s("kv_bytes") + b"\xcf" + struct.pack(">Q", 2**32)
    )  # fmt: skip
    frames = encode({"type": "heartbeat", "worker_id": "w", "inflight": 200, "kv_bytes": 2**32})
    assert frames == [expected]


def test_integral_float_is_float64_and_engine_number_is_int() -> None:
    frames = encode(
        {
            "type": "generate",
            "request_id": "r",
            "input": {"prompt": "x"},
            "params": {"max_tokens": 1, "temperature": 1},
        }
    )
    assert frames[0].endswith(_s("temperature") + b"\xcb" + struct.pack(">d", 1.0))
    stats = encode(
        {
            "type": "stats", "nonce": 0, "worker_id": "w", "inflight": 0, "requests_total": 0,
            "tokens_generated_total": 0, "kv_bytes": 0, "kv_bytes_peak": 0, "engine": {"a": 3.0, "b": -1.5},
        }
    )  # fmt: skip
    assert stats[0].endswith(
        _s("engine") + b"\x82" + _s("a") + b"\x03" + _s("b") + b"\xcb" + struct.pack(">d", -1.5)
    )


def test_tensor_travels_as_a_raw_frame() -> None:
    data = struct.pack("<2f", -0.25, -4.0)
    frames = encode(
        {"type": "token", "request_id": "r", "index": 0, "text": "", "token_ids": [7, 8],
         "logprobs": Tensor("float32", (2,), data)}
    )  # fmt: skip
    assert frames[1] == data
    reference = b"\x83" + _s("dtype") + _s("float32") + _s("shape") + b"\x91\x02" + _s("frame") + b"\x01"
    assert frames[0].endswith(_s("logprobs") + reference)


@pytest.mark.parametrize(
    ("message", "mentions"),
    [
        ({"type": "cancel"}, "request_id"),
        ({"type": "cancel", "request_id": "r", "extra": 1}, "extra"),
        ({"type": "ready", "worker_id": "w", "heartbeat_ms": 0}, "heartbeat_ms"),
        ({"type": "nope"}, "nope"),
    ],
)
def test_encoder_refuses_what_a_receiver_would_reject(message: dict[str, Any], mentions: str) -> None:
    with pytest.raises(ProtocolError, match=mentions):
        encode(message)


def test_error_catalogue_matches_the_protocol_document() -> None:
    doc = (ROOT / "docs" / "PROTOCOL.md").read_text().split("## Error codes", 1)[1]
    table = {code: int(status) for code, status in re.findall(r"^\| (\w+) \| (\d{3}) \|", doc, re.M)}
    assert table == {code: spec.http_status for code, spec in ERROR_CATALOGUE.items()}


def test_rejected_generate_names_its_request() -> None:
    with pytest.raises(ProtocolError) as info:
        decode(
            [msgpack.packb({"v": 1, "type": "generate", "request_id": "req-9", "input": {}, "params": {}})]
        )
    assert info.value.request_id == "req-9"
