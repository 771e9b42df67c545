"""Standalone accuracy runner: one workload (tasks x samples at one context) over several methods.

    python -m mosaickv.eval.run --tasks niah_single_1,vt --ctx 2048 --samples 4 \
        --methods full,mosaic,naive2d,kvpress:snapkv --budget-ratio 3 --json out.json

Every method sees the same prompts. ``kv_bytes``: real bytes of the cache at the end of prefill (the
tensors it holds), averaged over samples; ``full_kv_bytes``: the same prompts uncompressed, in the
model's dtype. ``--ppl-ctx N`` adds perplexity on the shipped essay beyond N compressed tokens.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel

from mosaickv.engines.hf.backends import full_kv_bytes
from mosaickv.engines.hf.models import DEFAULT_MODEL, load_model
from mosaickv.eval import perplexity as ppl_mod
from mosaickv.eval import tasks
from mosaickv.eval.methods import installed, make_method_backend, prefill
from mosaickv.eval.model import eos_ids, greedy_continue


@dataclass
class MethodResult:
    """What the JSON holds per method. score and tasks are 0-100; bytes are averages per sample."""

    score: float = 0.0
    tasks: dict[str, float] = field(default_factory=dict)
    kv_bytes: float = 0.0
    full_kv_bytes: float = 0.0
    prefill_s: float = 0.0
    decode_ms_per_token: float = 0.0
    keep_ratio: float | None = None
    ppl: float | None = None
    outputs: dict[str, list[str]] = field(default_factory=dict)


def run(
    model: PreTrainedModel,
    tokenizer: object,
    samples: dict[str, list[tasks.Sample]],
    methods: Sequence[str],
    budget_ratio: float,
    progress: Callable[[int, int, str], None] | None = None,
    ppl_windows: list[list[int]] | None = None,
    ppl_ctx: int = 0,
) -> dict[str, MethodResult]:
    """Score every method on the same samples (task -> samples). progress(done, total, label)."""
    backends = {m: make_method_backend(m, budget_ratio) for m in methods}  # bad names fail before any run
    eos = eos_ids(model, tokenizer)
    n = sum(len(s) for s in samples.values())
    total = len(methods) * (n + (1 if ppl_windows else 0))
    done = 0
    results: dict[str, MethodResult] = {}
    for method, backend in backends.items():
        r = MethodResult()
        kv = full_kv = 0
        pre_s = dec_s = 0.0
        dec_n = 0
        ratios: list[float] = []
        with installed(backend, model):
            for task, task_samples in samples.items():
                outs = []
                for s in task_samples:
                    ids = torch.tensor(
                        [tokenizer.encode(s.prompt, add_special_tokens=False)], device=model.device
                    )  # type: ignore[attr-defined]
                    t0 = time.perf_counter()
                    p = prefill(model, backend, ids)
                    t1 = time.perf_counter()
                    try:
                        new = greedy_continue(model, p.cache, p.logits, ids.shape[1], s.max_new_tokens, eos)
                    finally:
                        backend.release_cache(p.cache)
                    t2 = time.perf_counter()
                    outs.append(tokenizer.decode(new, skip_special_tokens=True))  # type: ignore[attr-defined]
                    kv += p.kv_bytes
                    full_kv += full_kv_bytes(model, ids.shape[1])
                    pre_s += t1 - t0
                    dec_s += t2 - t1
                    dec_n += max(1, len(new))
                    keep = getattr(backend, "last_keep_ratio", None)
                    if keep is not None:
                        ratios.append(keep)
                    done += 1
                    if progress:
                        progress(done, total, f"{method} {task}")
                r.tasks[task] = tasks.score_task(outs, task_samples)
                r.outputs[task] = outs
            if ppl_windows:
                r.ppl = ppl_mod.perplexity(model, backend, ppl_windows, ppl_ctx)
                done += 1
                if progress:
                    progress(done, total, f"{method} perplexity")
        r.score = sum(r.tasks.values()) / len(r.tasks)
        r.kv_bytes, r.full_kv_bytes = kv / n, full_kv / n
        r.prefill_s, r.decode_ms_per_token = pre_s / n, 1000 * dec_s / dec_n
        r.keep_ratio = sum(ratios) / len(ratios) if ratios else None
        results[method] = r
    return results


def _bar(done: int, total: int, label: str) -> None:
    width = 30
    fill = width * done // total
    sys.stderr.write(f"\r[{'#' * fill}{'.' * (width - fill)}] {done}/{total} {label:<40}")
    if done == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def table(results: dict[str, MethodResult], task_names: Sequence[str]) -> str:
    """The printed table: score, real KV MiB, reduction vs full, per-task scores, perplexity."""
    lines = [
        f"{'method':<22}{'score':>7}{'KV MiB':>9}{'x less':>8}{'ppl':>8}  "
        + "".join(f"{t[:14]:>15}" for t in task_names)
    ]
    for m, r in results.items():
        ratio = r.full_kv_bytes / r.kv_bytes if r.kv_bytes else float("nan")
        ppl = f"{r.ppl:>8.2f}" if r.ppl is not None else f"{'-':>8}"
        lines.append(
            f"{m:<22}{r.score:>7.1f}{r.kv_bytes / 2**20:>9.2f}{ratio:>8.2f}{ppl}  "
            + "".join(f"{r.tasks[t]:>15.1f}" for t in task_names)
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mosaickv.eval.run", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL, help="hf engine model name or HF directory")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tasks", default="niah_single_1,niah_multikey_2,vt", help=f"of {','.join(tasks.TASKS)}")
    ap.add_argument("--ctx", type=int, default=2048, help="target prompt + answer length in tokens")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", default="full,mosaic,naive2d")
    ap.add_argument("--budget-ratio", type=float, default=3.0, help="dense KV bytes / method's real bytes")
    ap.add_argument("--no-chat", action="store_true", help="raw prompts (base models)")
    ap.add_argument("--ppl-ctx", type=int, default=0, help="perplexity beyond this many compressed tokens")
    ap.add_argument("--ppl-cont", type=int, default=64, help="scored continuation tokens per window")
    ap.add_argument("--ppl-windows", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--json", default=None, help="write the result here")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    model, tok = load_model(a.model, a.device)
    load_s = time.perf_counter() - t0
    task_names = [t for t in a.tasks.split(",") if t]
    samples = {
        t: tasks.generate(t, a.samples, a.ctx, tok, seed=a.seed, chat=not a.no_chat) for t in task_names
    }
    wins = ppl_mod.windows(tok, a.ppl_ctx, a.ppl_cont, a.ppl_windows) if a.ppl_ctx else None
    methods = [m for m in a.methods.split(",") if m]
    for m in methods:
        make_method_backend(m, a.budget_ratio)  # a bad method name fails before any long run
    results: dict[str, MethodResult] = {}
    for m in methods:  # one method at a time, the JSON rewritten after each: a long run keeps its part
        results.update(run(model, tok, samples, [m], a.budget_ratio, _bar, wins, a.ppl_ctx))
        if a.json:
            out = {
                "command": "python -m mosaickv.eval.run " + " ".join(sys.argv[1:] if argv is None else argv),
                "model": a.model,
                "dtype": str(model.dtype),
                "ctx": a.ctx,
                "samples": a.samples,
                "seed": a.seed,
                "budget_ratio": a.budget_ratio,
                "prompt_tokens": {t: [s.prompt_tokens for s in ss] for t, ss in samples.items()},
                "ppl": {"ctx": a.ppl_ctx, "cont": a.ppl_cont, "windows": a.ppl_windows} if wins else None,
                "load_s": load_s,
                "torch": torch.__version__,
                "methods": {k: vars(r) for k, r in results.items()},
            }
            with open(a.json, "w") as f:
                json.dump(out, f, indent=1)
    print(table(results, task_names))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
