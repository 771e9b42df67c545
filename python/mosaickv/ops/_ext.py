"""Locating the compiled CUDA extension. Nothing is ever compiled on import: the extension is built
by ``python -m mosaickv.ops.compile`` on a GPU machine, and loaded here only if that file exists and
CUDA is available."""

import importlib.util
from pathlib import Path
from types import ModuleType

import torch

EXT_NAME = "mosaickv_cuda"
BUILD_DIR = Path(__file__).resolve().parent / "build"

_loaded: ModuleType | None = None


def built_library() -> Path | None:
    """Path of the compiled extension, or None when it has not been built here."""
    found = sorted(BUILD_DIR.glob(f"{EXT_NAME}*.so"))
    return found[0] if found else None


def load() -> ModuleType | None:
    """The extension module, or None without CUDA or without a build."""
    global _loaded
    if _loaded is not None:
        return _loaded
    lib = built_library()
    if lib is None or not torch.cuda.is_available():
        return None
    spec = importlib.util.spec_from_file_location(EXT_NAME, lib)
    if spec is None or spec.loader is None:
        return None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    _loaded = module
    return module


def require() -> ModuleType:
    """The extension, or a clear error saying how to get it."""
    module = load()
    if module is None:
        if not torch.cuda.is_available():
            raise RuntimeError(
                "the MosaicKV CUDA kernels need a CUDA GPU; on CPU use mosaickv.core "
                "(the ops fall back to it automatically for CPU tensors)"
            )
        raise RuntimeError(
            f"the MosaicKV CUDA extension is not built in {BUILD_DIR}; build it once with "
            "`python -m mosaickv.ops.compile` (needs nvcc and ninja)"
        )
    return module
