"""Cache plumbing shared by every method: sinks, segments, dense tail, append, attend, nbytes.

Token layout of one cache (one sequence, one layer), in order:
    sinks    first ``n_sink`` tokens, dense, never pruned;
    segments closed runs of tokens, stored the method's way, block-selected at decode;
    tail     dense: ``pending`` tokens (older than the window, waiting to close into a segment)
             followed by the ``window`` most recent tokens; always attended.
GQA convention: query head i uses KV head i // (H_q / H_kv) (the usual repeat_kv order).
"""

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from mosaickv.core._checks import check_kv, check_query, check_ratio
from mosaickv.core.attention import merge_parts, packed_part
from mosaickv.core.segment import Segment
from mosaickv.core.summaries import SUMMARY_KINDS, block_summaries, score_blocks, select_top_blocks


class CompressionMethod:
    """Configuration plus the hooks a method overrides; ``encode`` builds a ``KVCache``.

    Args:
        n_sink: attention-sink tokens kept dense (>= 0).
        window: most recent tokens kept dense (>= 0).
        block_size: tokens per selection block B (>= 1).
        token_ratio: fraction of a sequence's blocks attended per step, in (0, 1]; 1 disables
            selection (no summaries are stored).
        segment_len: prompt segment length, and the maximum decode segment length. Default 1024
            suits short contexts; the paper uses 64K for 64K-1M contexts.
        summary: block summary kind, one of SUMMARY_KINDS.
        summary_channels: m, channels of a "compact" summary.
    """

    name: ClassVar[str] = ""
    compresses: ClassVar[bool] = True

    def __init__(
        self,
        *,
        n_sink: int = 4,
        window: int = 64,
        block_size: int = 8,
        token_ratio: float = 0.10,
        segment_len: int = 1024,
        summary: str = "minmax",
        summary_channels: int = 32,
    ) -> None:
        for label, value, low in (("n_sink", n_sink, 0), ("window", window, 0), ("block_size", block_size, 1),
                                  ("segment_len", segment_len, 1), ("summary_channels", summary_channels, 1)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{label} must be an integer >= {low}, got {value!r}")
        check_ratio(token_ratio, "token_ratio")
        if summary not in SUMMARY_KINDS:
            raise ValueError(f"summary must be one of {SUMMARY_KINDS}, got {summary!r}")
        self.n_sink = n_sink
        self.window = window
        self.block_size = block_size
        self.token_ratio = token_ratio
        self.segment_len = segment_len
        self.summary = summary
        self.summary_channels = summary_channels

    @property
    def selects_blocks(self) -> bool:
        return self.compresses and self.token_ratio < 1.0

    def encode(self, k: torch.Tensor, v: torch.Tensor, q_window: torch.Tensor | None = None) -> "KVCache":
        """Compress one sequence's prompt K/V for one layer.

        Args:
            k, v: [T, H_kv, D] post-RoPE, float16/bfloat16/float32, T >= 1.
            q_window: optional [w, H_q, D] queries of the last prompt tokens (ThinK scoring).
        Returns:
            the cache; values are stored in k's dtype, all math runs in float32.
        """
        check_kv(k, v, allow_empty=False)
        if self.summary.startswith("compact") and self.summary_channels > k.shape[2]:
            raise ValueError(
                f"summary_channels = {self.summary_channels} exceeds the head dim D = {k.shape[2]}")
        if q_window is not None:
            check_query(q_window, k.shape[1], k.shape[2], "q_window")
            if q_window.dim() != 3:
                raise ValueError(f"q_window must be [w, H_q, D], got shape {tuple(q_window.shape)}")
        cache = KVCache(self, k.shape[1], k.shape[2], k.dtype, k.device, self._init_state(k, v, q_window))
        cache._prefill(k, v)
        return cache

    def _init_state(self, k: torch.Tensor, v: torch.Tensor, q_window: torch.Tensor | None) -> Any:
        """Per-cache state computed at prefill (ThinK's masks, mosaic's accumulators)."""
        return None

    def _encode_segment(self, k: torch.Tensor, v: torch.Tensor, state: Any, from_pending: bool) -> Segment:
        """Store k, v: [S, H_kv, D] as one segment (from_pending: the tokens are the pending ones)."""
        raise NotImplementedError(f"{type(self).__name__} must implement _encode_segment")

    def _on_pending(self, state: Any, k: torch.Tensor, v: torch.Tensor) -> None:
        """Tokens k, v: [t, H_kv, D] just left the recent window and became pending."""

    def _should_close(self, state: Any, n_pending: int) -> bool:
        return n_pending >= self.segment_len

    def _summarise(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
        """Block summaries of x: [H_kv, S, F] float32 keys in summary coordinates, or None."""
        if not self.selects_blocks:
            return None
        return block_summaries(x, self.block_size, self.summary, self.summary_channels, dtype)

    def _state_tensors(self, state: Any) -> list[torch.Tensor]:
        """Tensors held in the per-cache state (counted in nbytes)."""
        return []

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


@dataclass
class _Plan:
    """Per-step decode plan: rotated queries per segment and the selected blocks."""

    q: torch.Tensor  # [H_kv, G, D] float32
    q_rot: list[torch.Tensor]  # per segment [H_kv, G, D] float32, rotated by that segment's R_K
    selected: torch.Tensor | None  # [H_kv, n_sel] int64 global block ids, None = all blocks


class KVCache:
    """The compressed cache of one sequence and one layer (see the module docstring for layout).

    Attributes:
        sink_k, sink_v: [n_s, H_kv, D] storage dtype, n_s <= n_sink.
        segments: closed segments in token order.
        tail_k, tail_v: [n_tail, H_kv, D] storage dtype: pending tokens then the recent window.
    """

    def __init__(self, method: CompressionMethod, n_kv_heads: int, dim: int, dtype: torch.dtype,
                 device: torch.device, state: Any) -> None:
        self.method = method
        self.n_kv_heads = n_kv_heads
        self.dim = dim
        self.dtype = dtype
        self.device = device
        self.state = state
        empty = torch.empty(0, n_kv_heads, dim, dtype=dtype, device=device)
        self.sink_k, self.sink_v = empty, empty.clone()
        self.tail_k, self.tail_v = empty.clone(), empty.clone()
        self.segments: list[Segment] = []

    # ---- geometry -------------------------------------------------------------------------------
    @property
    def length(self) -> int:
        """Tokens held, T."""
        return self.sink_k.shape[0] + sum(s.length for s in self.segments) + self.tail_k.shape[0]

    @property
    def n_pending(self) -> int:
        return max(0, self.tail_k.shape[0] - self.method.window) if self.method.compresses else 0

    @property
    def block_offsets(self) -> list[int]:
        """Global id of each segment's first block; segment i owns ids [off[i], off[i] + n_b(i))."""
        offsets, total = [], 0
        for seg in self.segments:
            offsets.append(total)
            total += -(-seg.length // self.method.block_size)
        return offsets

    @property
    def n_blocks(self) -> int:
        return sum(-(-s.length // self.method.block_size) for s in self.segments)

    # ---- memory ---------------------------------------------------------------------------------
    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the cache holds, each storage once (a shared ThinK mask counts once)."""
        found: dict[int, torch.Tensor] = {}
        parts = [self.sink_k, self.sink_v, self.tail_k, self.tail_v]
        parts += [t for seg in self.segments for t in seg.tensors()]
        parts += self.method._state_tensors(self.state)
        for t in parts:
            found.setdefault(t.untyped_storage().data_ptr() if t.numel() else id(t), t)
        return list(found.values())

    @property
    def nbytes(self) -> int:
        """Bytes really stored: values, bitmaps, masks, rotations, summaries, dense sinks/tail, state."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    # ---- filling ----------------------------------------------------------------------------------
    def _prefill(self, k: torch.Tensor, v: torch.Tensor) -> None:
        n_s = min(self.method.n_sink, k.shape[0])
        self.sink_k, self.sink_v = k[:n_s].clone(), v[:n_s].clone()
        rest_k, rest_v = k[n_s:], v[n_s:]
        n_comp = max(0, rest_k.shape[0] - self.method.window) if self.method.compresses else 0
        for lo, hi in _split(n_comp, self.method.segment_len):
            self._add_segment(rest_k[lo:hi], rest_v[lo:hi], from_pending=False)
        self.tail_k, self.tail_v = rest_k[n_comp:].clone(), rest_v[n_comp:].clone()

    def _add_segment(self, k: torch.Tensor, v: torch.Tensor, from_pending: bool) -> None:
        seg = self.method._encode_segment(k, v, self.state, from_pending)
        seg.start = self.sink_k.shape[0] + sum(s.length for s in self.segments)
        self.segments.append(seg)

    def append(self, k_new: torch.Tensor, v_new: torch.Tensor) -> None:
        """Add decode tokens k_new, v_new: [t, H_kv, D] (t >= 0) in the cache's dtype and device.

        They fill the sinks first, then the tail; pending tokens close into a new segment when the
        method says so (by length, or mosaic's loss drift), never more than segment_len at a time.
        """
        check_kv(k_new, v_new, allow_empty=True)
        if k_new.shape[1:] != (self.n_kv_heads, self.dim) or k_new.dtype != self.dtype \
                or k_new.device != self.device:
            raise ValueError(
                f"append expects [t, {self.n_kv_heads}, {self.dim}] {self.dtype} on {self.device}, "
                f"got {tuple(k_new.shape)} {k_new.dtype} on {k_new.device}")
        n_s = min(self.method.n_sink - self.sink_k.shape[0], k_new.shape[0]) if not self.segments \
            and self.tail_k.shape[0] == 0 else 0
        if n_s > 0:
            self.sink_k = torch.cat([self.sink_k, k_new[:n_s]])
            self.sink_v = torch.cat([self.sink_v, v_new[:n_s]])
        k_new, v_new = k_new[n_s:], v_new[n_s:]
        m = self.method
        i = 0
        while i < k_new.shape[0]:
            room = m.segment_len + m.window - self.tail_k.shape[0] if m.compresses else k_new.shape[0]
            n = min(k_new.shape[0] - i, room)
            before = self.n_pending
            self.tail_k = torch.cat([self.tail_k, k_new[i:i + n]])
            self.tail_v = torch.cat([self.tail_v, v_new[i:i + n]])
            after = self.n_pending
            if after > before:
                m._on_pending(self.state, self.tail_k[before:after], self.tail_v[before:after])
            if after and m._should_close(self.state, after):
                self._add_segment(self.tail_k[:after], self.tail_v[:after], from_pending=True)
                self.tail_k, self.tail_v = self.tail_k[after:].clone(), self.tail_v[after:].clone()
            i += n

    # ---- decode -----------------------------------------------------------------------------------
    def _group_query(self, q: torch.Tensor) -> torch.Tensor:
        """[H_q, D] -> [H_kv, G, D] float32."""
        check_query(q, self.n_kv_heads, self.dim)
        if q.dim() != 2:
            raise ValueError(f"q must be [H_q, D], got shape {tuple(q.shape)}")
        return q.float().view(self.n_kv_heads, -1, self.dim)

    def _plan(self, q: torch.Tensor, token_ratio: float | None = None) -> _Plan:
        """token_ratio: select as if the method's token ratio were this (the segments' summaries are
        the same whatever the ratio); default the method's own."""
        qg = self._group_query(q)
        q_rot = [seg.k.rotate(qg) for seg in self.segments]
        ratio = self.method.token_ratio if token_ratio is None else token_ratio
        selected = None
        if self.method.selects_blocks and self.segments and ratio < 1.0:
            scores = torch.cat([score_blocks(seg.summary_queries(qr), seg.summary, seg.summary_kind)
                                for seg, qr in zip(self.segments, q_rot, strict=True)], dim=1)
            selected = select_top_blocks(scores, ratio)
        return _Plan(qg, q_rot, selected)

    def select_blocks(self, q: torch.Tensor) -> torch.Tensor:
        """Blocks attended for query q: [H_q, D] -> [H_kv, n_sel] int64 global block ids, ascending.

        Scores use each segment's rotated query and the max over the GQA group; the top
        ceil(token_ratio * n_blocks) over the whole sequence are kept. Without selection, all ids.
        """
        plan = self._plan(q)
        if plan.selected is None:
            return torch.arange(self.n_blocks, device=self.device).expand(self.n_kv_heads, -1).clone()
        return plan.selected

    def _rows(self, selected: torch.Tensor | None, seg_index: int, h: int) -> torch.Tensor | None:
        """Token rows of segment ``seg_index`` selected for head h: [n] int64, or None for all."""
        if selected is None:
            return None
        b = self.method.block_size
        off = self.block_offsets[seg_index]
        seg = self.segments[seg_index]
        ids = selected[h]
        local = ids[(ids >= off) & (ids < off + -(-seg.length // b))] - off
        rows = (local[:, None] * b + torch.arange(b, device=ids.device)).reshape(-1)
        return rows[rows < seg.length]

    def attend(self, q: torch.Tensor, scale: float | None = None) -> torch.Tensor:
        """Decode attention of one query token over the whole cache, computed on the packed form.

        Args:
            q: [H_q, D] post-RoPE query, H_q a multiple of H_kv.
            scale: softmax scale, default D ** -0.5.
        Returns:
            [H_q, D] in q's dtype.
        """
        plan = self._plan(q)
        scale = self.dim ** -0.5 if scale is None else float(scale)
        dense_pos = torch.arange(self.dim, device=self.device)
        dense_k = torch.cat([self.sink_k, self.tail_k])
        dense_v = torch.cat([self.sink_v, self.tail_v])
        outs = []
        for h in range(self.n_kv_heads):
            lses, parts = [], []
            for i, seg in enumerate(self.segments):
                rows = self._rows(plan.selected, i, h)
                kv, vv = seg.k.values[h], seg.v.values[h]
                if rows is not None:
                    kv, vv = kv[rows], vv[rows]
                rot_v = seg.v.rotation[h] if seg.v.rotation is not None else None
                lse, o = packed_part(plan.q_rot[i][h], kv, seg.k.positions(h, rows), vv,
                                     seg.v.positions(h, rows), rot_v, scale)
                lses.append(lse)
                parts.append(o)
            lse, o = packed_part(plan.q[h], dense_k[:, h], dense_pos, dense_v[:, h], dense_pos, None, scale)
            lses.append(lse)
            parts.append(o)
            outs.append(merge_parts(lses, parts))
        return torch.cat(outs).to(q.dtype)

    def attended_mask(self, q: torch.Tensor, token_ratio: float | None = None) -> torch.Tensor:
        """Which token positions ``attend(q)`` reads, per KV head: [H_kv, T] bool (for analysis and
        recall telemetry); with ``token_ratio``, the positions it would read at that ratio."""
        plan = self._plan(q, token_ratio)
        mask = torch.ones(self.n_kv_heads, self.length, dtype=torch.bool, device=self.device)
        for i, seg in enumerate(self.segments):
            for h in range(self.n_kv_heads):
                rows = self._rows(plan.selected, i, h)
                if rows is not None:
                    mask[h, seg.start:seg.start + seg.length] = False
                    mask[h, seg.start + rows] = True
        return mask


def _split(n: int, length: int) -> list[tuple[int, int]]:
    """Cut n prompt tokens into segments of ``length``; a remainder shorter than length / 2 joins
    the last segment (a tiny segment would pay a full rotation for few tokens)."""
    bounds = list(range(0, n, length)) + [n]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] < length / 2:
        del bounds[-2]
    return list(zip(bounds[:-1], bounds[1:], strict=True)) if n else []
