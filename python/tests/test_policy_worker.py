"""Segment policies reaching a real worker (`python -m mosaickv.worker`, tiny-random, mosaickv backend)
over ipc://: bad policies are refused with a reason and the old one stays; an accepted one changes
the real KV bytes of the next request."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from test_worker import ControlPlane, mosaickv_worker

WID = "policy"
# Small segments so that a ~300-token prompt is mostly packed (the dense sinks + window stay small).
# Keep every element first: the cache manager's page rows pad the values to 8 (the kernels' stride),
# so at head_dim 16 a policy's keep 2 stores half the row of keep 16 (keep 8 would store the same).
OPTIONS = ("method=mosaic", "keep_ratio=1.0", "segment_len=64", "window=16", "n_sink=4")
PROMPT = " ".join(f"item {i} is {i * 7 % 13}." for i in range(60))


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    with mosaickv_worker(tmp_path_factory.mktemp("policy"), WID, OPTIONS) as cp:
        yield cp


def _kv_bytes(cp: ControlPlane, request_id: str) -> int:
    cp.send(WID, {"type": "generate", "request_id": request_id, "input": {"prompt": PROMPT},
                  "params": {"max_tokens": 1, "temperature": 0.0}})  # fmt: skip
    while True:
        message = cp.recv(WID, request_id)
        if message["type"] == "done":
            return int(message["kv_bytes"])
        assert message["type"] == "token", message


def _policy(
    version: int, keep: dict[tuple[int, int], float], token: dict[tuple[int, int], float] | None = None
) -> dict[str, Any]:
    token = token or {}
    heads = [{"layer": layer, "head": head, "keep_ratio": k, "token_ratio": token.get((layer, head), 0.1),
              "loss_threshold": 0.2} for (layer, head), k in keep.items()]  # fmt: skip
    return {"type": "policy", "version": version, "heads": heads}


def _ack(cp: ControlPlane) -> dict[str, Any]:
    message = cp.recv(WID)
    assert message["type"] == "policy_ack", message
    return message


ALL = [(layer, head) for layer in range(2) for head in range(2)]  # tiny-random: 2 layers x 2 KV heads


def test_policies_are_validated_acked_and_change_real_kv_bytes(worker: ControlPlane) -> None:
    before = _kv_bytes(worker, "before")

    worker.send(WID, _policy(1, {key: 0.125 for key in ALL[:3]}))
    ack = _ack(worker)
    assert ack == {"type": "policy_ack", "worker_id": WID, "version": 1, "accepted": False,
                   "reason": ack["reason"]}  # fmt: skip
    assert "covers 3 of the model's 2 x 2" in ack["reason"]

    worker.send(WID, _policy(2, {key: 0.125 for key in ALL}, token={(0, 1): 0.25}))
    ack = _ack(worker)
    assert not ack["accepted"] and "layer 0 asks for different token ratios" in ack["reason"]
    assert _kv_bytes(worker, "after-refusals") == before  # the refused policies changed nothing

    worker.send(WID, _policy(3, {key: 0.125 for key in ALL}))
    accepted = {"type": "policy_ack", "worker_id": WID, "version": 3, "accepted": True, "reason": None}
    assert _ack(worker) == accepted
    planned = _kv_bytes(worker, "planned")
    # Keep 2 instead of all 16 elements (rows of 8 padded values instead of 16): the total must drop a lot.
    assert planned < 0.8 * before

    worker.send(WID, _policy(4, {(5, 0): 0.125}))
    assert not _ack(worker)["accepted"]
    assert _kv_bytes(worker, "after-bad") == planned  # policy 3 stays in force

    # Per-head budgets: head 0 of every layer keeps everything again, head 1 stays at 2 of 16.
    worker.send(WID, _policy(5, {key: 1.0 if key[1] == 0 else 0.125 for key in ALL}))
    assert _ack(worker)["accepted"]
    assert planned < _kv_bytes(worker, "per-head") < before
