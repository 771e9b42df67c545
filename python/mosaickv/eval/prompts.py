"""Task samples as JSON for other processes (the TypeScript ``mosaickv ab``), token ids included.

    python -m mosaickv.eval.prompts --model smollm2-135m --tasks niah_single_1,vt --ctx 1024 --samples 2

Prints {"samples": [{task, index, token_ids, answers, max_new_tokens, prompt_tokens, depths}]}.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from mosaickv.engines.hf.models import MODELS, smollm2_tokenizer
from mosaickv.eval import tasks


def tokenizer_for(model: str) -> object:
    """The tokenizer the hf engine uses for `model` (registered models share SmolLM2's)."""
    if model in MODELS:
        return smollm2_tokenizer()
    if Path(model).is_dir():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(model, local_files_only=True)
    raise ValueError(f"unknown model {model!r}: use one of {', '.join(MODELS)} or a local model directory")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mosaickv.eval.prompts", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tasks", required=True, help=f"comma-separated, of {','.join(tasks.TASKS)}")
    ap.add_argument("--ctx", type=int, required=True)
    ap.add_argument("--samples", type=int, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-chat", action="store_true")
    a = ap.parse_args(argv)
    tok = tokenizer_for(a.model)
    out = []
    for task in [t for t in a.tasks.split(",") if t]:
        for s in tasks.generate(task, a.samples, a.ctx, tok, seed=a.seed, chat=not a.no_chat):
            ids = tok.encode(s.prompt, add_special_tokens=False)  # type: ignore[attr-defined]
            out.append(
                {
                    "task": s.task,
                    "index": s.index,
                    "token_ids": ids,
                    "answers": list(s.answers),
                    "max_new_tokens": s.max_new_tokens,
                    "prompt_tokens": s.prompt_tokens,
                    "depths": list(s.depths),
                }
            )
    json.dump({"samples": out}, sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
