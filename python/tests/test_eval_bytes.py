"""bench/accuracy/kv_breakdown.py: the per-component byte accounting behind the accuracy tables, checked
against sizes worked out by hand from the packed format (docs/FORMAT.md), on a real mosaic encode."""

import importlib.util
from pathlib import Path
from types import ModuleType

import torch

from mosaickv.core import make_method

ROOT = Path(__file__).resolve().parents[2]


def _breakdown_module() -> ModuleType:  # a bench script, not a package module: loaded by path
    path = ROOT / "bench" / "accuracy" / "kv_breakdown.py"
    spec = importlib.util.spec_from_file_location("kv_breakdown", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mosaic_breakdown_matches_hand_count() -> None:
    t, h, d, f32 = 300, 2, 32, 4
    gen = torch.Generator().manual_seed(0)
    k, v = torch.randn(t, h, d, generator=gen), torch.randn(t, h, d, generator=gen)
    cache = make_method(
        "mosaic", keep_ratio=0.25, token_ratio=1.0, n_sink=4, window=64, segment_len=1024
    ).encode(k, v)
    parts = _breakdown_module().breakdown(cache)
    compressed = t - 4 - 64  # one segment: everything between the sinks and the recent window
    assert parts == {
        "dense sinks + window": 2 * (4 + 64) * h * d * f32,  # K and V, dense
        "rotations": 2 * h * d * d * f32,  # one float32 D x D rotation per head, K and V
        "kept values": 2 * compressed * h * (d // 4) * f32,  # keep 0.25 of 32 = 8 elements per vector
        "bitmaps": 2 * compressed * h * 4,  # one uint32 word covers 32 positions
    }
    assert sum(parts.values()) == cache.nbytes
