import cProfile, pstats, time, torch, statistics
from mosaickv.cache import CacheConfig, CacheManager
from mosaickv.cache.tables import snapshot_layout
from mosaickv.core import make_method
import importlib.util, sys
spec = importlib.util.spec_from_file_location("b", "bench/decode/bench_manager_attend.py"); b = importlib.util.module_from_spec(spec); spec.loader.exec_module(b)
dev = torch.device("cuda")
mgr = CacheManager(make_method("mosaic", **b.METHOD), 1, 8, 128, torch.bfloat16, dev, CacheConfig(page_bytes=4096, evict_tokens=8))
rids = [f"s{i}" for i in range(8)]
for r in rids:
    mgr.add_request(r); k = torch.randn(131072, 8, 128, device=dev, dtype=torch.bfloat16); mgr.prefill(r, 0, k, torch.randn_like(k))
q = torch.randn(8, 32, 128, device=dev, dtype=torch.bfloat16); nk = torch.randn(1, 8, 128, device=dev, dtype=torch.bfloat16)
mgr.attend(rids, 0, q)
pr = cProfile.Profile()
ts = []
for step in range(16):
    for r in rids: mgr.append(r, 0, nk, nk)
    torch.cuda.synchronize(); t = time.perf_counter()
    pr.enable(); mgr.attend(rids, 0, q); torch.cuda.synchronize(); pr.disable()
    ts.append((time.perf_counter() - t) * 1e3)
print("attend ms per step:", [round(x, 2) for x in ts])
pstats.Stats(pr).sort_stats("cumulative").print_stats(18)
mgr.close()
