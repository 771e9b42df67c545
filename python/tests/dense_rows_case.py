"""One case of ``append_dense_rows`` for the CUDA kernel (test_ops_gpu.py) and its CPU reference
(test_ops.py): four sequences' buffers [2, H, cap, D], one written at row 0, one marked skip, one
at its last row, one full."""

import torch

from mosaickv.ops import append_dense_rows


def check_dense_rows_case(device: str) -> None:
    """One call appends k[b], v[b] as row lengths[b] of each sequence's own buffer and advances
    lengths[b]; a sequence marked skip is left alone and its mark cleared; a full buffer is never
    written past. Expectations are plain torch writes."""
    gen = torch.Generator().manual_seed(11)
    k, v = (torch.randn(4, 2, 64, generator=gen).to(torch.float16).to(device) for _ in range(2))
    bufs = [torch.zeros(2, 2, 6, 64, dtype=torch.float16, device=device) for _ in range(4)]
    rows = torch.tensor([[x[0].data_ptr() for x in bufs], [x[1].data_ptr() for x in bufs]], device=device)
    lengths = torch.tensor([0, 3, 5, 6], dtype=torch.int32, device=device)
    skip = torch.tensor([0, 1, 0, 0], dtype=torch.int32, device=device)
    append_dense_rows(k, v, rows, lengths, skip, 6)
    if device == "cuda":
        torch.cuda.synchronize()
    assert lengths.tolist() == [1, 3, 6, 6] and skip.tolist() == [0, 0, 0, 0]
    want = [torch.zeros_like(x) for x in bufs]
    for b, r in ((0, 0), (2, 5)):
        want[b][0, :, r], want[b][1, :, r] = k[b], v[b]
    for got, expected in zip(bufs, want, strict=True):
        assert torch.equal(got, expected)
