"""Where does MosaicKV need its bytes? One full-attention prefill per prompt, then many compression
configurations of the same prompt KV, each scored by greedy decoding and by the gold answer's
log-likelihood under teacher forcing.

Prefill is the same for every configuration (the mosaickv backend prefills with full attention and
encodes afterwards), so it runs once per prompt; each configuration only encodes and decodes. That
makes per-layer and K/V-split sweeps affordable on a CPU.

    .venv/bin/python bench/accuracy/budget_sweep.py --task niah_single_1 --ctx 4096 --samples 3 \
        --configs configs.json --json bench/results/budget_sweep.json

A configuration is {"name": str, "default": {params}, "layers": {"<i>": {params}}}: mosaic method
parameters for every layer, overridden per layer. Real bytes are summed over layers and compared
with the dense cache of the same prompt in the model's dtype.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from mosaickv.core import make_method
from mosaickv.engines.hf.backends import full_kv_bytes
from mosaickv.engines.hf.models import DEFAULT_MODEL, load_model
from mosaickv.engines.hf.mosaickv_backend import MosaicKVBackend, PackedCache
from mosaickv.eval import tasks
from mosaickv.eval.methods import installed
from mosaickv.eval.model import eos_ids, greedy_continue


@dataclass
class PromptKV:
    """One prompt's prefill: per layer the dense K/V [1, H_kv, T, D] and ThinK's query window."""

    sample: tasks.Sample
    ids: torch.Tensor
    logits: torch.Tensor
    layers: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]


@torch.inference_mode()
def prefill(model: Any, tok: Any, backend: MosaicKVBackend, sample: tasks.Sample) -> PromptKV:
    ids = torch.tensor([tok.encode(sample.prompt, add_special_tokens=False)])
    cache = backend.new_cache(model)
    logits = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1).logits[0, -1]
    layers = [(la.keys, la.values, la.q_window) for la in cache.layers]
    return PromptKV(sample, ids, logits, layers)


def cached_prefill(
    model: Any, tok: Any, backend: MosaicKVBackend, sample: tasks.Sample, kv_dir: Path | None, seed: int
) -> PromptKV:
    if kv_dir is None:
        return prefill(model, tok, backend, sample)
    path = kv_dir / f"{sample.task}-{sample.prompt_tokens}-{seed}-{sample.index}.pt"
    if path.exists():
        saved = torch.load(path)
        return PromptKV(sample, saved["ids"], saved["logits"], saved["layers"])
    kv = prefill(model, tok, backend, sample)
    kv_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"ids": kv.ids, "logits": kv.logits, "layers": kv.layers}, path)
    return kv


def encoded_cache(model: Any, kv: PromptKV, config: dict[str, Any]) -> PackedCache:
    cache = PackedCache(model.config.num_hidden_layers)
    default = config.get("default", {})
    per_layer = {int(i): p for i, p in config.get("layers", {}).items()}
    for i, layer in enumerate(cache.layers):
        k, v, q_window = kv.layers[i]
        layer.lazy_initialization(k, v)
        layer.keys, layer.values, layer.q_window = k, v, q_window
        override = per_layer.get(i, {})
        params = dict(override) if "method" in override else {**default, **override}  # a new method starts afresh
        layer.encode(make_method(params.pop("method", "mosaic"), **params))
    return cache


@torch.inference_mode()
def gold_nll(model: Any, tok: Any, cache: PackedCache, kv: PromptKV) -> float:
    """Mean negative log-likelihood of the first gold answer's tokens, fed one at a time."""
    gold = tok.encode(kv.sample.answers[0], add_special_tokens=False)
    logits, pos, total = kv.logits, kv.ids.shape[1], 0.0
    for j, t in enumerate(gold):
        total -= float(torch.log_softmax(logits.float(), -1)[t])
        if j == len(gold) - 1:
            break
        out = model(input_ids=torch.tensor([[t]]), position_ids=torch.tensor([[pos + j]]), cache=cache,
                    use_cache=True)
        logits = out.logits[0, -1]
    return total / len(gold)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--task", default="niah_single_1")
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--samples", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--configs", required=True, help="JSON file: a list of configurations")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--kv-dir", type=Path, help="keep each prompt's prefill here and reuse it on later runs")
    ap.add_argument("--json", required=True)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    configs = json.loads(Path(a.configs).read_text())
    model, tok = load_model(a.model, "cpu")
    eos = eos_ids(model, tok)
    samples = tasks.generate(a.task, a.samples, a.ctx, tok, seed=a.seed)
    backend = MosaicKVBackend({"method": "full"})
    rows: list[dict[str, Any]] = []
    with installed(backend, model):
        t0 = time.perf_counter()
        prompts = [cached_prefill(model, tok, backend, s, a.kv_dir, a.seed) for s in samples]
        print(f"prefill {len(prompts)} prompts: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        for config in configs:
            t0 = time.perf_counter()
            outs, nlls, kv_bytes, dense = [], [], 0, 0
            for kv in prompts:
                cache = encoded_cache(model, kv, config)
                scored = copy.deepcopy(cache)  # decoding appends to the cache: score the gold on a twin
                kv_bytes += sum(la.nbytes for la in cache.layers)
                dense += full_kv_bytes(model, kv.ids.shape[1])
                new = greedy_continue(model, cache, kv.logits, kv.ids.shape[1], kv.sample.max_new_tokens, eos)
                outs.append(tok.decode(new, skip_special_tokens=True))
                nlls.append(gold_nll(model, tok, scored, kv))
            row = {
                "name": config["name"],
                "score": tasks.score_task(outs, samples),
                "gold_nll": sum(nlls) / len(nlls),
                "x_less": dense / kv_bytes,
                "outputs": outs,
                "config": config,
                "s": time.perf_counter() - t0,
            }
            rows.append(row)
            print(f"{row['name']:<40} score {row['score']:5.1f} nll {row['gold_nll']:.3f} "
                  f"x{row['x_less']:.2f} {[o[:12] for o in outs]} ({row['s']:.0f} s)", flush=True)
            Path(a.json).write_text(json.dumps({
                "command": " ".join(sys.argv), "task": a.task, "ctx": a.ctx, "samples": a.samples,
                "answers": [s.answers for s in samples], "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
