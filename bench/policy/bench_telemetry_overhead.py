"""Overhead of online telemetry in the hf mosaickv backend: one request (a prompt of the shipped essay,
then greedy decode steps) with telemetry off, then with ``telemetry_every=1`` (prefill curves) and
``recall_every=K`` (decode recall), on one CPU thread; off and on alternate ``--repeats`` times (the
box is shared: alternating spreads its load over both). Writes JSON to stdout.

    .venv/bin/python bench/policy/bench_telemetry_overhead.py --model smollm2-135m --tokens 1024 \\
        --steps 16 --recall-every 4 > bench/policy/telemetry_overhead_smollm2_1k.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

import torch
from mosaickv.engines.hf.models import load_model
from mosaickv.engines.hf.mosaickv_backend import MosaicKVBackend
from mosaickv.eval.methods import installed
from mosaickv.policy import sample_text


@torch.inference_mode()
def run(model: Any, ids: torch.Tensor, steps: int, options: dict[str, str]) -> dict[str, Any]:
    """Prefill + ``steps`` greedy decode steps through the backend: wall times and the messages."""
    backend = MosaicKVBackend(options)
    messages: list[dict[str, Any]] = []
    backend.telemetry_sink = messages.append
    with installed(backend, model):
        cache = backend.new_cache(model)
        start = time.perf_counter()
        logits = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1).logits
        backend.end_prefill(cache)  # where the prefill's curves are measured
        prefill_s = time.perf_counter() - start
        step_s = []
        for _ in range(steps):
            token = logits[:, -1].argmax(-1, keepdim=True)
            start = time.perf_counter()
            logits = model(input_ids=token, cache=cache, use_cache=True).logits
            step_s.append(time.perf_counter() - start)
        backend.release_cache(cache)
    return {"prefill_s": prefill_s, "step_s": step_s, "messages": messages}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--recall-every", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(1)  # the shared 2-core box, as the other policy numbers
    model, tokenizer = load_model(args.model)
    ids = tokenizer(sample_text(), return_tensors="pt").input_ids[:, : args.tokens]
    run(model, ids[:, :64], 2, {})  # warm-up: first-call allocations and lazy imports
    offs, ons = [], []
    for _ in range(args.repeats):
        offs.append(run(model, ids, args.steps, {}))
        ons.append(run(model, ids, args.steps, {"telemetry_every": "1", "recall_every": str(args.recall_every)}))
    off_steps = [s for r in offs for s in r["step_s"]]
    sampled = [s for r in ons for i, s in enumerate(r["step_s"]) if i % args.recall_every == 0]
    unsampled = [s for r in ons for i, s in enumerate(r["step_s"]) if i % args.recall_every != 0]
    messages = [m for r in ons for m in r["messages"]]
    telemetry = [m for m in messages if m.get("type", "telemetry") == "telemetry"]  # the hf sink omits it
    recall = [m for m in messages if m.get("type") == "recall"]
    out = {
        "model": args.model,
        "tokens": int(ids.shape[1]),
        "backend": "hf mosaickv, method mosaic, default options (cache manager, keep 0.25, token ratio 0.1)",
        "threads": 1,
        "repeats": args.repeats,
        "prefill_s_off": [round(r["prefill_s"], 3) for r in offs],
        "prefill_s_on": [round(r["prefill_s"], 3) for r in ons],
        "telemetry_overhead_s": [round(m["overhead_s"], 3) for m in telemetry],
        "decode_step_s_off_median": round(statistics.median(off_steps), 4),
        "decode_step_s_unsampled_median": round(statistics.median(unsampled), 4),
        "decode_step_s_sampled_median": round(statistics.median(sampled), 4),
        "recall_overhead_s_median": round(statistics.median(m["overhead_s"] for m in recall), 4),
        "recall_every": args.recall_every,
        "recall_messages": len(recall),
        "recall_heads": len(recall[0]["heads"]),
        "recall_mean_at_token_ratios": dict(zip(
            map(str, recall[0]["token_ratios"]),
            (round(statistics.mean(h["recall"][i] for m in recall for h in m["heads"]), 4)
             for i in range(len(recall[0]["token_ratios"]))), strict=True)),
    }
    json.dump(out, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
