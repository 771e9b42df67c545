"""A layer's decode batch between the steps that change it: while every sequence only grows its
window and no segment swaps in, ``CacheManager.append_batch`` and ``attend`` run without any
per-sequence Python (docs/CACHE.md, "Steady steps")."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mosaickv.cache.dense_batch import DenseBatch
from mosaickv.cache.segments import Snapshot
from mosaickv.cache.stream import Stream
from mosaickv.ops import DecodeLayout, DecodeWorkspace


class SteadyBatch:
    """One layer's batch of requests, made by a step that took the general path (the batch changed,
    a sequence evicted or filled its sinks).

    Appends: the next ``room`` one-token appends of every sequence only write the next row of its
    buffer (``Stream.window_room``), so ``append`` launches them through ``dense`` (the layer's
    ``DenseBatch``, whose row counts advance on the device) and leaves the sequences' snapshots as
    they are; ``publish`` gives each snapshot its rows, and the manager calls it before anything
    else reads a stream of the layer.

    Attention: ``hold`` keeps the snapshots a layout was built from, acquired (a swap frees none of
    the pages they show until they are released), and ``layout`` returns it while they are still
    the streams' current snapshots: the layout reads the dense rows through ``dense``'s device
    counts, so the appends since do not change it.
    """

    def __init__(self, request_ids: Sequence[str], streams: list[Stream], dense: DenseBatch) -> None:
        self.request_ids = tuple(request_ids)
        self.streams = streams
        self.dense = dense
        self.room = min(s.window_room() for s in streams)
        self.unpublished = False
        self._held: list[tuple[Stream, Snapshot]] = []  # (stream, its acquired snapshot)
        self._layout: tuple[DecodeLayout, DecodeWorkspace] | None = None
        self._group = 0

    def serves(self, request_ids: Sequence[str]) -> bool:
        return tuple(request_ids) == self.request_ids

    def append(self, k: torch.Tensor, v: torch.Tensor) -> bool:
        """Write k[b], v[b] ([B, H_kv, D]) as the next row of sequence b; False (nothing written)
        once a sequence has no room left."""
        if not self.room:
            return False
        self.dense.append(k, v)
        self.room -= 1
        self.unpublished = True
        return True

    def publish(self) -> None:
        """Give every sequence's snapshot the rows written for it (idempotent: the counts are absolute)."""
        if self.unpublished:
            self.unpublished = False
            for stream, buf, n in zip(self.streams, self.dense.bufs, self.dense.host_lengths, strict=True):
                stream.set_rows(buf, n)

    def layout(self, group: int) -> tuple[DecodeLayout, DecodeWorkspace] | None:
        """The held layout and workspace, if built for ``group`` query heads per KV head from the
        streams' current snapshots."""
        if self._layout is None or group != self._group:
            return None
        if any(s.snapshot is not x for s, x in self._held):
            return None
        return self._layout

    @property
    def held_group(self) -> int:
        """Query heads per KV head of the held layout (0: none held)."""
        return self._group if self._layout is not None else 0

    def hold(self, snaps: list[Snapshot], layout: DecodeLayout, ws: DecodeWorkspace, group: int) -> bool:
        """Keep these acquired snapshots (one per stream) and the layout built from them, releasing
        the ones held before; False (nothing kept) if the layout does not read this batch's counts."""
        if layout.dense_len is not self.dense.lengths:
            return False
        self.release()
        self._held = list(zip(self.streams, snaps, strict=True))
        self._layout, self._group = (layout, ws), group
        return True

    def release(self) -> None:
        """Release the held snapshots (their pages may go back once no other reader holds them)."""
        for stream, snap in self._held:
            stream.release(snap)
        self._held, self._layout = [], None
