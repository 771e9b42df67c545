"""Compressed paged KV cache with CPU re-encoding (DESIGN.md section 2, docs/CACHE.md).

One manager serves every engine; an engine adapter calls, per layer and request::

    from mosaickv.cache import CacheConfig, CacheManager
    mgr = CacheManager.for_model(model.config, torch.bfloat16, "cuda", CacheConfig(), keep_ratio=0.25)
    mgr.add_request(rid)                   # or add_request(rid, methods): one mosaic method per layer
    mgr.prefill(rid, layer, k, v, token_ids=ids)  # prompt K/V [T, H_kv, D] post-RoPE -> pages;
                                           # token_ids (optional) shares segments of a common prefix
    mgr.append(rid, layer, k_new, v_new)   # decode K/V [t, H_kv, D]: window + temporary segment
    out = mgr.attend([rid, ...], layer, q) # q [B, H_q, D] -> [B, H_q, D], one snapshot per request
    mgr.fork(rid, rid2)                    # share closed segments with a new request (n > 1)
    mgr.free(rid)                          # every page back to the pool
    mgr.stats(); mgr.request_stats(rid)    # flat str -> number maps for `stats` and /metrics
    mgr.close()                            # stop the CPU threads

Pieces: ``pages`` (page pool, own or over caller memory; rows of one stripe per page; blobs),
``segments`` (closed segments, snapshot), ``temp`` (the temporary segment, its append kernel and
device tables), ``tables`` (the kernels' tables over a batch of snapshots), ``stream`` (one
request x layer: decode-side append, CPU-side close and swap), ``manager`` (requests, CPU thread
pool, backlog bound, accounting).
"""

from mosaickv.cache.host import HostBuffer, HostChunks
from mosaickv.cache.manager import CacheConfig, CacheManager, default_threads
from mosaickv.cache.pages import CacheFull, PagedBlob, PagedStripe, PagePool
from mosaickv.cache.segments import PagedSegment, Snapshot
from mosaickv.cache.stream import Stream
from mosaickv.cache.temp import TempSegment, TempStrategy

__all__ = [
    "CacheConfig",
    "CacheFull",
    "CacheManager",
    "HostBuffer",
    "HostChunks",
    "PagePool",
    "PagedBlob",
    "PagedSegment",
    "PagedStripe",
    "Snapshot",
    "Stream",
    "TempSegment",
    "TempStrategy",
    "default_threads",
]
