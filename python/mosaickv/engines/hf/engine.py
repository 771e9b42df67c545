"""The embedded `hf` engine: a transformers model served by our own decode loop (decode.py).

Requests run on one engine thread that interleaves them step by step (round robin, one forward
pass per request per turn, each request with its own cache), so that several streams advance
together and a cancel takes effect at the request's next step. Prefill of a long prompt is one
step and is not interrupted.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from mosaickv.engines.base import Engine, EventSink, Failed, Finished, GenerateRequest, TokenChunk
from mosaickv.protocol import MosaicError

from .backends import make_backend
from .decode import Generation
from .models import load_model

log = logging.getLogger("mosaickv.engines.hf")


def describe_device(device: torch.device) -> str:
    """ "cpu" or e.g. "cuda:0 (NVIDIA H200)"."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return device.type


@dataclass
class _Running:
    generation: Generation
    sink: EventSink
    kv_bytes: int = 0


class HFEngine(Engine):
    """transformers model + KV backend + step scheduler. See the module docstring."""

    engine_name = "hf"

    def __init__(
        self,
        model: str,
        backend: str = "stock",
        device: str = "cpu",
        max_inflight: int = 4,
        backend_options: Mapping[str, str] | None = None,
    ) -> None:
        if max_inflight < 1:
            raise ValueError(f"max_inflight must be >= 1, got {max_inflight}")
        start = time.perf_counter()
        self._backend = make_backend(backend, backend_options)  # before the slow load: fail fast
        self._model, self._tokenizer = load_model(model, device)
        self._backend.prepare(self._model)
        self.load_ms = (time.perf_counter() - start) * 1000.0
        self.model_name = model
        self.backend_name = backend
        self.device = describe_device(self._model.device)
        self.max_context = int(self._model.config.max_position_embeddings)
        self.max_inflight = max_inflight
        self.method = self._backend.method
        self.chat_template = bool(self._tokenizer.chat_template)

        self._cv = threading.Condition()
        self._running: dict[str, _Running] = {}
        self._cancelled: set[str] = set()
        self._closing = False
        self._steps = 0
        self._decode_tokens = 0
        self._decode_s = 0.0
        self._prefill_tokens = 0
        self._prefill_s = 0.0
        self._failures = 0
        self._thread = threading.Thread(target=self._loop, name="hf-engine", daemon=True)
        self._thread.start()

    @property
    def model(self) -> torch.nn.Module:
        return self._model

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self._tokenizer

    # -- Engine API ---------------------------------------------------------------------------

    def submit(self, request: GenerateRequest, sink: EventSink) -> None:
        generation = Generation(self._model, self._tokenizer, self._backend, request, self.max_context)
        with self._cv:
            if self._closing:
                raise MosaicError("unsupported", "the engine is shutting down", request.request_id)
            if request.request_id in self._running:
                raise MosaicError(
                    "bad_request", f"request {request.request_id!r} is already running", request.request_id
                )
            if len(self._running) >= self.max_inflight:
                raise MosaicError(
                    "overloaded",
                    f"this worker already runs {self.max_inflight} requests (--max-inflight); retry later",
                    request.request_id,
                )
            self._running[request.request_id] = _Running(generation, sink)
            self._cv.notify()

    def cancel(self, request_id: str) -> None:
        with self._cv:
            if request_id in self._running:
                self._cancelled.add(request_id)
                self._cv.notify()

    def inflight(self) -> int:
        with self._cv:
            return len(self._running)

    def kv_bytes(self) -> int:
        with self._cv:
            return sum(r.kv_bytes for r in self._running.values())

    def stats(self) -> dict[str, int | float]:
        backend = self._backend.stats()  # outside the lock: the cache manager takes its own locks
        with self._cv:
            return {
                "load_ms": round(self.load_ms, 3),
                "steps": self._steps,
                "prefill_tokens": self._prefill_tokens,
                "prefill_tokens_per_s": round(self._prefill_tokens / self._prefill_s, 3)
                if self._prefill_s
                else 0,
                "decode_tokens": self._decode_tokens,
                "decode_tokens_per_s": round(self._decode_tokens / self._decode_s, 3)
                if self._decode_s
                else 0,
                "failures": self._failures,
                **backend,
            }

    def apply_policy(self, heads: list[dict[str, Any]]) -> None:
        """A segment policy: per layer, one keep ratio per KV head and the layer's token ratio
        (mosaickv.policy.layer_params). loss_threshold only matters in search mode."""
        from mosaickv.policy import layer_params, model_shape

        from .mosaickv_backend import MosaicKVBackend

        if not isinstance(self._backend, MosaicKVBackend) or self._backend.method != "mosaic":
            raise MosaicError(
                "unsupported",
                f"backend {self.backend_name} (method {self.method}) does not apply segment policies; "
                "run the worker with --backend mosaickv and method mosaic",
            )
        shape = model_shape(self._model, self.model_name)
        self._backend.set_layer_params(layer_params(heads, shape["nLayers"], shape["nKvHeads"]))

    def set_telemetry_sink(self, sink: Callable[[dict[str, Any]], None]) -> None:
        """The mosaickv backend's sampled curves (its option telemetry_every) go to `sink`."""
        if hasattr(self._backend, "telemetry_sink"):
            self._backend.telemetry_sink = sink

    def close(self) -> None:
        with self._cv:
            self._closing = True
            self._cancelled.update(self._running)
            self._cv.notify()
        self._thread.join()  # every request has ended and released its cache
        self._backend.close()

    # -- scheduler ----------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._running and not self._closing:
                    self._cv.wait()
                if not self._running:
                    return
                turn = list(self._running.items())
            for request_id, running in turn:
                self._advance(request_id, running)

    def _advance(self, request_id: str, running: _Running) -> None:
        """One step of one request, then its events to the sink."""
        generation = running.generation
        with self._cv:
            cancelled = request_id in self._cancelled
        if cancelled:
            events: list[TokenChunk | Finished | Failed] = [generation.finish("cancelled")]
        else:
            prefill = generation.completion_tokens == 0
            start = time.perf_counter()
            try:
                events = list(generation.step())
            except Exception as exc:  # the engine keeps serving the other requests
                log.exception("request %s failed in the engine", request_id)
                generation.finish("stop")
                events = [
                    Failed(
                        MosaicError(
                            "engine_error",
                            f"the hf engine failed on this request ({type(exc).__name__}: {exc}); "
                            "the worker keeps "
                            "serving, see its log for the traceback",
                            request_id,
                        )
                    )
                ]
            elapsed = time.perf_counter() - start
            with self._cv:
                self._steps += 1
                if prefill:
                    self._prefill_tokens += generation.prompt_tokens
                    self._prefill_s += elapsed
                else:
                    self._decode_tokens += 1
                    self._decode_s += elapsed
        ended = isinstance(events[-1], (Finished, Failed))
        with self._cv:
            if ended:
                del self._running[request_id]
                self._cancelled.discard(request_id)
                self._failures += isinstance(events[-1], Failed)
            else:
                running.kv_bytes = generation.kv_bytes()
        for event in events:
            running.sink(request_id, event)
