"""ThinK: one key/value channel mask per KV head, chosen at prefill by query-driven scores."""

import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from mosaickv.core._checks import check_ratio
from mosaickv.core.base import CompressionMethod
from mosaickv.core.packing import groups_to_bitmap, unpack_bitmap
from mosaickv.core.segment import PackedSide, Segment


@dataclass
class ThinKState:
    """Masks chosen at prefill: [H_kv, ceil(D / 32)] uint32 each, shared by every segment.

    scoring: "query" (ThinK's rule over q_window) or "key-norm" (fallback without q_window).
    """

    mask_k: torch.Tensor
    mask_v: torch.Tensor
    scoring: str


def _channels(mask: torch.Tensor, dim: int) -> torch.Tensor:
    """[H, W] uint32 mask -> [H, k] int64 ascending kept channels."""
    return unpack_bitmap(mask, dim, 1).nonzero()[:, 1].view(mask.shape[0], -1)


def _top_channels(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """scores: [H, D] -> mask bitmap [H, ceil(D / 32)] uint32 of the top ``keep`` channels per head."""
    top = scores.topk(keep, dim=1).indices
    return groups_to_bitmap(torch.zeros_like(scores, dtype=torch.bool).scatter_(1, top, True))


class ThinKMethod(CompressionMethod):
    """ThinK (Xu et al., 2024, arXiv 2407.21018): keep the top keep_ratio * D channels per KV head.

    Key channel j of head h scores ||Q_obs[:, j]|| * ||K[:, j]|| (= ||Q_obs[:, j] K[:, j]^T||_F), with
    Q_obs the q_window rows of every query head of the GQA group; value channel j scores
    ||(softmax(Q_obs K^T * scale) V)[:, j]|| (ThinK's value variant). Without q_window both fall back
    to channel norms of K and V, and a warning says so. The same mask applies to decode tokens.

    Args:
        keep_ratio: fraction of channels kept for K and V, in (0, 1].
        token_ratio: default 1 (no block selection); see Naive2DMethod for the combination.
    """

    name: ClassVar[str] = "think"

    def __init__(self, *, keep_ratio: float = 0.5, **params: Any) -> None:
        check_ratio(keep_ratio, "keep_ratio")
        params.setdefault("token_ratio", 1.0)
        super().__init__(**params)
        self.keep_ratio = keep_ratio

    def _init_state(self, k: torch.Tensor, v: torch.Tensor, q_window: torch.Tensor | None) -> ThinKState:
        t, h, d = k.shape
        keep = max(1, round(self.keep_ratio * d))
        kf, vf = k.float(), v.float()
        k_norm = kf.pow(2).sum(0).sqrt()  # [H, D]
        if q_window is None:
            warnings.warn("think: no q_window given; channels are chosen by K/V channel norms instead of "
                          "ThinK's query-driven score (pass q_window=[w, H_q, D] for the real rule)",
                          stacklevel=3)
            score_k, score_v, scoring = k_norm, vf.pow(2).sum(0).sqrt(), "key-norm"
        else:
            qg = q_window.float().view(q_window.shape[0], h, -1, d)  # [w, H, G, D]
            score_k = qg.pow(2).sum((0, 2)).sqrt() * k_norm
            rows = qg.permute(1, 0, 2, 3).reshape(h, -1, d)  # [H, w*G, D]
            attn = torch.softmax(torch.einsum("hrd,thd->hrt", rows, kf) * d ** -0.5, dim=-1)
            score_v = torch.einsum("hrt,thd->hrd", attn, vf).pow(2).sum(1).sqrt()
            scoring = "query"
        return ThinKState(_top_channels(score_k, keep), _top_channels(score_v, keep), scoring)

    def _encode_segment(
        self, k: torch.Tensor, v: torch.Tensor, state: ThinKState, from_pending: bool
    ) -> Segment:
        h = k.shape[1]
        chan_k, chan_v = _channels(state.mask_k, k.shape[2]), _channels(state.mask_v, k.shape[2])
        kept_k = [k[:, i, chan_k[i]] for i in range(h)]
        kept_v = [v[:, i, chan_v[i]] for i in range(h)]
        side_k = PackedSide(kept_k, k.shape[2], [1] * h, channel_mask=state.mask_k)
        side_v = PackedSide(kept_v, k.shape[2], [1] * h, channel_mask=state.mask_v)
        summary = self._summarise(torch.stack(kept_k).float(), k.dtype)
        return Segment(0, k.shape[0], side_k, side_v, summary, self.summary if summary is not None else None)

    def _state_tensors(self, state: ThinKState) -> list[torch.Tensor]:
        return [state.mask_k, state.mask_v]
