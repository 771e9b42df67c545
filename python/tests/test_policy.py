"""Planner telemetry (mosaickv.policy): energy-loss curves against an independent SVD oracle, and the
telemetry JSON of a real model (tiny-random: real Llama blocks, fast) in the shape the planner reads."""

import json

import pytest
import torch

from mosaickv.core import make_method
from mosaickv.engines.hf.models import load_model
from mosaickv.policy import (
    PLAN_KEEP_RATIOS,
    attention_losses,
    check_policy,
    decode_recall,
    decompressed,
    head_losses,
    layer_params,
    main,
    sample_text,
    telemetry,
)


def svd_losses(x: torch.Tensor, keeps: list[int]) -> list[float]:
    """Oracle: rotate by the right singular vectors (same basis as the eigenvectors of x^T x, found by a
    different algorithm), keep each row's top-k squared elements, report the energy dropped."""
    _, _, vh = torch.linalg.svd(x.double(), full_matrices=False)
    e = (x.double() @ vh.T).pow(2).sort(dim=1, descending=True).values
    total = float(e.sum())
    return [1.0 - float(e[:, :k].sum()) / total for k in keeps]


def test_losses_match_the_svd_oracle_per_head():
    gen = torch.Generator().manual_seed(0)
    d, t = 32, 300
    # Head 0: anisotropic (a few strong directions, in a random basis); head 1: isotropic noise.
    basis = torch.linalg.qr(torch.randn(d, d, generator=gen)).Q
    scales = torch.logspace(1, -2, d)
    x = torch.stack([(torch.randn(t, d, generator=gen) * scales) @ basis.T, torch.randn(t, d, generator=gen)])
    got = head_losses(x)
    assert got.shape == (2, len(PLAN_KEEP_RATIOS))
    keeps = [max(1, round(r * d)) for r in PLAN_KEEP_RATIOS]
    for h in range(2):
        want = torch.tensor(svd_losses(x[h], keeps), dtype=torch.float64)
        torch.testing.assert_close(got[h], want, atol=1e-6, rtol=0)
    # The rotation is what makes the anisotropic head cheap: far less lost than isotropic noise.
    assert float(got[0, 1]) < 0.2 * float(got[1, 1])


def test_low_rank_head_loses_nothing_once_its_rank_is_kept():
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(200, 2, generator=gen) @ torch.randn(2, 32, generator=gen)).unsqueeze(0)  # rank 2
    losses = head_losses(x, (1 / 32, 2 / 32, 0.5))
    assert float(losses[0, 0]) > 1e-3
    assert float(losses[0, 1]) < 1e-9 and float(losses[0, 2]) < 1e-9


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match=r"\[H_kv, T, D\] with T >= 1"):
        head_losses(torch.zeros(2, 0, 16))
    with pytest.raises(ValueError, match="must be \\[H_kv"):
        head_losses(torch.zeros(16, 16))


def test_telemetry_of_a_real_model_has_the_planners_shape():
    model, tokenizer = load_model("tiny-random")
    out = telemetry(model, tokenizer, "tiny-random", sample_text(), tokens=128)
    assert {k: out[k] for k in ("nLayers", "nKvHeads", "headDim", "dtype", "tokens")} == {
        "nLayers": 2,
        "nKvHeads": 2,
        "headDim": 16,
        "dtype": "float32",
        "tokens": 128,
    }
    assert sorted((c["layer"], c["head"]) for c in out["curves"]) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for c in out["curves"]:
        assert len(c["loss"]) == len(PLAN_KEEP_RATIOS)
        assert all(0.0 <= a <= 1.0 for a in c["loss"])
        assert all(a >= b for a, b in zip(c["loss"], c["loss"][1:], strict=False))  # more kept, less lost
    assert out["overheadS"] >= 0 and out["prefillS"] > 0
    json.dumps(out)  # the planner reads it as JSON


def test_entry_point_prints_the_shape(capsys):
    assert main(["--model", "tiny-random", "--shape"]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "model": "tiny-random",
        "nLayers": 2,
        "nKvHeads": 2,
        "headDim": 16,
        "dtype": "float32",
    }


def _heads(*keys: tuple[int, int]) -> list[dict[str, float]]:
    return [
        {"layer": la, "head": he, "keep_ratio": 0.25, "token_ratio": 0.1, "loss_threshold": 0.1}
        for la, he in keys
    ]


def test_check_policy_needs_every_layer_and_head_exactly_once():
    full = [(la, he) for la in range(3) for he in range(2)]
    check_policy(_heads(*full), 3, 2)  # complete: accepted
    with pytest.raises(ValueError, match="covers 5 of the model's 3 x 2"):
        check_policy(_heads(*full[:5]), 3, 2)
    with pytest.raises(ValueError, match="layer 0 head 1 appears twice"):
        check_policy(_heads(*full, (0, 1)), 3, 2)
    with pytest.raises(ValueError, match=r"layer 3 head 0 is outside the model \(3 layers x 2 KV heads\)"):
        check_policy(_heads(*full[:5], (3, 0)), 3, 2)


def test_layer_params_gives_each_head_its_keep_ratio():
    heads = [
        {"layer": layer, "head": h, "keep_ratio": 0.125 * (1 + h + layer), "token_ratio": 0.1}
        for layer in range(2)
        for h in range(3)
    ]
    params = layer_params(heads[::-1], 2, 3)  # order of the heads on the wire does not matter
    assert params[0]["head_keep_ratios"] == (0.125, 0.25, 0.375)
    assert params[1]["head_keep_ratios"] == (0.25, 0.375, 0.5)
    assert params[1]["token_ratio"] == 0.1
    heads[4]["token_ratio"] = 0.2
    with pytest.raises(ValueError, match="layer 1 asks for different token ratios"):
        layer_params(heads, 2, 3)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Plain softmax attention, [w, H_q, D] over [T, H_kv, D] (GQA by repeat), float64: the oracle."""
    g = q.shape[1] // k.shape[1]
    kk, vv = k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
    p = torch.softmax(torch.einsum("whd,thd->hwt", q.double(), kk) * q.shape[2] ** -0.5, -1)
    return torch.einsum("hwt,thd->whd", p, vv)


def test_attention_losses_follow_the_output_error():
    torch.manual_seed(0)
    t, h, g, d = 300, 2, 3, 16
    k, v = torch.randn(t, h, d), torch.randn(t, h, d)
    q = torch.randn(8, h * g, d) * 2
    losses = attention_losses(k, v, q, (0.25, 1.0), n_sink=4, window=16, segment_len=128)
    assert losses.shape == (h, 2)
    assert losses[:, 1].max() < 1e-10  # keeping every element reproduces attention exactly
    assert (losses[:, 0] > 1e-3).all()
    # The loss at keep 0.25 is the relative squared output error of dense attention over what the
    # cache holds; recompute it from the decompressed cache with an independent float64 attention.
    cache = make_method(
        "mosaic", keep_ratio=0.25, token_ratio=1.0, n_sink=4, window=16, segment_len=128
    ).encode(k, v)
    k_hat, v_hat = decompressed(cache)
    exact, approx = _attention(q, k, v), _attention(q, k_hat, v_hat)
    err = (approx - exact).pow(2).view(8, h, g, d).sum((0, 2, 3)) / exact.pow(2).view(8, h, g, d).sum(
        (0, 2, 3)
    )
    torch.testing.assert_close(losses[:, 0], err, rtol=1e-3, atol=1e-6)
    # And the decompressed cache is what packed attention reads: its own path agrees with the oracle.
    torch.testing.assert_close(cache.attend(q[0]).double(), approx[0], rtol=1e-4, atol=1e-5)


def _selected_positions(cache, q: torch.Tensor) -> torch.Tensor:
    """[H_kv, T] bool: sinks, tail and the rows of the blocks ``select_blocks`` names (block ids ->
    token rows by hand, independently of ``attended_mask``)."""
    b = cache.method.block_size
    mask = torch.zeros(cache.n_kv_heads, cache.length, dtype=torch.bool)
    mask[:, : cache.sink_k.shape[0]] = True
    mask[:, cache.length - cache.tail_k.shape[0] :] = True
    selected = cache.select_blocks(q)
    for seg, off in zip(cache.segments, cache.block_offsets, strict=True):
        for h in range(cache.n_kv_heads):
            for block in selected[h].tolist():
                if off <= block < off + -(-seg.length // b):
                    lo = seg.start + (block - off) * b
                    mask[h, lo : min(lo + b, seg.start + seg.length)] = True
    return mask


def test_decode_recall_is_the_full_attention_mass_on_the_selected_blocks():
    torch.manual_seed(0)
    t, h, g, d = 300, 2, 3, 16
    k, v = torch.randn(t, h, d), torch.randn(t, h, d)
    q = torch.randn(h * g, d) * 2
    # keep_ratio 1: the decompressed keys are the original ones, so the oracle can use k itself
    cache = make_method(
        "mosaic", keep_ratio=1.0, token_ratio=0.1, block_size=8, n_sink=4, window=16, segment_len=64
    ).encode(k, v)
    got = decode_recall(cache, q, token_ratios=(0.1, 0.3, 0.9))
    assert got.shape == (h, 3)
    p = torch.softmax(torch.einsum("hgd,thd->hgt", q.double().view(h, g, d), k.double()) * d**-0.5, -1)
    want = (p * _selected_positions(cache, q)[:, None]).sum(-1).mean(-1)  # the decode's own selection (0.1)
    torch.testing.assert_close(got[:, 0], want, rtol=1e-4, atol=1e-5)
    # more blocks, more mass; at 0.1 random keys leave most of it outside the selection
    assert (got[:, 1] >= got[:, 0]).all() and (got[:, 2] >= got[:, 1]).all()
    assert (got[:, 0] < 0.6).all() and (got[:, 2] > 0.85).all()


def test_decode_recall_sees_a_key_the_query_points_at():
    torch.manual_seed(1)
    t, h, d = 400, 1, 16
    k, v = torch.randn(t, h, d) * 0.1, torch.randn(t, h, d)
    q = torch.randn(2, d)
    k[200] = q.mean(0) * 6  # one key in the middle carries almost all the mass
    cache = make_method(
        "mosaic", keep_ratio=1.0, token_ratio=0.05, block_size=8, n_sink=4, window=16, segment_len=128
    ).encode(k, v)
    assert decode_recall(cache, q, token_ratios=(0.05,))[0, 0] > 0.9  # its block is selected
    with pytest.raises(ValueError, match="selects blocks"):
        decode_recall(make_method("mosaic", token_ratio=1.0, segment_len=64).encode(k, v), q)
