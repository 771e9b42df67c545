"""A batch's dense rows (sinks + window) as the kernels address them: each sequence's own buffer,
by address, with its row count, in one device table per layer. The kernel that appends a decode
step's rows advances the counts on the device, so while a layer's batch and its buffers stay the
same (most steps), neither the append nor attention uploads anything (docs/CACHE.md, "Dense rows
of a batch")."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from mosaickv.cache.segments import DenseRows
from mosaickv.cache.upload import to_device
from mosaickv.ops import append_dense_rows


class DenseBatch:
    """The device table of a batch's dense rows, [3 B] int64: the addresses of each sequence's K
    rows and of its V rows ([H_kv, cap, D] halves of its buffer), then int32 row counts and int32
    one-shot skip marks. ``rows``, ``lengths`` and ``skip`` are views of it; ``host_lengths``
    mirrors the counts. It holds the buffers it was built from, so no other tensor takes their
    addresses while it lives."""

    def __init__(self, dense: Sequence[DenseRows], skip: Sequence[bool] = ()) -> None:
        self.bufs = [d.buf for d in dense]
        b, first = len(self.bufs), self.bufs[0]
        table = np.empty(3 * b, dtype=np.int64)
        table[:b] = [x.data_ptr() for x in self.bufs]
        table[b : 2 * b] = table[:b] + first[0].numel() * first.element_size()  # V after K
        small = table[2 * b :].view(np.int32)
        small[:b] = self.host_lengths = [d.n for d in dense]
        small[b:] = list(skip) or 0
        self._skip = list(skip) or [False] * b  # the device's marks, mirrored: the next append only
        dev = to_device(table, first.device)
        self.rows = dev[: 2 * b].view(2, b)
        self.lengths = dev[2 * b :].view(torch.int32)[:b]
        self.skip = dev[2 * b :].view(torch.int32)[b:]
        self.cap = first.shape[2]

    def matches(self, dense: Sequence[DenseRows]) -> bool:
        """Whether these are the rows the table describes: the same buffers, as many rows."""
        return len(dense) == len(self.bufs) and all(
            d.buf is x and d.n == n for d, x, n in zip(dense, self.bufs, self.host_lengths, strict=True)
        )

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write k[b], v[b] ([B, H_kv, D]) as the next row of every sequence not marked skip, in one
        launch that clears the marks (they hold for the first append after the table was built)."""
        append_dense_rows(_launchable(k), _launchable(v), self.rows, self.lengths, self.skip, self.cap)
        self.host_lengths = [n + (not s) for n, s in zip(self.host_lengths, self._skip, strict=True)]
        self._skip = [False] * len(self._skip)


def _launchable(x: torch.Tensor) -> torch.Tensor:
    """x itself if contiguous and 16-byte aligned (what the kernel reads), else such a copy."""
    if x.is_contiguous() and x.data_ptr() % 16 == 0:
        return x
    return x.clone(memory_format=torch.contiguous_format)


def dense_batch(
    dense: Sequence[DenseRows],
    held: DenseBatch | None = None,
    skip: Sequence[bool] = (),
    single: bool = False,
) -> DenseBatch | None:
    """``held`` if it describes ``dense`` and nothing is to be skipped, else a new table (with
    ``skip``'s marks: rows that went in by another path this step). None for buffers of several
    sizes (one outgrew its cap: stacked), and for one sequence unless ``single`` (an append: the
    table then serves the steps after it; attention alone takes one buffer as it is, its length
    without an upload)."""
    if held is not None and not any(skip) and held.matches(dense):  # the same buffers: one shape
        return held
    if any(d.buf.shape != dense[0].buf.shape for d in dense):
        return None
    return DenseBatch(dense, skip) if len(dense) > 1 or single else None
