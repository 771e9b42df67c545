"""Every method on the same inputs at the same real memory: output error, attention recall, bytes.

    .venv/bin/python bench/analysis/compare_methods.py [--synthetic-tokens 4096] [--model-tokens 3072]
        [--no-model] [--ratio 3] [--out bench/results/analysis_compare.json]

The memory target is full / ratio bytes. think, naive2d and mosaic get the largest keep ratio that
fits it (bytes are each cache's real `nbytes`); quest and full cannot shrink (quest only selects
tokens), so they are shown at their own size. JSON: one record per input and method.
"""

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from inputs import load_captured, smollm2, synthetic, to_device
from metrics import evaluate, match_memory
from mosaickv.core import make_method


def rows_for(x: dict[str, Any], ratio: float, common: dict[str, Any]) -> list[dict[str, Any]]:
    d = x["k"].shape[-1]
    full = make_method("full").encode(x["k"], x["v"])
    target = int(full.nbytes / ratio)
    every = list(range(1, d + 1))
    plan: list[tuple[str, str, dict[str, Any], list[int] | None]] = [
        ("full", "full", {}, None),
        ("quest", "quest", {**common, "token_ratio": 0.10}, None),
        ("think", "think", common, every),
        ("naive2d", "naive2d", {**common, "token_ratio": 0.10}, every),
        ("mosaic", "mosaic", {**common, "token_ratio": 0.10}, every),
        ("mosaic (all tokens)", "mosaic", {**common, "token_ratio": 1.0}, every),
    ]
    rows = []
    for label, name, params, keeps in plan:
        start = time.perf_counter()
        if keeps is None:
            method = make_method(name, **params)
            cache = method.encode(x["k"], x["v"], q_window=x["q_window"])
        else:
            method, cache = match_memory(name, params, x, target, keeps)
        seconds = time.perf_counter() - start
        result = evaluate(cache, x)
        keep = getattr(method, "keep_ratio", None)
        rows.append({"input": x["name"], "method": label, "keep_ratio": keep,
                     "token_ratio": method.token_ratio if method.compresses else 1.0,
                     "summary": method.summary if method.selects_blocks else None,
                     "full_over_bytes": full.nbytes / result["bytes"], "target_bytes": target,
                     "encode_seconds_incl_search": seconds, **result})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--synthetic-tokens", type=int, default=4096)
    parser.add_argument("--model-tokens", type=int, default=3072)
    parser.add_argument("--no-model", action="store_true", help="skip the SmolLM2 capture")
    parser.add_argument("--ratio", type=float, default=3.0, help="memory target = full bytes / ratio")
    parser.add_argument("--segment-len", type=int, default=4096)
    parser.add_argument("--model-kv", help="use a capture saved by inputs.py --capture instead of the model")
    parser.add_argument("--device", default="cpu", help="torch device for the caches (cpu or cuda)")
    parser.add_argument("--out", default="bench/results/analysis_compare.json")
    args = parser.parse_args()
    common = {"n_sink": 4, "window": 64, "block_size": 8, "segment_len": args.segment_len}
    torch_inputs = [synthetic(t=args.synthetic_tokens)]
    if args.model_kv:
        torch_inputs += load_captured(args.model_kv)
    elif not args.no_model:
        torch_inputs += smollm2(n_tokens=args.model_tokens)
    torch_inputs = [to_device(x, args.device) for x in torch_inputs]
    rows = []
    header = f"{'method':<20} {'keep':>6} {'tok':>5} {'rel.err':>8} {'recall':>7} {'bytes':>10} {'full/x':>6}"
    for x in torch_inputs:
        print(f"\n== {x['name']}  (target: full / {args.ratio})\n{header}")
        for row in rows_for(x, args.ratio, common):
            rows.append(row)
            keep = "-" if row["keep_ratio"] is None else f"{row['keep_ratio']:.3f}"
            print(f"{row['method']:<20} {keep:>6} {row['token_ratio']:>5.2f} {row['rel_error']:>8.4f} "
                  f"{row['recall']:>7.4f} {row['bytes']:>10} {row['full_over_bytes']:>6.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": {**common, "ratio": args.ratio, "device": args.device}, "rows": rows}, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
