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
    dropped_energy,
    fixed_strategy,
    search_strategy,
)


@dataclass
class MosaicState:
    """Decode-time state of one cache.

    acc_k, acc_v: moments of the pending tokens (None while nothing is pending), so a closing
    segment's rotation needs no second pass over its tokens.
    query_moment [H_kv, D, D]: E[q q^T] over the prompt's last queries of each GQA group (None when
    the selection is not query-weighted).
    last_rotation [H_kv, D, D], last_strategies, last_loss: the previous segment's K strategy and its
    energy loss; pending tokens are scored against it (dropped / total energy) to detect drift.
    """

    acc_k: CovarianceAccumulator | None = None
    acc_v: CovarianceAccumulator | None = None
    query_moment: torch.Tensor | None = None
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
        value_keep_ratio: V's fixed fraction when it differs from K's (None: keep_ratio); needs a
            fixed keep_ratio. Keys set which tokens are attended, values only what they return, so
            the two sides need not cost the same.
        head_keep_ratios: one fixed keep ratio per KV head (K and V), overriding keep_ratio: a
            segment policy's per-head budget (src/policy). Needs a fixed keep_ratio.
        group: g in {1, 2, 4} for fixed keep_ratio.
        channels: optional truncation c: only the first c rotated channels may be kept.
        loss_threshold: search threshold on relative energy not kept.
        query_weight: alpha in [0, 1]. K elements are ranked by x_i^2 w_i^2 with
            w^2 = alpha * E[q'^2] / mean(E[q'^2]) + (1 - alpha), q' the prompt's last queries
            (q_window) rotated like the keys: an element counts by the score error its loss causes.
            0 (or no q_window) ranks by magnitude alone.
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
        value_keep_ratio: float | None = None,
        head_keep_ratios: tuple[float, ...] | None = None,
        group: int = 1,
        channels: int | None = None,
        loss_threshold: float = 0.1,
        keep_ratios: tuple[float, ...] = DEFAULT_KEEP_RATIOS,
        groups: tuple[int, ...] = (1, 2, 4),
        drift: float = 1.5,
        min_segment_len: int = 128,
        query_weight: float = 0.0,
        **params: Any,
    ) -> None:
        # Measured (docs/FORMAT.md, bench/results/analysis_sweep.json): Quest's bound over the first
        # 16 rotated channels gives the lowest error at equal total memory.
        params.setdefault("summary", "compact_minmax")
        params.setdefault("summary_channels", 16)
        super().__init__(**params)
        if keep_ratio is not None:
            check_ratio(keep_ratio, "keep_ratio")
        if value_keep_ratio is not None:
            if keep_ratio is None:
                raise ValueError("value_keep_ratio needs a fixed keep_ratio (the strategy search sets both)")
            check_ratio(value_keep_ratio, "value_keep_ratio")
        if head_keep_ratios is not None:
            if keep_ratio is None or value_keep_ratio is not None:
                raise ValueError("head_keep_ratios needs a fixed keep_ratio and no value_keep_ratio")
            for r in head_keep_ratios:
                check_ratio(r, "head_keep_ratios")
        self.head_keep_ratios = None if head_keep_ratios is None else tuple(head_keep_ratios)
        if not 0.0 <= loss_threshold <= 1.0:
            raise ValueError(f"loss_threshold must be in [0, 1], got {loss_threshold}")
        if drift <= 1.0 or min_segment_len < 1:
            raise ValueError(f"drift must be > 1 and min_segment_len >= 1, got {drift}, {min_segment_len}")
        if not 0.0 <= query_weight <= 1.0:
            raise ValueError(f"query_weight must be in [0, 1], got {query_weight}")
        self.query_weight = query_weight
        self.keep_ratio = keep_ratio
        self.value_keep_ratio = value_keep_ratio
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
        for r in (self.value_keep_ratio, *(self.head_keep_ratios or ())):
            if r is not None:
                fixed_strategy(k.shape[2], r, self.group, self.channels)
        if self.head_keep_ratios is not None and len(self.head_keep_ratios) != k.shape[1]:
            raise ValueError(
                f"head_keep_ratios has {len(self.head_keep_ratios)} ratios for {k.shape[1]} KV heads")
        state = MosaicState()
        if self.query_weight > 0 and q_window is not None:
            h, d = k.shape[1], k.shape[2]
            q = q_window.float().reshape(-1, h, q_window.shape[1] // h, d).transpose(1, 2).reshape(-1, h, d)
            state.query_moment = torch.einsum("nhd,nhe->hde", q, q) / q.shape[0]
        return state

    def _strategy(self, x: torch.Tensor, elem_bytes: int, keep_ratio: float | None) -> tuple[Strategy, float]:
        """Strategy and its loss for one stripe x: [S, D] float32 rotated (loss -1: not computed)."""
        d = x.shape[1]
        if keep_ratio is not None:
            return fixed_strategy(d, keep_ratio, self.group, self.channels), -1.0
        return search_strategy(x, candidate_strategies(d, self.keep_ratios, self.groups),
                               self.loss_threshold, elem_bytes)

    def _weights(self, rotation: torch.Tensor, state: MosaicState) -> torch.Tensor | None:
        """[H, D] w^2 per rotated position (see query_weight), or None for magnitude ranking."""
        if state.query_moment is None:
            return None
        eq = torch.einsum("hed,hdf,hef->he", rotation, state.query_moment, rotation)  # diag(R M R^T)
        rel = eq / eq.mean(-1, keepdim=True).clamp_min(1e-30)
        return self.query_weight * rel + (1.0 - self.query_weight)

    def _pack(self, x: torch.Tensor, rotation: torch.Tensor, dtype: torch.dtype,
              keep_ratios: list[float | None], weights: torch.Tensor | None = None
              ) -> tuple[PackedSide, list[Strategy], float]:
        """x: [H, S, D] float32 rotated, one keep ratio per head (None: search) -> side, per-head
        strategies, energy-weighted loss."""
        elem = torch.empty(0, dtype=dtype).element_size()
        values, bitmaps, strategies, dropped = [], [], [], 0.0
        for h in range(x.shape[0]):
            st, loss = self._strategy(x[h], elem, keep_ratios[h])
            w = None if weights is None else weights[h]
            vals, bits = pack_topk(x[h], st.keep, st.group, st.channels, dtype, w)
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
        n = k.shape[1]
        k_keep = list(self.head_keep_ratios or [self.keep_ratio] * n)
        v_keep = k_keep if self.value_keep_ratio is None else [self.value_keep_ratio] * n
        side_k, strategies, loss = self._pack(k_rot, rot_k, k.dtype, k_keep, self._weights(rot_k, state))
        side_v, _, _ = self._pack(v_rot, rot_v, v.dtype, v_keep)
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
        dropped, total = dropped_energy(x, state.last_strategies)  # every head in a few ops
        state.pending_dropped += float(dropped.sum())
        state.pending_total += float(total.sum())

    def _should_close(self, state: MosaicState, n_pending: int) -> bool:
        if n_pending >= self.segment_len:
            return True
        if n_pending < self.min_segment_len or state.pending_total == 0.0:
            return False
        return state.pending_dropped / state.pending_total > self.drift * max(state.last_loss, 1e-6)

    def _state_tensors(self, state: MosaicState) -> list[torch.Tensor]:
        accs = [a for a in (state.acc_k, state.acc_v) if a is not None]
        return [t for a in accs for t in (a.sum, a.outer)]
