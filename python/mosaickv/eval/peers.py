"""NVIDIA's kvpress (PyPI `kvpress`, Apache-2.0) as an outside peer, on our model and prompts.

kvpress 0.5.5 (the latest) declares transformers<5.3. With transformers 5.24 its hooks fail as they are:
5.x renamed the attention modules' ``past_key_values`` keyword to ``cache`` and stopped passing
``cache_position`` (kvpress reads both). ``pressed`` below feeds a press the two keywords under their
old names (``cache_position`` = the absolute ``position_ids`` of the forward pass, what it was), and
nothing else changes; python/tests/test_eval_peers.py checks the result. Install kvpress without its
pins:
``pip install --no-deps kvpress==0.5.5 'cachetools>=5.5.2,<6' datasets 'fire>=0.6,<0.7' peft``
(the last four are imported at kvpress's top level; none of them pulls another torch).

Methods are named ``kvpress:<press>``. A press compresses the cache inside the prefill forward pass
(hooks on the attention modules). Its budget comes from the A/B's ``budget_ratio``: token-eviction
presses keep ``1/budget_ratio`` of the tokens, which shrinks the cache tensors by the same factor.
kvpress's ThinK zeroes the pruned key channels without shrinking the tensors (its docstring says so):
its real bytes stay those of the full cache, and we report them as such.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager

import torch
from transformers import PreTrainedModel

from mosaickv.engines.hf.backends import KVBackend

# press name -> constructor from the kept fraction of the cache (1 / budget_ratio).
_PRESSES: dict[str, Callable[[float], object]] = {}


def _register() -> None:
    import kvpress

    def evict(cls: type) -> Callable[[float], object]:
        return lambda keep: cls(compression_ratio=1.0 - keep)

    _PRESSES.update(
        {
            "snapkv": evict(kvpress.SnapKVPress),
            "knorm": evict(kvpress.KnormPress),
            "streamingllm": evict(kvpress.StreamingLLMPress),
            "tova": evict(kvpress.TOVAPress),
            "expected_attention": evict(kvpress.ExpectedAttentionPress),
            "pyramidkv": evict(kvpress.PyramidKVPress),
            "keydiff": evict(kvpress.KeyDiffPress),
            # ThinK prunes half the key channels (its paper's setting); no bytes are freed.
            "think": lambda keep: kvpress.ThinKPress(key_channel_compression_ratio=0.5),
        }
    )


def press_names() -> list[str]:
    """The press names accepted after ``kvpress:`` (importing kvpress on first use)."""
    if not _PRESSES:
        _register()
    return sorted(_PRESSES)


def make_press(name: str, budget_ratio: float) -> object:
    """A kvpress press for ``kvpress:<name>`` keeping 1/budget_ratio of the cache (budget_ratio >= 1)."""
    if budget_ratio < 1.0:
        raise ValueError(f"budget_ratio must be >= 1 (1 = no compression), got {budget_ratio}")
    names = press_names()
    if name not in _PRESSES:
        raise ValueError(f"unknown kvpress press {name!r}; known: {', '.join(names)}")
    return _PRESSES[name](1.0 / budget_ratio)


@contextmanager
def pressed(press: object, model: torch.nn.Module) -> Iterator[None]:
    """``with press(model)``, with the attention keywords that kvpress 0.5.5 expects restored.

    The press's hook is wrapped on this instance only, for the duration of the block.
    """
    hook = press.forward_hook  # type: ignore[attr-defined]

    def translated(module: torch.nn.Module, args: tuple, kwargs: dict, output: object) -> object:
        kw = dict(kwargs)
        kw.setdefault("past_key_values", kwargs.get("cache"))
        kw.setdefault("cache_position", kwargs["position_ids"][0])
        return hook(module, args, kw, output)

    press.forward_hook = translated  # type: ignore[attr-defined]
    try:
        with press(model):  # type: ignore[operator]
            yield
    finally:
        del press.forward_hook  # type: ignore[attr-defined]


class KvpressBackend(KVBackend):
    """The hf engine's ``kvpress`` backend: a DynamicCache compressed during prefill by a press.

    Options: ``press`` (one of press_names()), ``budget_ratio`` (default 3). ``prepare`` installs the
    press's hooks on the model until ``release``; they act only on prefill forward passes.
    """

    name = "kvpress"

    def __init__(self, options: Mapping[str, str]) -> None:
        unknown = set(options) - {"press", "budget_ratio"}
        if unknown:
            raise ValueError(
                f"kvpress backend options are press and budget_ratio, got {', '.join(sorted(unknown))}"
            )
        if "press" not in options:
            raise ValueError(f"the kvpress backend needs press=NAME, one of {', '.join(press_names())}")
        try:
            budget = float(options.get("budget_ratio", "3"))
        except ValueError as err:
            raise ValueError(f"budget_ratio must be a number >= 1, got {options['budget_ratio']!r}") from err
        self.method = f"kvpress:{options['press']}"
        self.press = make_press(options["press"], budget)
        self._hooks = ExitStack()

    def prepare(self, model: PreTrainedModel) -> None:
        self._hooks.enter_context(pressed(self.press, model))

    def release(self) -> None:
        """Remove the press's hooks from the model."""
        self._hooks.close()
