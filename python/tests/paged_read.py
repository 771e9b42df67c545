"""Reads a layout's arrays through its page table on the host, by the addressing rule of
docs/KERNELS.md ("GPU layout"): row r of a paged array with P rows per page is at
pages[entry + r // P] + (r % P) * row_bytes. An independent mirror of what the kernels compute,
so the CPU tests check every address a GPU launch would read (CPU tensors only: the addresses are
dereferenced with ctypes)."""

import ctypes

import torch

from mosaickv.core import bitmap_words
from mosaickv.ops import STRIPE_COLS, DecodeLayout, round_up8

COL = {name: i for i, name in enumerate(STRIPE_COLS)}


def _read(address: int, n_bytes: int) -> torch.Tensor:
    return torch.frombuffer(bytearray((ctypes.c_char * n_bytes).from_address(address)), dtype=torch.uint8)


def _rows(pages: list[int], entry: int, per_page: int, first: int, n: int, row_bytes: int) -> torch.Tensor:
    out = [
        _read(pages[entry + (first + r) // per_page] + ((first + r) % per_page) * row_bytes, row_bytes)
        for r in range(n)
    ]
    return torch.stack(out) if out else torch.empty(0, row_bytes, dtype=torch.uint8)


def stripe_side(
    lay: DecodeLayout, s: int, side: str, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Values [S, keep] and bitmap words [S, W] int32 of stripe s, side "k" or "v"."""
    row, pages = lay.stripes[s].tolist(), lay.pages.tolist()
    keep, g, n = row[COL[f"keep_{side}"]], row[COL[f"group_{side}"]], row[COL["tokens"]]
    w, elem = bitmap_words(lay.head_dim, g), torch.empty(0, dtype=dtype).element_size()
    per = row[COL[f"{side}_rows"]]
    bits = _rows(pages, row[COL[f"{side}_bits"]], per, 0, n, 4 * w).view(torch.int32)
    vals = _rows(pages, row[COL[f"{side}_vals"]], per, 0, n, round_up8(keep) * elem).view(dtype)
    return vals[:, :keep], bits


def stripe_summary(lay: DecodeLayout, s: int, dtype: torch.dtype) -> torch.Tensor:
    """[n_blocks, width] block summaries of stripe s."""
    row = lay.stripes[s].tolist()
    nb = -(-row[COL["tokens"]] // lay.block)
    elem = torch.empty(0, dtype=dtype).element_size()
    rows = _rows(lay.pages.tolist(), row[COL["sum_pages"]], row[COL["sum_rows"]], row[COL["sum_first"]], nb,
                 lay.summary_width * elem)  # fmt: skip
    return rows.view(dtype)


def stripe_rotation(lay: DecodeLayout, s: int, side: str) -> torch.Tensor:
    """[D, D] float32 R_K (side "k") or R_V of stripe s."""
    row, d = lay.stripes[s].tolist(), lay.head_dim
    first = row[COL[f"rot_first_{side}"]]
    return _rows(lay.pages.tolist(), row[COL["rot_pages"]], row[COL["rot_rows"]], first, d, 4 * d).view(
        torch.float32
    )


def dense_rows(lay: DecodeLayout, b: int, side: str) -> torch.Tensor:
    """[H_kv, cap, D] sinks + window rows of sequence b, K (side "k") or V: at the addresses in
    ``dense_rows`` when the layout has them, else in the stacked ``dense_k``/``dense_v``."""
    stacked = lay.dense_k if side == "k" else lay.dense_v
    if lay.dense_rows is None:
        return stacked[b]
    shape, dtype = stacked.shape[1:], stacked.dtype
    n_bytes = shape.numel() * stacked.element_size()
    return _read(int(lay.dense_rows[0 if side == "k" else 1, b]), n_bytes).view(dtype).view(shape)
