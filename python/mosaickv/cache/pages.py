"""Fixed-size pages of packed rows (docs/CACHE.md has the layout and the fragmentation numbers).

A *stripe* is one segment x one KV head x K-or-V: S rows of the same size, because a stripe has one
keep count k_h and one group g. A page holds ``rows_per_page`` rows of exactly one stripe, structure
of arrays: ``[bitmaps: n x W uint32 | pad to 16 B | values: n x round_up8(k_h) storage dtype]``
(the kernels' values row stride, mosaickv.ops.layout), so a row never straddles pages and both
arrays start 16-byte aligned. n is a multiple of the token block size B, so a selection block is
always read from one page. Row r
of a stripe lives at slot ``r % rows_per_page`` of ``pages[r // rows_per_page]``: a page table plus
arithmetic, like vLLM's block table. Variable keep counts only change rows per page; the waste is
the page remainder (< one row + 16 B) plus the unused slots of a stripe's last page.
"""

from __future__ import annotations

import copy
import threading
from array import array
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from mosaickv.core import bitmap_words
from mosaickv.ops.layout import round_up8

ROW_ALIGN = 16


def _align(n: int) -> int:
    return -(-n // ROW_ALIGN) * ROW_ALIGN


class CacheFull(RuntimeError):
    """The page pool reached ``max_pages``; free requests or raise the limit."""


class PagePool:
    """Pages of ``page_bytes`` bytes on one device, reference counted.

    The pool either grows by device allocations of ``chunk_pages`` pages (up to ``max_pages``), or,
    given ``storage``, carves every page out of memory its caller owns and never allocates: vLLM's
    KV cache, so that MosaicKV's packed bytes live in the pages vLLM sized for them.

    Args:
        page_bytes: bytes per page (a multiple of 16, >= 256).
        device: where the pages live.
        chunk_pages: pages per backing allocation (the pool grows a chunk at a time).
        max_pages: upper bound on pages ever reserved, None for no bound.
        storage: caller-owned memory, each tensor [n_blocks, block_bytes] uint8 (rows may be
            strided: vLLM interleaves layers); every block is cut into block_bytes // page_bytes
            pages. All tensors must have the same shape.
    """

    def __init__(
        self,
        page_bytes: int,
        device: torch.device,
        chunk_pages: int = 256,
        max_pages: int | None = None,
        storage: Sequence[torch.Tensor] = (),
    ) -> None:
        if page_bytes < 256 or page_bytes % ROW_ALIGN:
            raise ValueError(f"page_bytes must be a multiple of {ROW_ALIGN} and >= 256, got {page_bytes}")
        if chunk_pages < 1 or (max_pages is not None and max_pages < 1):
            raise ValueError(f"chunk_pages and max_pages must be >= 1, got {chunk_pages}, {max_pages}")
        self.page_bytes = page_bytes
        self.device = device
        # A chunk is [rows, pages_per_row, page_bytes]: own chunks have one page per row, caller
        # storage has one row per block.
        self._chunks: list[torch.Tensor] = []
        # page ids live in arrays, not lists: a full garbage collection walks every element of a list
        # (millions of page ids at long contexts: a 200 ms pause in a decode step), never an array's
        self._free = array("q")
        self._refs = np.zeros(0, dtype=np.int32)  # owners of each page id (0: free)
        self._used = 0
        self._lock = threading.Lock()
        self._chunk_addr = np.zeros((0, 3), dtype=np.int64)  # per chunk: address, row stride, pages per row
        self.external = bool(storage)
        if storage:
            self._adopt(storage)
            self.chunk_pages = self._chunks[0].shape[0] * self._chunks[0].shape[1]
            self.max_pages: int | None = self.chunk_pages * len(self._chunks)
            self._free.extend(range(self.max_pages - 1, -1, -1))
            self._refs = np.zeros(self.max_pages, dtype=np.int32)
        else:
            self.chunk_pages = chunk_pages if max_pages is None else min(chunk_pages, max_pages)
            self.max_pages = max_pages

    def _adopt(self, storage: Sequence[torch.Tensor]) -> None:
        shape = storage[0].shape
        for t in storage:
            if t.dim() != 2 or t.dtype != torch.uint8 or t.shape != shape or t.stride(1) != 1:
                raise ValueError(
                    "storage must be [n_blocks, block_bytes] uint8 tensors of one shape with "
                    f"contiguous rows, got {tuple(t.shape)} {t.dtype} strides {t.stride()}"
                )
            if t.device != self.device:
                raise ValueError(f"storage is on {t.device}, the pool on {self.device}")
        per_block = shape[1] // self.page_bytes
        if per_block < 1:
            raise ValueError(f"a storage block of {shape[1]} B holds no page of {self.page_bytes} B")
        self._chunks = [
            t[:, : per_block * self.page_bytes].unflatten(1, (per_block, self.page_bytes)) for t in storage
        ]

    @property
    def reserved_pages(self) -> int:
        """Pages backed by device memory (used or free)."""
        return len(self._chunks) * self.chunk_pages

    @property
    def used_pages(self) -> int:
        return self._used

    def allocate(self) -> int:
        """A fresh page id with reference count 1."""
        return int(self.allocate_many(1)[0])

    def allocate_many(self, n: int) -> np.ndarray:
        """n fresh page ids (int64, reference count 1), all or none (``CacheFull``), in ascending
        order: pages that neighbour in memory then sit side by side in the caller's table, so
        ``runs`` writes them with one copy even after frees have shuffled the free list."""
        if n <= 0:
            return np.zeros(0, dtype=np.int64)
        with self._lock:
            while len(self._free) < n:
                self._grow()
            pages = np.sort(np.array(self._free[-n:], dtype=np.int64))
            del self._free[-n:]
            self._refs[pages] = 1
            self._used += n
            return pages

    def _grow(self) -> None:
        if self.external:
            raise CacheFull(
                f"all {self.max_pages} pages of {self.page_bytes} B in the engine's KV cache are in "
                "use: the requests hold more packed bytes than the engine sized its blocks for "
                "(early segment closes, partly filled pages); lower --max-num-seqs or raise "
                "arena_reserve in MOSAICKV_VLLM_CONFIG"
            )
        n = self.chunk_pages
        if self.max_pages is not None:
            n = min(n, self.max_pages - self.reserved_pages)
            if n <= 0:
                raise CacheFull(
                    f"page pool is full: {self.max_pages} pages of {self.page_bytes} B are in use; "
                    "free finished requests or raise max_pages"
                )
        base = self.reserved_pages
        chunk = torch.empty(self.chunk_pages, self.page_bytes, dtype=torch.uint8, device=self.device)
        self._chunks.append(chunk.unsqueeze(1))
        self._free.extend(range(base + n - 1, base - 1, -1))
        if self.reserved_pages > len(self._refs):  # doubled: growing by a chunk would copy it per chunk
            grown = np.zeros(max(2 * len(self._refs), self.reserved_pages), dtype=np.int32)
            grown[: len(self._refs)] = self._refs
            self._refs = grown

    # Owners are counted for whole arrays of page ids at once: a 128K-token request holds about 1.4M
    # pages over 32 layers, so a fork or a free page by page took about a second of Python.
    def owners(self, pages: Sequence[int]) -> np.ndarray:
        """Reference counts of ``pages`` (int32; 0 for a free page)."""
        with self._lock:
            return self._refs[page_ids(pages)]

    def share(self, pages: Sequence[int]) -> None:
        """One more owner of each of ``pages`` (distinct allocated ids; a fork, prefix sharing)."""
        ids = page_ids(pages)
        with self._lock:
            self._check_owned(ids)
            self._refs[ids] += 1

    def release(self, pages: Sequence[int]) -> None:
        """Drop one owner of each of ``pages`` (distinct allocated ids); a page returns to the free
        list with its last owner."""
        ids = page_ids(pages)
        with self._lock:
            self._check_owned(ids)
            self._refs[ids] -= 1
            freed = ids[self._refs[ids] == 0]
            self._free.frombytes(freed.tobytes())
            self._used -= len(freed)

    def _check_owned(self, ids: np.ndarray) -> None:
        """Distinct and allocated (caller holds the lock): a page freed twice would corrupt the free list."""
        if len(ids) and (
            ids.min() < 0
            or ids.max() >= len(self._refs)
            or not self._refs[ids].all()
            or len(np.unique(ids)) < len(ids)
        ):
            raise ValueError(
                f"pages shared or released must be distinct allocated ids (freed twice?), got {ids}"
            )

    def addresses(self, pages: Sequence[int]) -> np.ndarray:
        """Device byte addresses of ``pages`` (int64), for the kernels' page tables."""
        ids = page_ids(pages)
        with self._lock:
            known = len(self._chunk_addr)
            if known != len(self._chunks):  # chunks were added: the table gains their rows only
                new = [(c.data_ptr(), c.stride(0), c.shape[1]) for c in self._chunks[known:]]
                self._chunk_addr = np.concatenate([self._chunk_addr, np.array(new, dtype=np.int64)])
            table = self._chunk_addr
        c, within = np.divmod(ids, self.chunk_pages)
        row, col = np.divmod(within, table[c, 2])
        return table[c, 0] + row * table[c, 1] + col * self.page_bytes

    def page(self, page: int) -> torch.Tensor:
        """The bytes of ``page``: [page_bytes] uint8 view into the pool."""
        chunk = self._chunks[page // self.chunk_pages]
        row, col = divmod(page % self.chunk_pages, chunk.shape[1])
        return chunk[row, col]

    def runs(self, pages: Sequence[int]) -> Iterator[tuple[int, int, torch.Tensor]]:
        """``pages`` cut into runs that one strided view covers: (start, end, [end - start,
        page_bytes] uint8 view of pages[start:end]). A run is consecutive page ids in one chunk row
        (own chunks have one page per row and evenly strided rows), so a fresh chunk's pages, which
        are handed out in order, are written with one copy instead of one per page."""
        ids = page_ids(pages)
        if not len(ids):
            return
        per_row = self._chunks[0].shape[1]  # one shape for every chunk
        chunk, within = np.divmod(ids, self.chunk_pages)
        row, col = np.divmod(within, per_row)
        cut = (np.diff(ids) != 1) | (np.diff(chunk) != 0)
        if per_row > 1:  # caller blocks: a run ends with its block
            cut |= np.diff(row) != 0
        ends = np.append(np.flatnonzero(cut) + 1, len(ids))
        start = 0
        for end in ends.tolist():
            c, r, k = self._chunks[int(chunk[start])], int(row[start]), int(col[start])
            yield start, end, c[r, k : k + end - start] if per_row > 1 else c[r : r + end - start, 0]
            start = end


def page_ids(pages: Sequence[int]) -> np.ndarray:
    """Page ids as int64 numpy (a view of an ``array("q")``, a copy of anything else)."""
    if isinstance(pages, array):
        return np.frombuffer(pages, dtype=np.int64)
    return np.asarray(pages, dtype=np.int64).reshape(-1)


class PagedStripe:
    """The rows of one stripe, appended in token order into pages of a pool.

    Rows already written never change, so a reader that knows the stripe had ``n`` rows can read
    them while the writer appends more (the temporary segment relies on this).

    Args:
        pool: the page pool.
        dim: D. group: g. keep: k_h (a multiple of g). dtype: storage dtype of the values.
        block: rows per page are a multiple of this (the selection block size B).
    """

    def __init__(
        self, pool: PagePool, dim: int, group: int, keep: int, dtype: torch.dtype, block: int = 1
    ) -> None:
        self.pool = pool
        self.dim, self.group, self.keep, self.dtype, self.block = dim, group, keep, dtype, block
        self.words = bitmap_words(dim, group)
        self.stride = round_up8(keep)
        elem = torch.empty(0, dtype=dtype).element_size()
        self.bitmap_bytes, self.value_bytes = 4 * self.words, keep * elem
        self.value_row_bytes = self.stride * elem  # a values row with its padding
        n = pool.page_bytes // (self.bitmap_bytes + self.stride * elem) // block * block
        while n and _align(n * self.bitmap_bytes) + n * self.stride * elem > pool.page_bytes:
            n -= block
        if n <= 0:
            raise ValueError(
                f"{block} row(s) of {self.bitmap_bytes + self.stride * elem} B do not fit a page "
                f"of {pool.page_bytes} B; raise page_bytes"
            )
        self.rows_per_page = n
        self.values_offset = _align(n * self.bitmap_bytes)
        self.pages = array("q")  # page ids (an array: see PagePool._free)
        self.length = 0

    @property
    def used_bytes(self) -> int:
        """Bytes of real row data (bitmap + values, without padding)."""
        return self.length * (self.bitmap_bytes + self.value_bytes)

    def append(self, values: torch.Tensor, bitmap: torch.Tensor) -> None:
        """Write rows at the end.

        Args:
            values: [n, keep] storage dtype. bitmap: [n, W] uint32. Any device (copied to the pool's).
        """
        n = values.shape[0]
        if values.shape != (n, self.keep) or values.dtype != self.dtype or bitmap.shape[0] != n:
            raise ValueError(
                f"stripe rows must be values [n, {self.keep}] {self.dtype} and bitmap [n, W], "
                f"got {tuple(values.shape)} {values.dtype} and {tuple(bitmap.shape)}"
            )
        bits = bitmap.contiguous().view(torch.uint8).reshape(n, self.bitmap_bytes)
        per, done = self.rows_per_page, 0
        while done < n:  # the open page, then whole pages in runs, then the last, partial page
            slot = self.length % per
            if slot:  # rows up to the end of the open page
                m = min(n - done, per - slot)
                self._write(self.pool.page(self.pages[-1])[None], slot, m, values[done:], bits[done:])
            elif n - done >= per:  # whole fresh pages, one copy per run of them (PagePool.runs)
                m = (n - done) // per * per
                first = len(self.pages)
                self.pages.frombytes(self.pool.allocate_many(m // per).tobytes())
                for a, b, view in self.pool.runs(self.pages[first:]):
                    lo = done + a * per
                    self._write(view, 0, per, values[lo : lo + (b - a) * per], bits[lo : lo + (b - a) * per])
            else:  # the last rows start a fresh page
                m = n - done
                self.pages.append(self.pool.allocate())
                self._write(self.pool.page(self.pages[-1])[None], 0, m, values[done:], bits[done:])
            done += m
            self.length += m

    def _write(self, view: torch.Tensor, slot: int, m: int, values: torch.Tensor, bits: torch.Tensor) -> None:
        """Rows [slot, slot + m) of each page of ``view`` ([pages, page_bytes]) from the first
        pages x m rows of values [.., keep] and bits [.., bitmap_bytes] uint8; row padding zeroed
        (pages are reused, and the kernels read whole value rows)."""
        p = view.shape[0]
        view[:, slot * self.bitmap_bytes : (slot + m) * self.bitmap_bytes] = bits[: p * m].reshape(p, -1)
        rows = self._value_rows(view)[:, slot : slot + m]
        if self.stride != self.keep:
            rows[:, :, self.keep :] = 0
        rows[:, :, : self.keep] = values[: p * m].reshape(p, m, self.keep)

    def _value_rows(self, view: torch.Tensor) -> torch.Tensor:
        """The value rows of pages ``view`` ([pages, page_bytes]): [pages, rows_per_page, stride]."""
        lo, per = self.values_offset, self.rows_per_page
        region = view[:, lo : lo + per * self.value_row_bytes].view(self.dtype)
        return region.view(view.shape[0], per, self.stride)

    def grow(self, n: int) -> None:
        """Room for n more rows, written by a kernel through the page table (``cache.temp``): pages
        are allocated and the length grows now; the rows must be written before anything reads them."""
        grow_stripes([self], n)

    def pages_to_grow(self, n: int) -> int:
        """Pages that n more rows need beyond those held."""
        return -(-(self.length + n) // self.rows_per_page) - len(self.pages)

    def read(self, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The first n rows (all when None) gathered in order: values [n, keep], bitmap [n, W] uint32.

        A copy: the torch reference reads whole tensors; a kernel reads the pages through the page
        table instead.
        """
        n = self.length if n is None else n
        if not n:
            return (
                torch.empty(0, self.keep, dtype=self.dtype, device=self.pool.device),
                torch.empty(0, self.words, dtype=torch.uint32, device=self.pool.device),
            )
        per = self.rows_per_page
        bits, vals = [], []
        for _, _, view in self.pool.runs(self.pages[: -(-n // per)]):  # whole pages; cut to n below
            bits.append(view[:, : per * self.bitmap_bytes].reshape(-1))
            vals.append(self._value_rows(view)[:, :, : self.keep].reshape(-1, self.keep))
        bitmap = torch.cat(bits)[: n * self.bitmap_bytes].view(torch.uint32).view(n, self.words)
        return torch.cat(vals)[:n], bitmap

    def shared(self) -> PagedStripe:
        """Another owner of the same (closed, immutable) rows: pages are shared, not copied."""
        twin = PagedStripe(self.pool, self.dim, self.group, self.keep, self.dtype, self.block)
        self.pool.share(self.pages)
        twin.pages, twin.length = array("q", self.pages), self.length
        return twin

    def release(self) -> None:
        """Give every page back to the pool (once)."""
        self.pool.release(self.pages)
        self.pages = array("q")


class PagedBlob:
    """One immutable tensor's bytes in pages: a closed segment's rotations and block summaries, so
    that every byte a segment holds per token lives in the pool. ``read`` gathers it back (a copy).

    Same ownership surface as PagedStripe (pages, used_bytes, shared, release).
    """

    def __init__(self, pool: PagePool, x: torch.Tensor) -> None:
        self.pool, self.shape, self.dtype = pool, tuple(x.shape), x.dtype
        data = x.detach().contiguous().reshape(-1).view(torch.uint8).to(pool.device)
        self.used_bytes = data.numel()
        size = pool.page_bytes
        self.pages = array("q", pool.allocate_many(-(-self.used_bytes // size)).tobytes())
        for a, b, view in pool.runs(self.pages):  # one copy per run of pages; only the last is partial
            part = data[a * size : b * size]
            whole = part.numel() // size
            view[:whole] = part[: whole * size].view(whole, size)
            if whole < b - a:
                view[whole, : part.numel() - whole * size] = part[whole * size :]

    def read(self) -> torch.Tensor:
        """The tensor, gathered from its pages."""
        if not self.pages:
            return torch.empty(self.shape, dtype=self.dtype, device=self.pool.device)
        data = torch.cat([view.reshape(-1) for _, _, view in self.pool.runs(self.pages)])
        return data[: self.used_bytes].view(self.dtype).view(self.shape)

    def shared(self) -> PagedBlob:
        """Another owner of the same pages."""
        twin = copy.copy(self)
        self.pool.share(self.pages)
        twin.pages = array("q", self.pages)
        return twin

    def release(self) -> None:
        """Give every page back to the pool (once)."""
        self.pool.release(self.pages)
        self.pages = array("q")


Paged = PagedStripe | PagedBlob
"""Anything that owns pages of a pool."""


def grow_stripes(stripes: Sequence[PagedStripe], n: int) -> None:
    """``PagedStripe.grow(n)`` for stripes of one pool, with one allocation for all their new pages
    (a temporary segment's heads and sides, on the decode path)."""
    if not stripes:
        return
    need = [s.pages_to_grow(n) for s in stripes]
    new = stripes[0].pool.allocate_many(sum(need))
    at = 0
    for s, k in zip(stripes, need, strict=True):
        s.pages.frombytes(new[at : at + k].tobytes())
        s.length += n
        at += k
