"""Build the MosaicKV CUDA extension: ``python -m mosaickv.ops.compile [--arch 9.0a]``.

Compiles cuda/*.cu and cuda/torch_binding.cpp with torch's extension builder (ninja) into
python/mosaickv/ops/build/. Machine code for sm_90a (H100/H200) plus PTX for compute_90, which the
driver JIT-compiles on newer architectures; ``--arch`` adds another target (e.g. 8.0 for A100).
"""

import argparse
import os
import time
from pathlib import Path

from mosaickv.ops._ext import BUILD_DIR, EXT_NAME

CUDA_DIR = Path(__file__).resolve().parents[3] / "cuda"
SOURCES = [
    "torch_binding.cpp",
    "encode.cu",
    "decode_bf16.cu",
    "decode_fp16.cu",
    "dispatch.cu",
    "dense_rows.cu",
]


def gencode_flags(extra_arch: list[str]) -> list[str]:
    flags = ["-gencode=arch=compute_90a,code=sm_90a", "-gencode=arch=compute_90,code=compute_90"]
    for arch in extra_arch:
        num = arch.replace(".", "")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
    return flags


def build(extra_arch: list[str], verbose: bool) -> Path:
    from torch.utils.cpp_extension import load

    missing = [s for s in SOURCES if not (CUDA_DIR / s).is_file()]
    if missing:
        raise FileNotFoundError(f"CUDA sources not found in {CUDA_DIR}: {missing}")
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 4))
    start = time.time()
    load(
        name=EXT_NAME,
        sources=[str(CUDA_DIR / s) for s in SOURCES],
        extra_include_paths=[str(CUDA_DIR)],
        extra_cflags=["-O3", "-std=c++17"],
        extra_cuda_cflags=[
            "-O3",
            "-std=c++17",
            "--expt-relaxed-constexpr",
            "--extended-lambda",
            *gencode_flags(extra_arch),
        ],
        build_directory=str(BUILD_DIR),
        verbose=verbose,
    )
    built = next(BUILD_DIR.glob(f"{EXT_NAME}*.so"))
    print(f"built {built} in {time.time() - start:.0f} s")
    return built


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", action="append", default=[], help="extra SM target such as 8.0 or 10.0")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    build(args.arch, args.verbose)


if __name__ == "__main__":
    main()
