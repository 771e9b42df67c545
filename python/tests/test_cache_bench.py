"""bench/decode/bench_decode.py --smoke: the H200 decode benchmark's harness, run on the CPU at tiny
shapes (model, both backends, manager probe, capacity, JSON). Its timings are not checked: they
say nothing about the GPU."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_decode_bench_smoke(tmp_path: Path) -> None:
    out = tmp_path / "decode.json"
    cmd = [
        sys.executable,
        str(ROOT / "bench" / "decode" / "bench_decode.py"),
        "--smoke",
        "--out",
        str(out),
        "--contexts",
        "256",
        "--batches",
        "1",
        "2",
        "--repeats",
        "1",
        "--manager-steps",
        "70",
        "--manager-segment-len",
        "32",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    doc = json.loads(out.read_text())
    rows = doc["decode"]
    assert sorted((r["batch"], r["backend"]) for r in rows) == [
        (1, "mosaickv"),
        (1, "stock"),
        (2, "mosaickv"),
        (2, "stock"),
    ]
    assert all(r["ms"] > 0 and r["fits"] for r in rows)
    # dense fp32 K+V per token and layer: 2 * H_kv * D * 4 bytes at the smoke shape (2 KV heads, D 64)
    stock = next(r for r in rows if r["backend"] == "stock")
    assert stock["bytes_per_token_layer"] == 2 * 2 * 64 * 4
    assert doc["capacity"]["context_ratio"] > 1.0  # packed rows are smaller than dense ones
    for probe in doc["manager_overhead"]:
        # 70 steps, a 64-token window, 32-token segments: at least one close per (request, layer)
        assert probe["reencodes"] >= probe["batch"] * doc["shape"]["layers"]
        assert probe["backlog_peak"] <= probe["backlog_limit"]
        assert probe["append_ms_per_step"] > 0


def test_manager_step_bench_smoke(tmp_path: Path) -> None:
    """bench/decode/bench_manager_step.py --smoke: whole steps through the manager against the core
    reference over the same snapshots, two batches, the decode thread's profile, the timed phases of
    the evictions (``--phases``) and the re-encoder time in each step's first layers."""
    out = tmp_path / "step.json"
    script = ROOT / "bench" / "decode" / "bench_manager_step.py"
    cmd = [sys.executable, str(script), "--smoke", "--out", str(out), "--batches", "1", "2", "--profile"]
    cmd += ["--evict-tokens", "8", "--phases", "8"]  # its steps then evict (the default 256 would not)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["batch"] for r in rows] == [1, 2]
    for r in rows:
        eager = r["eager"]
        assert len(eager["manager_ms_steps"]) == r["steps"] and min(eager["manager_ms_steps"]) > 0
        assert eager["kernels_ms_mean"] > 0 and "piecewise" not in r  # CUDA graphs only on a GPU
        assert "the decode thread" in r["profile"] and "attend" in r["profile"]
        assert r["backlog_peak"] > 0 and r["stalls"] == 0
        assert len(eager["reencode_ms_in_layers_0_7_steps"]) == r["steps"]
        phases = {p["phase"].strip(): p for p in r["phases"]}
        assert phases["manager._moving_out (one eviction)"]["calls"] > 0  # 8 steps hold evictions
        assert r["deferred_evictions"] > 0


def test_paging_bench_smoke(tmp_path: Path) -> None:
    """bench/decode/bench_paging.py on the CPU at a small segment: every stage runs, the segment
    is paged into whole pages (4 KiB) that hold at least its bytes."""
    out = tmp_path / "paging.json"
    script = ROOT / "bench" / "decode" / "bench_paging.py"
    cmd = [sys.executable, str(script), "--device", "cpu", "--tokens", "2048", "--repeats", "1"]
    cmd += ["--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    row = json.loads(out.read_text())["row"]
    assert set(row["ms"]) == {"encode", "page", "gather", "copy", "prefill", "share", "evict_pages"}
    assert min(row["ms"].values()) > 0
    assert row["pages"] * row["page_bytes"] >= row["segment_bytes"] > 0
