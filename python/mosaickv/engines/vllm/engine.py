"""Engine ``vllm``: wraps vLLM's ``AsyncLLM`` behind our engine contract (engines/base.py).

vLLM's own front end talks to its engine core with a version-specific msgpack schema; we do not
speak it. Instead ``AsyncLLM`` runs in this process on a private asyncio loop (its own thread), and
each request streams ``RequestOutputKind.DELTA`` outputs that become ``TokenChunk`` events.

``--backend mosaickv`` selects ``AttentionBackendEnum.CUSTOM`` (registered by our plugin in every
vLLM process) with the settings of ``--backend-option KEY=VALUE`` (MosaicSettings fields), passed
to every vLLM process through MOSAICKV_VLLM_CONFIG, and turns off what the backend refuses:
prefix caching, chunked prefill (the whole prompt must be one step: max_num_batched_tokens =
max_model_len), CUDA graphs (the builder reports NEVER; eager mode avoids a futile capture).
``--backend stock`` runs vLLM's own choice with its defaults.

With ``--backend-option telemetry_every=N`` the engine core's impl measures the planner's curves on
every N-th prefill and PUSHes them to a PULL socket this engine binds before AsyncLLM spawns its
processes (engines/vllm/telemetry.py); they reach the worker through ``set_telemetry_sink``.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import asdict, fields
from typing import Any

from vllm import SamplingParams as VllmSamplingParams
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.sampling_params import RequestOutputKind
from vllm.v1.engine.async_llm import AsyncLLM

from mosaickv.engines.base import (
    Engine,
    EventSink,
    Failed,
    Finished,
    GenerateRequest,
    SamplingParams,
    TokenChunk,
)
from mosaickv.engines.vllm.config import ENV_VAR, MosaicSettings
from mosaickv.engines.vllm.policies import PolicyPublisher, check_fits
from mosaickv.engines.vllm.telemetry import TelemetryRelay
from mosaickv.protocol import MosaicError

BACKENDS = ("stock", "mosaickv")


def settings_from_options(options: Mapping[str, str]) -> MosaicSettings:
    """``--backend-option`` strings -> MosaicSettings, each value parsed as its field's type."""
    types = {f.name: type(getattr(MosaicSettings(), f.name)) for f in fields(MosaicSettings)}
    unknown = sorted(set(options) - set(types))
    if unknown:
        raise ValueError(f"unknown mosaickv option(s) {unknown} for engine vllm; allowed: {sorted(types)}")
    try:
        given = {k: types[k](v) for k, v in options.items()}
    except ValueError as err:
        raise ValueError(f"bad mosaickv option value: {err}") from err
    return MosaicSettings(**given)  # validates


class VLLMEngine(Engine):
    """One model in vLLM, stock or with the MosaicKV backend."""

    engine_name = "vllm"

    def __init__(self, model: str, backend: str = "stock", device: str = "cuda", max_inflight: int = 4,
                 backend_options: Mapping[str, str] | None = None,
                 max_model_len: int | None = None) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if max_inflight < 1:
            raise ValueError(f"max_inflight must be >= 1, got {max_inflight}")
        if not device.startswith("cuda"):
            raise ValueError(f"engine vllm runs on CUDA devices (its PyPI wheel is a CUDA build), "
                             f"got {device!r}; "
                             "use --engine hf on CPU")
        start = time.perf_counter()
        args = AsyncEngineArgs(model=model, max_num_seqs=max_inflight, max_model_len=max_model_len)
        self._relay: TelemetryRelay | None = None
        self._policies: PolicyPublisher | None = None
        if backend == "mosaickv":
            self.settings = settings_from_options(backend_options or {})
            # Every vLLM process (engine core, workers) reads the settings from the environment.
            os.environ[ENV_VAR] = json.dumps(asdict(self.settings))
            # bound and exported before AsyncLLM spawns the engine core: curves, recall and the
            # cache manager's stats come back through it
            self._relay = TelemetryRelay()
            self._relay.export()
            self._policies = PolicyPublisher()  # segment policies go the other way (policies.py)
            self._policies.export()
            args.attention_backend = "CUSTOM"
            args.enable_prefix_caching = False
            args.enable_chunked_prefill = False
            args.enforce_eager = True
        elif backend_options:
            raise ValueError(f"backend stock takes no --backend-option, got {sorted(backend_options)}")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vllm-engine", daemon=True)
        self._thread.start()
        try:
            self._llm: AsyncLLM = self._call(self._start(args)).result()
        except BaseException:
            self._close_channels()  # their socket files and threads would outlive the failed start
            raise
        cfg = self._llm.model_config
        parallel = self._llm.vllm_config.parallel_config
        batched = self._llm.vllm_config.scheduler_config.max_num_batched_tokens
        if backend == "mosaickv" and batched < cfg.max_model_len:
            raise ValueError("MosaicKV needs whole prompts in one step: max_num_batched_tokens must be >= "
                             f"max_model_len ({cfg.max_model_len})")
        self.load_ms = (time.perf_counter() - start) * 1000.0
        self.model_name = model
        self.backend_name = backend
        self.device = device
        self.max_context = int(cfg.max_model_len)
        self.max_inflight = max_inflight
        self.method = "mosaic" if backend == "mosaickv" else None
        self.chat_template = bool(getattr(self._llm.get_tokenizer(), "chat_template", None))
        self._layers = cfg.get_num_layers(parallel)
        self._kv_heads = cfg.get_num_kv_heads(parallel)
        self._head = cfg.get_head_size()
        self._elem = cfg.dtype.itemsize
        self._block = self._llm.vllm_config.cache_config.block_size
        dense = 2 * self._head * self._elem
        self._token_head_bytes = (self.settings.state_bytes(self._head, cfg.dtype)
                                  if backend == "mosaickv" else dense)
        self._dense_token_head_bytes = dense
        self._running: dict[str, Future[None]] = {}
        self._held: dict[str, int] = {}  # tokens each running request holds in the cache
        self._lock = threading.Lock()
        self._requests = 0
        self._tokens = 0

    async def _start(self, args: AsyncEngineArgs) -> AsyncLLM:
        return AsyncLLM.from_engine_args(args)

    def _call(self, coro):  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def _pages_bytes(self, tokens: int, per_token_head: int) -> int:
        """Bytes of the pages vLLM allocates for ``tokens`` tokens over every layer."""
        blocks = -(-tokens // self._block)
        return blocks * self._block * self._kv_heads * per_token_head * self._layers

    # -- Engine API ---------------------------------------------------------------------------

    def submit(self, request: GenerateRequest, sink: EventSink) -> None:
        with self._lock:
            if len(self._running) >= self.max_inflight:
                raise MosaicError("overloaded", f"{self.max_inflight} requests already running",
                                  request.request_id)
            self._running[request.request_id] = self._call(self._generate(request, sink))
            self._requests += 1

    async def _generate(self, request: GenerateRequest, sink: EventSink) -> None:
        rid = request.request_id
        start = time.perf_counter()
        first: float | None = None
        try:
            prompt = await self._prompt(request)
            reason, n_prompt, n_out = "length", 0, 0
            async for out in self._llm.generate(prompt, _sampling(request.params), rid):
                first = first or time.perf_counter()
                n_prompt = len(out.prompt_token_ids or [])
                for comp in out.outputs:
                    if comp.token_ids:
                        n_out += len(comp.token_ids)
                        with self._lock:
                            self._held[rid] = n_prompt + n_out
                        sink(rid, TokenChunk(comp.text, tuple(comp.token_ids)))
                    if comp.finish_reason is not None:
                        reason = "stop" if comp.finish_reason == "stop" else "length"
            end = time.perf_counter()
            with self._lock:
                self._tokens += n_out
            sink(rid, Finished(reason, n_prompt, n_out, self._pages_bytes(n_prompt, self._token_head_bytes),
                               self._pages_bytes(n_prompt, self._dense_token_head_bytes),
                               ((first or end) - start) * 1000.0, (end - (first or end)) * 1000.0))
        except asyncio.CancelledError:
            await self._llm.abort(rid)
            sink(rid, Finished("cancelled", 0, 0, 0, 0, 0.0, 0.0))
        except MosaicError as err:
            sink(rid, Failed(err))
        except Exception as err:  # noqa: BLE001 - any engine failure ends this request, not the worker
            sink(rid, Failed(MosaicError("engine_error", f"vLLM failed: {err}", rid)))
        finally:
            with self._lock:
                self._running.pop(rid, None)
                self._held.pop(rid, None)

    async def _prompt(self, request: GenerateRequest) -> object:
        if request.prompt is not None:
            return request.prompt
        if request.token_ids is not None:
            return {"prompt_token_ids": list(request.token_ids)}
        tokenizer = self._llm.get_tokenizer()
        return tokenizer.apply_chat_template(list(request.messages or []), tokenize=False,
                                             add_generation_prompt=True)

    def cancel(self, request_id: str) -> None:
        with self._lock:
            task = self._running.get(request_id)
        if task is not None:
            task.cancel()

    def inflight(self) -> int:
        with self._lock:
            return len(self._running)

    def kv_bytes(self) -> int:
        """Bytes of the pages the running requests hold (whole blocks, every layer)."""
        with self._lock:
            held = list(self._held.values())
        return sum(self._pages_bytes(n, self._token_head_bytes) for n in held)

    def stats(self) -> dict[str, int | float]:
        with self._lock:
            base = {"requests_total": self._requests, "tokens_generated_total": self._tokens,
                    "token_head_bytes": self._token_head_bytes, "block_size": self._block}
        # cache: manager: the engine core's manager figures (cache_*), as last reported
        return {**base, **(self._relay.cache_stats if self._relay is not None else {})}

    def set_telemetry_sink(self, sink: Callable[[dict[str, Any]], None]) -> None:
        """The engine core's sampled curves (telemetry_every) go to `sink`, from the relay's thread."""
        if self._relay is not None:
            self._relay.sink = sink

    def apply_policy(self, heads: list[dict[str, Any]]) -> None:
        """A segment policy (per layer, one keep ratio per KV head and the layer's token ratio) for
        prompts the engine core stores from now on, published to it (engines/vllm/policies.py);
        ValueError with the reason when the model or vLLM's page size cannot run it."""
        if self._policies is None:
            super().apply_policy(heads)  # backend stock: unsupported, with the reason
            return
        check_fits(self.settings, heads, self._layers, self._kv_heads)
        self._policies.publish(heads)

    def _close_channels(self) -> None:
        for channel in (self._relay, self._policies):
            if channel is not None:
                channel.close()

    def close(self) -> None:
        self._close_channels()
        with self._lock:
            tasks = list(self._running.values())
        for task in tasks:
            task.cancel()
        self._llm.shutdown()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)


def _sampling(params: SamplingParams) -> VllmSamplingParams:
    return VllmSamplingParams(
        max_tokens=params.max_tokens, temperature=params.temperature, top_p=params.top_p, seed=params.seed,
        stop=list(params.stop), ignore_eos=params.ignore_eos, output_kind=RequestOutputKind.DELTA)
