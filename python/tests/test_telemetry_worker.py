"""Online telemetry from a real worker (`python -m mosaickv.worker`, tiny-random, mosaickv backend,
method mosaic) over ipc://: with ``telemetry_every=1`` every prefill sends one ``telemetry`` message
with the attention-loss curve of every layer x KV head at the planner's keep ratios."""

from __future__ import annotations

from collections.abc import Iterator
from itertools import combinations
from typing import Any

import pytest
from test_worker import ControlPlane, mosaickv_worker

from mosaickv.policy import PLAN_KEEP_RATIOS
from mosaickv.protocol import encode

WID = "telemetry"
OPTIONS = ("method=mosaic", "keep_ratio=1.0", "segment_len=64", "window=16", "n_sink=4", "telemetry_every=1")
PROMPT = " ".join(f"item {i} is {i * 7 % 13}." for i in range(60))


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    with mosaickv_worker(tmp_path_factory.mktemp("telemetry"), WID, OPTIONS) as cp:
        yield cp


def _generate(cp: ControlPlane, request_id: str) -> list[dict[str, Any]]:
    """Runs one request; returns the telemetry messages that came with it."""
    cp.send(WID, {"type": "generate", "request_id": request_id, "input": {"prompt": PROMPT},
                  "params": {"max_tokens": 2, "temperature": 0.0}})  # fmt: skip
    while cp.recv(WID, request_id)["type"] != "done":
        pass
    others = cp.inbox.pop(WID, [])
    assert all(m["type"] == "telemetry" for m in others), others
    return others


def test_every_prefill_sends_one_valid_telemetry_message(worker: ControlPlane) -> None:
    for request_id in ("t1", "t2"):
        messages = _generate(worker, request_id)
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
