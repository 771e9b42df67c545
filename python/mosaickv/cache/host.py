"""Host copies of the raw K/V of pending tokens (they left the dense window; the CPU re-encoders
fold them and encode the next segment from them), in fixed-size chunks that one pool per manager
hands out and takes back. Pinned when the cache lives on CUDA, so the decode thread's copies to
them are asynchronous."""

from __future__ import annotations

import threading
from collections.abc import Iterable

import torch

SPARE_CHUNKS = 8
"""Free chunks ``HostChunks.top_up`` keeps ready: a step at batch 8 evicts a few (sequence, layer)
caches at most, one chunk each, and the re-encoders top up after every job."""


class HostChunks:
    """Chunks of ``rows`` token rows of K and V, [2, rows, H_kv, D], reused across the streams of
    a manager.

    Pinning host memory (cudaHostAlloc) takes about a millisecond per megabyte: a growing buffer
    that pinned memory on the decode thread added that to its step. ``top_up`` (the manager at
    start, the re-encoders after each job) keeps ``spare`` free (``CacheConfig.host_spare_chunks``),
    so ``take`` on the decode thread finds one; it allocates itself only when they have run out.
    """

    def __init__(
        self, rows: int, n_heads: int, dim: int, dtype: torch.dtype, pin: bool, spare: int = SPARE_CHUNKS
    ) -> None:
        self.rows, self.spare = rows, spare
        self.shape, self.dtype, self.pin = (2, rows, n_heads, dim), dtype, pin
        self.chunk_bytes = 2 * rows * n_heads * dim * torch.empty(0, dtype=dtype).element_size()
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()
        self.allocated = 0

    def _new(self) -> torch.Tensor:
        with torch.inference_mode():  # as the manager's other tensors (written in and out of the mode)
            return torch.empty(self.shape, dtype=self.dtype, pin_memory=self.pin)

    def take(self) -> torch.Tensor:
        with self._lock:
            if self._free:
                return self._free.pop()
            self.allocated += 1
        return self._new()

    def give(self, chunks: Iterable[torch.Tensor]) -> None:
        """Chunks no reader needs any more (their device-to-host copies may still be queued: a later
        owner's copies queue behind them on the same stream)."""
        with self._lock:
            self._free.extend(chunks)

    def top_up(self) -> None:
        """Allocate until ``spare`` chunks are free (off the decode thread)."""
        while True:
            with self._lock:
                if len(self._free) >= self.spare:
                    return
                self.allocated += 1
            chunk = self._new()
            with self._lock:
                self._free.append(chunk)

    @property
    def nbytes(self) -> int:
        """Bytes allocated, held by streams or free."""
        return self.allocated * self.chunk_bytes


class HostBuffer:
    """The pending tokens of one (request, layer) cache: absolute token ``i`` (start <= i < end) is
    row ``(i - base) % rows`` of ``chunks[(i - base) // rows]``.

    Rows are never overwritten or moved, so rows [a, b) with start <= a <= b <= end may be read
    without the stream's lock while the decode thread appends; ``release_before`` gives back the
    chunks below a new start (the re-encoder that moved it read them last).
    """

    def __init__(self, pool: HostChunks) -> None:
        self.pool = pool
        self.chunks: list[torch.Tensor] = []
        self.base = self.start = self.end = 0

    def reset(self, at: int) -> None:
        """Empty, the next pushed token being ``at``."""
        self.pool.give(self.chunks)
        self.chunks = []
        self.base = self.start = self.end = at

    def push(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append k, v: [t, H_kv, D] (any device) at absolute index ``end``."""
        rows, done, t = self.pool.rows, 0, k.shape[0]
        while done < t:
            i, r = divmod(self.end - self.base, rows)
            if i == len(self.chunks):
                self.chunks.append(self.pool.take())
            n = min(t - done, rows - r)
            chunk = self.chunks[i]
            chunk[0, r : r + n].copy_(k[done : done + n], non_blocking=self.pool.pin)
            chunk[1, r : r + n].copy_(v[done : done + n], non_blocking=self.pool.pin)
            done += n
            self.end += n

    def rows(self, a: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw tokens [a, b) (absolute): k, v [b - a, H_kv, D]; views within one chunk, else a copy."""
        rows = self.pool.rows
        parts = []
        while a < b:
            i, r = divmod(a - self.base, rows)
            n = min(b - a, rows - r)
            parts.append(self.chunks[i][:, r : r + n])
            a += n
        if not parts:
            _, _, h, d = self.pool.shape
            return (torch.empty(0, h, d, dtype=self.pool.dtype),) * 2
        both = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        return both[0], both[1]

    def release_before(self, start: int) -> None:
        """Tokens before ``start`` are encoded: give back the chunks that hold only those."""
        self.start = start
        whole = (start - self.base) // self.pool.rows
        if whole > 0:
            self.pool.give(self.chunks[:whole])
            del self.chunks[:whole]
            self.base += whole * self.pool.rows

    @property
    def nbytes(self) -> int:
        return len(self.chunks) * self.pool.chunk_bytes
