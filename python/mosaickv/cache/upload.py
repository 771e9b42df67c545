"""Host-to-device copies of the small tables the decode path builds on the host (page tables,
row addresses, lengths), made so that the host never waits for the device."""

from __future__ import annotations

import numpy as np
import torch


def to_device(x: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """``x`` (host memory) copied to ``device``, queued on the current stream without waiting for
    it. A blocking copy would wait for every kernel queued before it (the decode thread runs ahead
    of the GPU). The copy reads pageable memory: the driver stages it before returning, so ``x``
    may go at once. Staging through ``pin_memory()`` first measured slower on the H200
    (bench/decode/README.md, "Decode steps that never wait")."""
    t = torch.from_numpy(x) if isinstance(x, np.ndarray) else x
    return t.to(device, non_blocking=device.type == "cuda")
