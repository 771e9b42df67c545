"""MosaicKV: per-segment rotation + per-vector top-r elements with bitmaps + block selection."""

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from mosaickv.core._checks import check_ratio
from mosaickv.core.base import CompressionMethod
from mosaickv.core.packing import pack_topk
from mosaickv.core.rotation import CovarianceAccumulator, rotation_from_moment
from mosaickv.core.segment import PackedSide, Segment
from mosaickv.core.strategy import (
    DEFAULT_KEEP_RATIOS,
    Strategy,
    candidate_strategies,
    energy_losses,
    fixed_strategy,
    search_strategy,
)


@dataclass
class MosaicState:
    """Decode-time state of one cache.

    acc_k, acc_v: moments of the pending tokens (None while nothing is pending), so a closing
    segment's rotation needs no second pass over its tokens.
    last_rotation [H_kv, D, D], last_strategies, last_loss: the previous segment's K strategy and its
    energy loss; pending tokens are scored against it (dropped / total energy) to detect drift.
    """

    acc_k: CovarianceAccumulator | None = None
    acc_v: CovarianceAccumulator | None = None
    last_rotation: torch.Tensor | None = None
    last_strategies: list[Strategy] | None = None
    last_loss: float = 0.0
    pending_dropped: float = 0.0
    pending_total: float = 0.0


class MosaicMethod(CompressionMethod):
    """MosaicKV (arXiv 2607.00760): two-dimensional KV compression.

    Per segment and KV head, K and V are rotated by the eigenvectors of their second moment; each
    rotated vector keeps its own top keep_ratio * D elements (groups of g) with a position bitmap;
    blocks of B tokens are summarised in rotated coordinates and selected per step with the query.

    Args:
        keep_ratio: fixed fraction of elements kept per vector, or None to search per stripe over
            ``keep_ratios`` x ``groups`` for the most compressive candidate with energy loss
            <= ``loss_threshold``.
        group: g in {1, 2, 4} for fixed keep_ratio.
        channels: optional truncation c: only the first c rotated channels may be kept.
        loss_threshold: search threshold on relative energy not kept.
        drift: a decode segment closes early once the pending tokens' loss under the previous
            segment's strategy exceeds drift x that segment's own loss (the rotation went stale);
            it closes at segment_len in any case.
        min_segment_len: the fewest pending tokens an early (drift) close may encode.
        summary / summary_channels: default "compact_minmax" over m = 16 rotated channels, the best
            error at equal memory among the kinds measured (docs/FORMAT.md section 8).
    """

    name: ClassVar[str] = "mosaic"

    def __init__(
        self,
        *,
        keep_ratio: float | None = 0.25,
        group: int = 1,
        channels: int | None = None,
        loss_threshold: float = 0.1,
        keep_ratios: tuple[float, ...] = DEFAULT_KEEP_RATIOS,
        groups: tuple[int, ...] = (1, 2, 4),
        drift: float = 1.5,
        min_segment_len: int = 128,
        **params: Any,
    ) -> None:
        # Measured (docs/FORMAT.md, bench/results/analysis_sweep.json): Quest's bound over the first
        # 16 rotated channels gives the lowest error at equal total memory.
        params.setdefault("summary", "compact_minmax")
        params.setdefault("summary_channels", 16)
        super().__init__(**params)
        if keep_ratio is not None:
            check_ratio(keep_ratio, "keep_ratio")
        if not 0.0 <= loss_threshold <= 1.0:
            raise ValueError(f"loss_threshold must be in [0, 1], got {loss_threshold}")
        if drift <= 1.0 or min_segment_len < 1:
            raise ValueError(f"drift must be > 1 and min_segment_len >= 1, got {drift}, {min_segment_len}")
        self.keep_ratio = keep_ratio
        self.group = group
        self.channels = channels
        self.loss_threshold = loss_threshold
        self.keep_ratios = keep_ratios
        self.groups = groups
        self.drift = drift
        self.min_segment_len = min_segment_len

    def _init_state(self, k: torch.Tensor, v: torch.Tensor, q_window: torch.Tensor | None) -> MosaicState:
        if self.keep_ratio is not None:
            fixed_strategy(k.shape[2], self.keep_ratio, self.group, self.channels)  # validate early
        return MosaicState()

    def _strategy(self, x: torch.Tensor, elem_bytes: int) -> tuple[Strategy, float]:
        """Strategy and its loss for one stripe x: [S, D] float32 rotated (loss -1: not computed)."""
        d = x.shape[1]
        if self.keep_ratio is not None:
            return fixed_strategy(d, self.keep_ratio, self.group, self.channels), -1.0
        return search_strategy(x, candidate_strategies(d, self.keep_ratios, self.groups),
                               self.loss_threshold, elem_bytes)

    def _pack(self, x: torch.Tensor, rotation: torch.Tensor, dtype: torch.dtype
              ) -> tuple[PackedSide, list[Strategy], float]:
        """x: [H, S, D] float32 rotated -> side, per-head strategies, energy-weighted loss."""
        elem = torch.empty(0, dtype=dtype).element_size()
        values, bitmaps, strategies, dropped = [], [], [], 0.0
        for h in range(x.shape[0]):
            st, loss = self._strategy(x[h], elem)
            vals, bits = pack_topk(x[h], st.keep, st.group, st.channels, dtype)
            if loss < 0:  # fixed strategy: the loss follows from what was kept, no extra sort
                energy = float(x[h].pow(2).sum())
                loss = 1.0 - float(vals.float().pow(2).sum()) / energy if energy else 0.0
            values.append(vals)
            bitmaps.append(bits)
            strategies.append(st)
            dropped += loss * float(x[h].pow(2).sum())
        total = float(x.pow(2).sum())
        groups = [s.group for s in strategies]
        side = PackedSide(values, x.shape[2], groups, bitmaps=bitmaps, rotation=rotation)
        return side, strategies, dropped / total if total else 0.0

    def _encode_segment(
        self, k: torch.Tensor, v: torch.Tensor, state: MosaicState, from_pending: bool
    ) -> Segment:
        if from_pending and state.acc_k is not None and state.acc_v is not None \
                and state.acc_k.count == k.shape[0]:
            acc_k, acc_v = state.acc_k, state.acc_v
        else:
            acc_k = CovarianceAccumulator(k.shape[1], k.shape[2], k.device)
            acc_v = CovarianceAccumulator(k.shape[1], k.shape[2], k.device)
            acc_k.update(k)
            acc_v.update(v)
        rot_k = rotation_from_moment(acc_k.second_moment())
        rot_v = rotation_from_moment(acc_v.second_moment())
        k_rot = torch.einsum("shd,hed->hse", k.float(), rot_k)  # [H, S, D]
        v_rot = torch.einsum("shd,hed->hse", v.float(), rot_v)
        side_k, strategies, loss = self._pack(k_rot, rot_k, k.dtype)
        side_v, _, _ = self._pack(v_rot, rot_v, v.dtype)
        summary = self._summarise(k_rot, k.dtype)
        state.last_rotation, state.last_strategies, state.last_loss = rot_k, strategies, loss
        state.acc_k = state.acc_v = None
        state.pending_dropped = state.pending_total = 0.0
        return Segment(0, k.shape[0], side_k, side_v, summary, self.summary if summary is not None else None)

    def _on_pending(self, state: MosaicState, k: torch.Tensor, v: torch.Tensor) -> None:
        if state.acc_k is None or state.acc_v is None:
            state.acc_k = CovarianceAccumulator(k.shape[1], k.shape[2], k.device)
            state.acc_v = CovarianceAccumulator(k.shape[1], k.shape[2], k.device)
        state.acc_k.update(k)
        state.acc_v.update(v)
        if state.last_rotation is None or state.last_strategies is None:
            return
        x = torch.einsum("shd,hed->hse", k.float(), state.last_rotation)
        for h, st in enumerate(state.last_strategies):
            energy = float(x[h].pow(2).sum())
            state.pending_dropped += float(energy_losses(x[h], [st])[0]) * energy
            state.pending_total += energy

    def _should_close(self, state: MosaicState, n_pending: int) -> bool:
        if n_pending >= self.segment_len:
            return True
        if n_pending < self.min_segment_len or state.pending_total == 0.0:
            return False
        return state.pending_dropped / state.pending_total > self.drift * max(state.last_loss, 1e-6)

    def _state_tensors(self, state: MosaicState) -> list[torch.Tensor]:
        accs = [a for a in (state.acc_k, state.acc_v) if a is not None]
        return [t for a in accs for t in (a.sum, a.outer)]
