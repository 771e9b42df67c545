"""Online telemetry from a real worker (`python -m mosaickv.worker`, tiny-random, mosaickv backend,
method mosaic) over ipc://: with ``telemetry_every=1`` every prefill sends one ``telemetry`` message
with the attention-loss curve of every layer x KV head at the planner's keep ratios, and with
``recall_every=1`` every decode step sends one ``recall`` message (block-selection recall per layer x
KV head at RECALL_TOKEN_RATIOS, read from the default cache manager's snapshots)."""

from __future__ import annotations

from collections.abc import Iterator
from itertools import combinations
from typing import Any

import pytest
from test_worker import ControlPlane, mosaickv_worker

from mosaickv.policy import PLAN_KEEP_RATIOS, RECALL_TOKEN_RATIOS
from mosaickv.protocol import encode

WID = "telemetry"
OPTIONS = ("method=mosaic", "keep_ratio=1.0", "segment_len=64", "window=16", "n_sink=4", "telemetry_every=1",
           "recall_every=1")
PROMPT = " ".join(f"item {i} is {i * 7 % 13}." for i in range(60))


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    with mosaickv_worker(tmp_path_factory.mktemp("telemetry"), WID, OPTIONS) as cp:
        yield cp


def _generate(cp: ControlPlane, request_id: str, max_tokens: int = 2) -> dict[str, list[dict[str, Any]]]:
    """Runs one request; returns the telemetry and recall messages that came with it, by type."""
    cp.send(WID, {"type": "generate", "request_id": request_id, "input": {"prompt": PROMPT},
                  "params": {"max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}})  # fmt: skip
    while cp.recv(WID, request_id)["type"] != "done":
        pass
    others = cp.inbox.pop(WID, [])
    by_type: dict[str, list[dict[str, Any]]] = {"telemetry": [], "recall": []}
    for m in others:
        by_type[m["type"]].append(m)  # a KeyError here: a message of another type
    return by_type


def test_every_prefill_sends_one_valid_telemetry_message(worker: ControlPlane) -> None:
    for request_id in ("t1", "t2"):
        messages = _generate(worker, request_id)["telemetry"]
        assert len(messages) == 1
        t = messages[0]
        encode(t)  # a valid message (the test control plane decoded it too)
        assert (t["worker_id"], t["model"], t["head_dim"], t["dtype"]) == (WID, "tiny-random", 16, "float32")
        assert t["keep_ratios"] == list(PLAN_KEEP_RATIOS)
        assert t["tokens"] > 200 and t["overhead_s"] > 0
        # tiny-random: 2 layers x 2 KV heads, one curve each
        assert sorted((c["layer"], c["head"]) for c in t["curves"]) == [(0, 0), (0, 1), (1, 0), (1, 1)]
        for c in t["curves"]:
            loss = c["loss"]
            assert len(loss) == len(PLAN_KEEP_RATIOS)
            assert all(0.0 <= x <= 1.0 for x in loss)
            # More kept, less lost: doubling the keep ratio never raises the loss (within 0.02), and
            # a step to the next ratio by little (0.15: near loss 1, with 1-3 of 16 elements kept,
            # attention over garbled keys is noisy, e.g. 0.649 at 2/16 then 0.755 at 3/16).
            n = len(loss)
            for lo, hi in combinations(range(n), 2):
                if PLAN_KEEP_RATIOS[hi] >= 2 * PLAN_KEEP_RATIOS[lo]:
                    assert loss[hi] <= loss[lo] + 0.02, (c, lo, hi)
            assert all(loss[i + 1] <= loss[i] + 0.15 for i in range(n - 1)), c
            assert loss[0] > loss[-1]
    assert "telemetry sent: 4 curves" in worker.log_of(WID)


def test_every_decode_step_sends_one_valid_recall_message(worker: ControlPlane) -> None:
    # 4 tokens: the first comes from the prefill, then 3 decode steps
    messages = _generate(worker, "r1", max_tokens=4)["recall"]
    assert len(messages) == 3
    for r in messages:
        encode(r)
        assert (r["worker_id"], r["model"]) == (WID, "tiny-random")
        assert r["token_ratios"] == list(RECALL_TOKEN_RATIOS)
        assert r["tokens"] > 200 and r["overhead_s"] > 0
        assert sorted((h["layer"], h["head"]) for h in r["heads"]) == [(0, 0), (0, 1), (1, 0), (1, 1)]
        for h in r["heads"]:
            recall = h["recall"]
            assert all(0.0 <= x <= 1.0 for x in recall)
            # selections at growing ratios are nested (top-k of the same scores): recall never falls
            assert all(recall[i + 1] >= recall[i] - 1e-6 for i in range(len(recall) - 1)), h
            # a few hundred tokens, 5% of the blocks: the selection misses part of the mass
            assert recall[0] < recall[-1]
    assert [r["tokens"] for r in messages] == sorted({r["tokens"] for r in messages})  # one per step
