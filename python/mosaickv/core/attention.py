"""PackedAttention for one KV head: partial attention over one part (a packed stripe or a dense
block of tokens), then a flash-decoding merge of the parts by log-sum-exp."""

import torch


def packed_part(
    q_rot: torch.Tensor,
    k_values: torch.Tensor,
    k_pos: torch.Tensor,
    v_values: torch.Tensor,
    v_pos: torch.Tensor,
    v_rotation: torch.Tensor | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of the G query heads of one KV head over n tokens stored packed.

    logit[g, t] = scale * sum_j q_rot[g, k_pos[t, j]] * k_values[t, j]; o'[g] accumulates
    p[g, t] * v_values[t, j] at rotated position v_pos[t, j]; o = R_V^T o'. Nothing is decompressed.

    Args:
        q_rot: [G, D] float32, queries already rotated by R_K (q' = R_K q).
        k_values: [n, k_K] storage dtype. k_pos: [n, k_K] int64 per-vector positions (bitmap form)
            or [k_K] int64 positions shared by every row (channel mask or dense arange).
        v_values: [n, k_V]; v_pos: [n, k_V] or [k_V] int64, same conventions.
        v_rotation: [D, D] float32 R_V, or None when V is stored unrotated.
        scale: softmax scale.
    Returns:
        lse: [G] float32 log-sum-exp of the logits (-inf when n = 0);
        o: [G, D] float32 output normalised within the part (zeros when n = 0).
    """
    g, d = q_rot.shape
    n = k_values.shape[0]
    if n == 0:
        return torch.full((g,), -torch.inf, device=q_rot.device), torch.zeros(g, d, device=q_rot.device)
    kf = k_values.float()
    if k_pos.dim() == 2:
        logits = (q_rot[:, k_pos] * kf).sum(-1)
    else:
        logits = q_rot[:, k_pos] @ kf.T
    logits = logits * scale
    lse = torch.logsumexp(logits, dim=-1)
    p = torch.exp(logits - lse[:, None])
    out = torch.zeros(g, d, device=q_rot.device)
    vf = v_values.float()
    if v_pos.dim() == 2:
        weighted = (p[:, :, None] * vf).reshape(g, -1)
        out.scatter_add_(1, v_pos.reshape(1, -1).expand(g, -1), weighted)
    else:
        out[:, v_pos] = p @ vf
    if v_rotation is not None:
        out = out @ v_rotation
    return lse, out


def merge_parts(lses: list[torch.Tensor], outs: list[torch.Tensor]) -> torch.Tensor:
    """Joint softmax over all parts from their partial results.

    Args:
        lses: P tensors [G] float32; outs: P tensors [G, D] float32 (as returned by ``packed_part``).
    Returns:
        [G, D] float32, equal to softmax attention over the union of the parts' tokens.
    """
    lse = torch.stack(lses)
    weights = torch.softmax(lse, dim=0)
    return (weights[:, :, None] * torch.stack(outs)).sum(0)
