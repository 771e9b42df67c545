"""Quest: query-aware token selection only; K and V stay dense."""

from typing import Any, ClassVar

import torch

from mosaickv.core.base import CompressionMethod
from mosaickv.core.segment import PackedSide, Segment


def dense_side(x: torch.Tensor) -> PackedSide:
    """x: [S, H_kv, D] -> a dense side (per head [S, D], own contiguous storage)."""
    heads = [x[:, h].clone(memory_format=torch.contiguous_format) for h in range(x.shape[1])]
    return PackedSide(heads, x.shape[2], [1] * x.shape[1])


class QuestMethod(CompressionMethod):
    """Quest (Tang et al., ICML 2024, arXiv 2406.10774): per-block min/max key bounds score an upper
    bound of q.k; the top blocks are attended. Same block size and ratio knobs as mosaic."""

    name: ClassVar[str] = "quest"

    def __init__(self, **params: Any) -> None:
        params.setdefault("summary", "minmax")
        super().__init__(**params)

    def _encode_segment(self, k: torch.Tensor, v: torch.Tensor, state: Any, from_pending: bool) -> Segment:
        summary = self._summarise(k.float().transpose(0, 1), k.dtype)
        return Segment(0, k.shape[0], dense_side(k), dense_side(v), summary,
                       self.summary if summary is not None else None)
