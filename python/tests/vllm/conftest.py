"""Tests that run inside vLLM 0.33.0's own environment (created by scripts/setup-vllm.mjs, run by
scripts/test-vllm.mjs). The main .venv has no vLLM (its torch pin clashes), so there this directory
is not collected at all; scripts/test-vllm.mjs runs it where vLLM is installed.

vLLM's PyPI wheel is a CUDA build; on a machine without a GPU it finds no platform and
``VllmConfig()`` fails ("Failed to infer device type"). VLLM_TARGET_DEVICE=cpu selects vLLM's CPU
platform (its Python side runs from the CUDA wheel; its C++ kernels, vllm._C, are absent and none is
needed here), which is how these tests get a real VllmConfig on CPU.
"""

import importlib.metadata
import os

# By distribution, not by import: pytest puts python/tests on sys.path, where this very directory
# passes for a namespace package named "vllm".
try:
    importlib.metadata.version("vllm")
except importlib.metadata.PackageNotFoundError:
    collect_ignore_glob = ["test_*.py"]

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
# Small segments and a small window so a few hundred tokens exercise sinks, several segments,
# block selection and decode segments closing; on the core path, whose reference the tests compare
# with exactly (the manager's temporary segment differs by design while tokens are pending).
SMALL = ('{"keep_ratio": 0.25, "group": 1, "token_ratio": 0.25, "block_size": 8, "n_sink": 4, '
         '"window": 8, "segment_len": 16, "summary": "minmax", "cache": "core"}')
os.environ.setdefault("MOSAICKV_VLLM_CONFIG", SMALL)
