"""MosaicKV ops: the CUDA kernels behind torch custom ops, with the core reference as the CPU path.

    from mosaickv.ops import DecodePlan
    plan = DecodePlan(caches, device="cuda")  # caches: list of mosaickv.core KVCache (one layer)
    out = plan.run(q)                         # q: [B, H_q, D] -> [B, H_q, D]

``DecodePlan`` flattens the caches and sizes the workspaces once; ``run`` launches the kernels
without allocating (pass ``out``) or synchronising. With ``device="cpu"`` it calls
``KVCache.attend`` of the core reference per sequence. Build the kernels with
``python -m mosaickv.ops.compile`` (never done on import).
"""

import torch

from mosaickv.core import KVCache
from mosaickv.ops._ext import built_library, load
from mosaickv.ops.kernels import (
    STAGE_ALL,
    append_dense_rows,
    append_encode,
    append_encode_,
    append_encode_reference,
    append_to_pools,
    decode_,
    decode_args,
    encode_into_,
    encode_side,
    run_decode,
)
from mosaickv.ops.layout import (
    APPEND_COLS,
    FLAT_COLS,
    STRIPE_COLS,
    AppendPools,
    DecodeLayout,
    DecodeWorkspace,
    FlatPools,
    auto_piece_blocks,
    n_select,
    paged_tables,
    round_up8,
)


def cuda_available() -> bool:
    """True when a CUDA GPU and the compiled extension are both present."""
    return load() is not None


class DecodePlan:
    """Decode attention over a batch of caches of one layer (plan once, run many).

    Args:
        caches: B caches (mosaic or quest), same H_kv, D, dtype and block size.
        device: "cuda" runs the kernels; "cpu" runs the core reference (on the caches' own device).
            Caches that attend every block (token_ratio 1) always run the core reference: the
            kernels' path selects blocks.
        piece_blocks: selected blocks per attention CTA (flash-decoding split size); None: chosen
            from the work (``auto_piece_blocks``).
    """

    def __init__(
        self, caches: list[KVCache], device: torch.device | str, piece_blocks: int | None = None
    ) -> None:
        self.caches = caches
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.layout: DecodeLayout | None = None
        self.workspace: DecodeWorkspace | None = None
        self.gqa_group = 0
        self.piece_blocks = piece_blocks
        if self.device.type == "cuda" and all(c.method.selects_blocks for c in caches):
            self.layout = DecodeLayout.from_caches(caches, self.device)

    def run(
        self,
        q: torch.Tensor,
        scale: float | None = None,
        out: torch.Tensor | None = None,
        stages: int = STAGE_ALL,
    ) -> torch.Tensor:
        """q: [B, H_q, D] post-RoPE -> [B, H_q, D] in q's dtype; scale defaults to D ** -0.5."""
        if q.dim() != 3 or q.shape[0] != len(self.caches):
            raise ValueError(f"q must be [B = {len(self.caches)}, H_q, D], got shape {tuple(q.shape)}")
        if self.layout is None:
            return torch.stack([c.attend(q[b], scale) for b, c in enumerate(self.caches)])
        lay = self.layout
        if q.shape[1] % lay.n_kv_heads or q.shape[2] != lay.head_dim or q.device != self.device:
            raise ValueError(
                f"q must be [B, a multiple of {lay.n_kv_heads}, {lay.head_dim}] on {self.device}, "
                f"got {tuple(q.shape)} on {q.device}"
            )
        g = q.shape[1] // lay.n_kv_heads
        if self.workspace is None or g != self.gqa_group:
            self.workspace = DecodeWorkspace.plan(lay, g, self.piece_blocks)
            self.gqa_group = g
        ws = self.workspace
        out = torch.empty_like(q) if out is None else out
        sc = lay.head_dim**-0.5 if scale is None else float(scale)
        return run_decode(lay, ws, q.contiguous(), out, sc, stages)


__all__ = [
    "APPEND_COLS",
    "FLAT_COLS",
    "STAGE_ALL",
    "STRIPE_COLS",
    "AppendPools",
    "DecodeLayout",
    "DecodePlan",
    "DecodeWorkspace",
    "FlatPools",
    "append_dense_rows",
    "append_encode",
    "append_encode_",
    "append_encode_reference",
    "append_to_pools",
    "auto_piece_blocks",
    "built_library",
    "cuda_available",
    "decode_",
    "decode_args",
    "encode_into_",
    "encode_side",
    "n_select",
    "paged_tables",
    "round_up8",
    "run_decode",
]
