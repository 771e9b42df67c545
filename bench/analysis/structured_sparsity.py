"""Would K and V layouts that the tensor cores read without expansion cost accuracy? (docs/KERNELS.md, targets)

The packed attention spends most of its instructions expanding K and V rows. `mma.sp` reads an
operand whose reduction axis keeps 2 of every 4 elements, given 2-bit indices, with no expansion.
For S = Q K^T the reduction runs over K's channels; for o = P V over tokens, so a V that `mma.sp`
could read keeps, per channel, 2 of every 4 consecutive tokens. Keeping 2 of 4 within the leading
D / 2 rotated channels keeps D / 4 values per vector, today's count (keep ratio 0.25). This script
compares selections by the attention output error over all tokens (no token selection).

K study (V kept exact, then at today's top-D/4):

- top-r: today's format, the r = D / 4 rotated elements of largest magnitude (g = 1);
- 2:4 lead: 2 of every 4 consecutive rotated channels within the leading D / 2 (r values);
- 2:4 lead strided: the same within groups of channels D / 8 apart, each group mixing energy ranks;
- top-r lead: the r largest within the leading D / 2 (truncation, unstructured; r values);
- 2:4 all (and strided): 2 of every 4 over all D channels (2r values: twice the bytes, a reference).

V study (K kept exact): today's top-r; 2 of every 4 consecutive tokens per channel within the
leading D / 2 (D / 4 values per vector on average); the same over all D (D / 2, a reference).

Both studies also take the layout that needs no expansion at all: each block of 16 tokens (one
attention chunk) shares one set of channels, the r (then 2r) of largest energy over the block, so a
block's K and V are dense [16, r] tiles the tensor cores read as they are, with q' gathered and the
output scattered once per block instead of once per token.

Rotation: one per head from the whole input's second moment (mosaic's rotation, one segment).

    .venv/bin/python bench/analysis/structured_sparsity.py [--no-model] \
        [--out bench/results/analysis_structured_sparsity.json]
"""

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))

from inputs import smollm2, synthetic
from metrics import full_attention
from mosaickv.core.rotation import rotation_from_moment

# A selection: rotated vectors [T, H, D] -> the mask of the elements kept, same shape.
Selection = Callable[[torch.Tensor], torch.Tensor]


def top_mask(x: torch.Tensor, r: int) -> torch.Tensor:
    """The r elements of largest magnitude per vector (last axis)."""
    idx = x.abs().topk(r, dim=-1).indices
    return torch.zeros_like(x, dtype=torch.bool).scatter_(-1, idx, True)


def two_of_four(x: torch.Tensor) -> torch.Tensor:
    """2 of every 4 consecutive elements (largest magnitude) along the last axis."""
    groups = x.reshape(*x.shape[:-1], -1, 4)
    return top_mask(groups, 2).reshape(x.shape)


def two_of_four_strided(x: torch.Tensor) -> torch.Tensor:
    """2 of 4 within groups {c, c + n/4, c + n/2, c + 3n/4} (n channels): each group mixes channels of
    every energy rank, as a fixed channel permutation before the 2:4 layout would."""
    n = x.shape[-1]
    # [..., n / 4 groups, 4]
    strided = x.reshape(*x.shape[:-1], 4, n // 4).transpose(-1, -2)
    return top_mask(strided, 2).transpose(-1, -2).reshape(x.shape)


def leading(select: Selection) -> Selection:
    """select applied to the leading half of the channels; the rest dropped."""

    def run(x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        mask = torch.zeros_like(x, dtype=torch.bool)
        mask[..., :half] = select(x[..., :half])
        return mask

    return run


def block_top(r: int, block: int = 16) -> Selection:
    """Per block of `block` consecutive tokens, the r channels of largest energy over the block, kept
    for each of its tokens: x [T, H, D], T % block == 0."""

    def run(x: torch.Tensor) -> torch.Tensor:
        t, h, d = x.shape
        energy = x.reshape(t // block, block, h, d).square().sum(1)
        return top_mask(energy, r).repeat_interleave(block, 0)

    return run


def two_of_four_tokens(x: torch.Tensor) -> torch.Tensor:
    """Per channel, 2 of every 4 consecutive tokens (largest magnitude): x [T, H, D], T % 4 == 0."""
    t, h, d = x.shape
    return two_of_four(x.permute(1, 2, 0)).permute(2, 0, 1).reshape(t, h, d)


def v_selections(d: int) -> dict[str, Selection]:
    return {
        "top-r": lambda x: top_mask(x, d // 4),
        "2:4 tokens lead": leading(two_of_four_tokens),
        "2:4 tokens all": two_of_four_tokens,
        "block16 top-r": block_top(d // 4),
        "block16 top-2r": block_top(d // 2),
    }


def selections(d: int) -> dict[str, Selection]:
    r = d // 4
    return {
        "top-r": lambda x: top_mask(x, r),
        "2:4 lead": leading(two_of_four),
        "2:4 lead strided": leading(two_of_four_strided),
        "top-r lead": leading(lambda x: top_mask(x, r)),
        "2:4 all": two_of_four,
        "2:4 all strided": two_of_four_strided,
        "block16 top-r": block_top(r),
        "block16 top-2r": block_top(2 * r),
    }


def rotated(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, H, D] -> (its rotations [H, D, D], x rotated per head [T, H, D])."""
    xf = x.float()
    rot = rotation_from_moment(torch.einsum("thd,the->hde", xf, xf) / x.shape[0])
    return rot, torch.einsum("hij,thj->thi", rot, xf)


def kept(rot: torch.Tensor, xr: torch.Tensor, select: Selection) -> torch.Tensor:
    """The selection's elements of the rotated xr kept, rotated back by rot."""
    return torch.einsum("hij,thi->thj", rot, xr * select(xr))


def output_error(
    k: torch.Tensor, v: torch.Tensor, x: dict[str, Any], refs: list[torch.Tensor]
) -> float:
    """Mean over the input's decode queries of ||o - o_full|| / ||o_full||, all tokens attended;
    refs: o_full per query (full_attention over the uncompressed cache)."""
    errors = []
    for q, ref in zip(x["queries"], refs, strict=True):
        out, _ = full_attention(k, v, q)
        errors.append(float((out - ref).norm() / ref.norm()))
    return sum(errors) / len(errors)


def study(
    x: dict[str, Any],
    side: str,
    rot: tuple[torch.Tensor, torch.Tensor],
    chosen: dict[str, Selection],
    errors: dict[str, Callable[[torch.Tensor], float]],
) -> list[dict[str, Any]]:
    """One row per selection of `side` ("K" or "V"; rot: its rotated()): the values kept per vector
    and each error of `errors` (name -> error of the attention with that side compressed)."""
    rows = []
    for name, select in chosen.items():
        compressed = kept(*rot, select)
        row = {
            "input": x["name"],
            "side": side,
            "selection": name,
            "values_per_vector": float(select(rot[1]).float().sum(-1).mean()),
            **{label: error(compressed) for label, error in errors.items()},
        }
        rows.append(row)
        measured = "  ".join(f"{label} {row[label]:.4f}" for label in errors)
        print(
            f"{x['name'][:44]:<44} {side} {name:<16} values {row['values_per_vector']:>5.1f}  {measured}",
            flush=True,
        )
    return rows


def analyse(x: dict[str, Any]) -> list[dict[str, Any]]:
    """Both studies on one input: K's selections (V exact, then at today's top-r), then V's (K exact)."""
    d = x["k"].shape[-1]
    k, v = x["k"].float(), x["v"].float()
    refs = [full_attention(x["k"], x["v"], q)[0] for q in x["queries"]]
    k_rot, v_rot = rotated(x["k"]), rotated(x["v"])
    v_top = kept(*v_rot, v_selections(d)["top-r"])
    k_errors = {
        "error_v_exact": lambda ks: output_error(ks, v, x, refs),
        "error_v_top_r": lambda ks: output_error(ks, v_top, x, refs),
    }
    v_errors = {"error_k_exact": lambda vs: output_error(k, vs, x, refs)}
    return study(x, "K", k_rot, selections(d), k_errors) + study(
        x, "V", v_rot, v_selections(d), v_errors
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--no-model", action="store_true")
    parser.add_argument(
        "--out", default="bench/results/analysis_structured_sparsity.json"
    )
    args = parser.parse_args()
    inputs = [synthetic(t=4096)] + ([] if args.no_model else smollm2(n_tokens=3072))
    rows = [row for x in inputs for row in analyse(x)]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
