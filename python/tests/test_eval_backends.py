"""The hf engine's mosaickv and kvpress backends, and the eval runner, on tiny-random (a real Llama
architecture with random weights: 2 layers, 4 query / 2 KV heads, head_dim 16, float32).

Oracles: a lossless setting of the packed path must reproduce the stock cache token for token and
in perplexity; budgets are checked against the dense size computed here from the model's shape.
"""

from __future__ import annotations

import json
import threading

import pytest
import torch

from mosaickv.engines.base import Failed, Finished, GenerateRequest, SamplingParams
from mosaickv.engines.hf.backends import make_backend
from mosaickv.engines.hf.engine import HFEngine
from mosaickv.engines.hf.models import load_model
from mosaickv.eval import perplexity, run
from mosaickv.eval.methods import installed, make_method_backend, prefill
from mosaickv.eval.model import greedy_continue
from mosaickv.protocol import MosaicError

DENSE_BYTES_PER_TOKEN = 2 * 2 * 2 * 16 * 4  # K and V x layers x KV heads x head_dim x float32
LOSSLESS = "mosaic:keep_ratio=1.0:token_ratio=1.0"


@pytest.fixture(scope="module")
def tiny() -> tuple[torch.nn.Module, object]:
    return load_model("tiny-random")


def prompt(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(10, 5000, (1, n), generator=torch.Generator().manual_seed(seed))


def generate(
    model: torch.nn.Module, method: str, ids: torch.Tensor, budget: float = 3.0
) -> tuple[list[int], int]:
    backend = make_method_backend(method, budget)
    with installed(backend, model):
        p = prefill(model, backend, ids)
        return greedy_continue(model, p.cache, p.logits, ids.shape[1], 10, set()), p.kv_bytes


def test_lossless_packed_path_reproduces_the_stock_cache(tiny: tuple) -> None:
    model, _ = tiny
    ids = prompt(200)
    stock, stock_bytes = generate(model, "full", ids)
    packed, _ = generate(model, LOSSLESS, ids)
    quest_all, _ = generate(model, "quest:token_ratio=1.0", ids)
    assert packed == stock and quest_all == stock
    assert stock_bytes == 200 * DENSE_BYTES_PER_TOKEN


@pytest.mark.parametrize("method", ["mosaic", "think", "naive2d"])
def test_budget_fits_real_bytes(tiny: tuple, method: str) -> None:
    model, _ = tiny
    ids = prompt(1200, seed=1)
    out, kv = generate(model, method, ids, budget=2.0)
    dense = 1200 * DENSE_BYTES_PER_TOKEN
    assert len(out) == 10
    # At most half the dense bytes, and close to it (keep_ratio moves in 1/16 steps on head_dim 16).
    assert 0.35 * dense < kv <= 0.5 * dense


def test_decode_appends_to_the_packed_cache(tiny: tuple) -> None:
    model, _ = tiny
    backend = make_method_backend("mosaic:keep_ratio=0.5", 3.0)
    ids = prompt(300, seed=2)
    with installed(backend, model):
        p = prefill(model, backend, ids)
        before = backend.kv_bytes(p.cache)
        greedy_continue(model, p.cache, p.logits, 300, 6, set())
    assert p.cache.get_seq_length() == 305  # 5 fed back (the 6th token is never fed)
    assert backend.kv_bytes(p.cache) > before
    assert model.config._attn_implementation != "mosaickv"  # installed() restored the model


def test_kvpress_presses_shrink_real_tensors_except_think(tiny: tuple) -> None:
    model, _ = tiny
    ids = prompt(300, seed=3)
    _, snap = generate(model, "kvpress:snapkv", ids)
    _, think = generate(model, "kvpress:think", ids)
    # A third of the tokens kept (kvpress floors: 99 or 100 of 300), tensors really pruned.
    assert snap in (99 * DENSE_BYTES_PER_TOKEN, 100 * DENSE_BYTES_PER_TOKEN)
    assert think == 300 * DENSE_BYTES_PER_TOKEN  # kvpress's ThinK zeroes channels, frees nothing
    # The hooks are gone afterwards: a stock prefill keeps every token.
    _, full = generate(model, "full", ids)
    assert full == 300 * DENSE_BYTES_PER_TOKEN


# keep 1/4 of head_dim 16, but the 68 dense sink/window tokens and min/max summaries weigh in; the
# cache manager's pages also pad each row's 4 values to 8 (the kernels' row stride) and round the
# 332 packed rows of a stripe up to whole 4 KiB pages.
@pytest.mark.parametrize("cache,shrink", [("core", 1.5), ("manager", 1.2)])
def test_engine_serves_the_mosaickv_backend(tiny: tuple, cache: str, shrink: float) -> None:
    engine = HFEngine(
        "tiny-random",
        backend="mosaickv",
        backend_options={"method": "mosaic", "keep_ratio": "0.25", "cache": cache},
    )
    try:
        ids = prompt(400, seed=4)[0].tolist()
        ended: list[object] = []
        done = threading.Event()

        def sink(_rid: str, event: object) -> None:
            if isinstance(event, (Finished, Failed)):
                ended.append(event)
                done.set()

        request = GenerateRequest(
            "m", SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True), token_ids=ids
        )
        engine.submit(request, sink)
        assert done.wait(120)
        assert isinstance(ended[0], Finished), ended[0]
        assert ended[0].completion_tokens == 4
        assert 0 < ended[0].kv_bytes < 400 * DENSE_BYTES_PER_TOKEN / shrink
        assert engine.method == "mosaic"
    finally:
        engine.close()


def test_bad_backend_options_fail_clearly() -> None:
    with pytest.raises(MosaicError, match="unknown method 'mosiac'"):
        make_backend("mosaickv", {"method": "mosiac"})
    with pytest.raises(MosaicError, match="budget_ratio fits keep_ratio"):
        make_backend("mosaickv", {"method": "quest", "budget_ratio": "3"})
    with pytest.raises(ValueError, match="unknown kvpress press 'snap'"):
        make_method_backend("kvpress:snap", 3.0)
    with pytest.raises(ValueError, match="must be key=value"):
        make_method_backend("mosaic:keep_ratio", 3.0)


def test_perplexity_lossless_equals_full_and_compression_changes_it(tiny: tuple) -> None:
    model, tok = tiny
    wins = perplexity.windows(tok, 300, 16, 1)
    assert len(wins[0]) == 316
    values = {}
    for method in ("full", LOSSLESS, "mosaic:keep_ratio=0.125:token_ratio=0.25"):
        backend = make_method_backend(method, 3.0)
        with installed(backend, model):
            values[method] = perplexity.perplexity(model, backend, wins, 300)
    assert values[LOSSLESS] == pytest.approx(values["full"], rel=1e-4)
    assert values["mosaic:keep_ratio=0.125:token_ratio=0.25"] != pytest.approx(values["full"], rel=1e-3)


def test_runner_writes_the_result_json(tiny: tuple, tmp_path: object) -> None:
    out = tmp_path / "r.json"  # type: ignore[operator]
    rc = run.main(
        [
            "--model",
            "tiny-random",
            "--tasks",
            "niah_single_1",
            "--ctx",
            "400",
            "--samples",
            "1",
            "--methods",
            "full,mosaic:keep_ratio=0.25",
            "--json",
            str(out),
        ]
    )
    assert rc == 0
    data = json.loads(out.read_text())
    full, mosaic = data["methods"]["full"], data["methods"]["mosaic:keep_ratio=0.25"]
    tokens = data["prompt_tokens"]["niah_single_1"][0]
    assert full["full_kv_bytes"] == mosaic["full_kv_bytes"] == tokens * DENSE_BYTES_PER_TOKEN
    assert full["kv_bytes"] == full["full_kv_bytes"] and mosaic["kv_bytes"] < full["kv_bytes"]
    assert 0.0 <= mosaic["score"] <= 100.0 and set(mosaic["tasks"]) == {"niah_single_1"}
    assert len(mosaic["outputs"]["niah_single_1"]) == 1
