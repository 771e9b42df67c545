"""One compressed segment: K and V sides (packed stripes, one per KV head) plus block summaries.

A side is stored in exactly one of three layouts (docs/FORMAT.md):
- bitmap (mosaic): per head values [S, k_h] + bitmap [S, W] uint32 + rotation R[h] [D, D] float32;
- channel mask (think/naive2d): per head values [S, k] + one mask row [W1] uint32 (g = 1), unrotated;
- dense (quest): per head values [S, D], unrotated.
"""

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from mosaickv.core.packing import bitmap_positions, unpack_bitmap, unpack_values


@dataclass
class PackedSide:
    """K or V of one segment.

    Attributes:
        values: H_kv tensors [S, k_h], storage dtype, kept elements in ascending position order.
        dim: D.
        group: g per head (a stripe's bitmap granularity; 1 for masks and dense).
        bitmaps: H_kv tensors [S, W] uint32 (bitmap layout) or None.
        channel_mask: [H_kv, ceil(D / 32)] uint32 shared by every row of a head (mask layout) or None.
            The same tensor object is shared by every segment of a cache and counted once.
        rotation: [H_kv, D, D] float32 (rows = eigenvectors, eigenvalue descending) or None.
    """

    values: list[torch.Tensor]
    dim: int
    group: list[int]
    bitmaps: list[torch.Tensor] | None = None
    channel_mask: torch.Tensor | None = None
    rotation: torch.Tensor | None = None

    @property
    def keep(self) -> list[int]:
        """k_h per head."""
        return [int(v.shape[1]) for v in self.values]

    def tensors(self) -> Iterator[torch.Tensor]:
        yield from self.values
        yield from self.bitmaps or []
        for t in (self.channel_mask, self.rotation):
            if t is not None:
                yield t

    def positions(self, h: int, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Positions of head h: [n, k_h] int64 for ``rows`` (bitmap; all rows when None), else [k_h]."""
        if self.bitmaps is not None:
            # CUDA cannot index uint32 tensors; int32 has the same bits, which unpacking reads
            bitmap = self.bitmaps[h] if rows is None else self.bitmaps[h].view(torch.int32)[rows]
            return bitmap_positions(bitmap, self.dim, self.group[h], self.keep[h])
        if self.channel_mask is not None:
            return unpack_bitmap(self.channel_mask[h : h + 1], self.dim, 1)[0].nonzero()[:, 0]
        return torch.arange(self.dim, device=self.values[h].device)

    def rotate(self, q: torch.Tensor) -> torch.Tensor:
        """Queries into this side's coordinates: [H_kv, G, D] float32 -> same (q' = R q)."""
        if self.rotation is None:
            return q
        return torch.einsum("hgd,hed->hge", q, self.rotation)

    def unpack(self, h: int) -> torch.Tensor:
        """Reference decompression of head h to original coordinates: [S, D] float32.

        Used by tests and analysis only; PackedAttention never decompresses.
        """
        vals = self.values[h]
        if self.bitmaps is not None:
            rotated = unpack_values(vals, self.bitmaps[h], self.dim, self.group[h]).float()
        else:
            rotated = torch.zeros(vals.shape[0], self.dim, device=vals.device)
            rotated[:, self.positions(h)] = vals.float()
        return rotated @ self.rotation[h] if self.rotation is not None else rotated


@dataclass
class Segment:
    """A closed run of ``length`` tokens starting at absolute position ``start``.

    Attributes:
        k, v: the two sides.
        summary: [H_kv, ceil(length / block), width] storage dtype in the K side's summary
            coordinates (rotated for mosaic, the kept channels for masks), or None when the method
            does not select blocks.
        summary_kind: one of SUMMARY_KINDS, or None with no summary.
    """

    start: int
    length: int
    k: PackedSide
    v: PackedSide
    summary: torch.Tensor | None = None
    summary_kind: str | None = None

    def tensors(self) -> Iterator[torch.Tensor]:
        yield from self.k.tensors()
        yield from self.v.tensors()
        if self.summary is not None:
            yield self.summary

    def summary_queries(self, q_rot: torch.Tensor) -> torch.Tensor:
        """Queries in summary coordinates: [H_kv, G, D] (already R_K-rotated) -> [H_kv, G, F]."""
        if self.k.channel_mask is None:
            return q_rot
        return torch.stack([q_rot[h][:, self.k.positions(h)] for h in range(q_rot.shape[0])])
