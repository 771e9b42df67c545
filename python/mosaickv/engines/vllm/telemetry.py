"""Planner telemetry from vLLM's engine-core process to our worker (MosaicSettings.telemetry_every).

The impl runs inside the engine-core process that ``AsyncLLM`` spawns, not in our worker, so its
curves travel over one ZeroMQ PUSH -> PULL pipe:

- worker side (``TelemetryRelay``, made by engines/vllm/engine.py before AsyncLLM starts): binds a
  PULL socket on a fresh ``ipc://`` address, exports it in ``MOSAICKV_TELEMETRY_ADDR`` (the
  engine-core process inherits the environment) and hands every message to the engine's telemetry
  sink from its own thread; the worker then sends it to the control plane as usual.
- engine-core side (fed by the impl's forward): ``PrefillTelemetry`` on the 1st, (N+1)-th, ...
  prefill of the process (``telemetry_every``): every MosaicKV layer measures
  ``policy.prompt_curves`` from the prompt's K/V and last queries, and once every layer has, one
  ``telemetry`` message is PUSHed without blocking; ``DecodeRecall`` likewise on sampled decode steps
  (``recall_every``), one ``recall`` message of ``policy.decode_recall`` per layer.

Frames are the wire encoding (mosaickv.protocol), validated on both ends: one schema. The engine
core does not know our worker id or the model name we report, so it sends ``worker_id``
``vllm-engine-core-<pid>`` and an empty ``model``; the relay drops both and the worker stamps its
own. Everything here is best effort: a failure is logged once and never fails a request.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
import zmq

from mosaickv.core import KVCache
from mosaickv.engines.vllm.ipc import BoundSocket
from mosaickv.policy import (
    DTYPE_NAMES,
    PLAN_KEEP_RATIOS,
    QUERY_WINDOW,
    decode_recall,
    prompt_curves,
    recall_body,
    telemetry_body,
)
from mosaickv.protocol import ProtocolError, decode, encode

ADDR_ENV = "MOSAICKV_TELEMETRY_ADDR"
# A child of vLLM's "vllm" logger, as in backend.py: the name our lines carry in a vLLM log.
logger = logging.getLogger("vllm.plugins.mosaickv")


class TelemetryRelay:
    """Worker side: a PULL socket on a private ipc:// address; each decoded telemetry or recall
    message (``type`` and its fields, without the engine core's ``worker_id`` and ``model``) goes to
    ``sink``; a ``stats`` message's engine map (the cache manager's figures) is kept in
    ``cache_stats``."""

    _POLL_MS = 100  # how soon close() is noticed

    def __init__(self) -> None:
        self.sink: Callable[[dict[str, Any]], None] | None = None
        self.cache_stats: dict[str, int | float] = {}  # the engine core's last ``report_cache_stats``
        self._bound = BoundSocket(zmq.PULL, "telemetry", ADDR_ENV)
        self.address = self._bound.address
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mosaickv-telemetry-relay", daemon=True)
        self._thread.start()

    def export(self) -> None:
        """Publish the address to the processes this one spawns from now on."""
        self._bound.export()

    def _run(self) -> None:
        try:
            while not self._closed.is_set():
                if self._bound.socket.poll(self._POLL_MS):
                    self._relay(self._bound.socket.recv_multipart())
        finally:
            self._bound.close()

    def _relay(self, frames: list[bytes]) -> None:
        try:
            message = decode(frames)
        except ProtocolError as err:
            logger.warning("dropped a malformed telemetry frame from the engine core: %s", err)
            return
        if message["type"] == "stats":
            self.cache_stats = dict(message["engine"])
            return
        body = {key: value for key, value in message.items() if key not in ("worker_id", "model")}
        if self.sink is not None:
            self.sink(body)

    def close(self) -> None:
        self._closed.set()
        self._thread.join(timeout=5)  # the thread closes the socket it polls


class TelemetryPusher:
    """Engine-core side: a PUSH socket connected to the relay. ``send`` never blocks: with no relay
    listening, or its queue full, the message is dropped (logged once)."""

    def __init__(self, address: str) -> None:
        self._ctx = zmq.Context.instance()
        self._socket = self._ctx.socket(zmq.PUSH)
        self._socket.setsockopt(zmq.SNDHWM, 64)
        self._socket.setsockopt(zmq.LINGER, 1000)  # let a last message leave at exit, briefly
        self._socket.connect(address)
        self._lock = threading.Lock()  # vLLM may run layers on more than one thread

    def send(self, message: dict[str, Any]) -> None:
        frames = encode(message)
        try:
            with self._lock:
                self._socket.send_multipart(frames, flags=zmq.NOBLOCK)
        except zmq.Again:
            _warn_once("telemetry dropped: no worker is reading MOSAICKV_TELEMETRY_ADDR (or it is behind)")


class LayerSampler:
    """Samples events that every MosaicKV layer of the process sees in turn (a prompt, a decode step):
    the 1st, (N+1)-th, ... event that layer 0 sees is sampled, every layer adds its measurement, and
    once all have, ``finish(per-layer results, seconds spent)`` builds the message for ``send``.
    Never raises: a failure drops that sample (logged once) and the request goes on."""

    def __init__(self, every: int, send: Callable[[dict[str, Any]], None]) -> None:
        if every < 1:
            raise ValueError(f"the sampling period must be >= 1, got {every}")
        self.every, self.send = every, send
        self._seen = 0
        self._pending: dict[int, list[torch.Tensor]] = {}  # event key -> results of layers 0, 1, ...
        self._elapsed: dict[int, float] = {}

    def add(self, layer: int, n_layers: int, key: int, measure: Callable[[], torch.Tensor],
            finish: Callable[[list[torch.Tensor], float], dict[str, Any]]) -> None:
        try:
            self._add(layer, n_layers, key, measure, finish)
        except Exception as err:  # noqa: BLE001 - best effort: the request goes on without it
            self._pending.pop(key, None)
            _warn_once(f"telemetry failed, the request goes on without it: {err!r}")

    def _add(self, layer: int, n_layers: int, key: int, measure: Callable[[], torch.Tensor],
             finish: Callable[[list[torch.Tensor], float], dict[str, Any]]) -> None:
        if layer == 0:  # the first layer decides for every layer of this event
            self._pending.pop(key, None)
            if self._seen % self.every == 0:
                self._pending[key], self._elapsed[key] = [], 0.0
            self._seen += 1
        results = self._pending.get(key)
        if results is None or len(results) != layer:  # not sampled, or a layer missed it
            self._pending.pop(key, None)
            return
        start = time.perf_counter()
        with torch.no_grad():
            results.append(measure())
        self._elapsed[key] += time.perf_counter() - start
        if len(results) == n_layers:
            del self._pending[key]
            self.send(finish(results, self._elapsed.pop(key)))


class PrefillTelemetry:
    """MosaicSettings.telemetry_every: the planner's curves (``policy.prompt_curves``: attention and
    energy losses at PLAN_KEEP_RATIOS from the prompt's K/V and last queries) of sampled prompts, one
    ``telemetry`` message per prompt."""

    def __init__(self, every: int, send: Callable[[dict[str, Any]], None]) -> None:
        self.sampler = LayerSampler(every, send)

    def on_prefill(self, layer: int, n_layers: int, request: int, q: torch.Tensor, k: torch.Tensor,
                   v: torch.Tensor) -> None:
        """Layer ``layer`` of ``n_layers`` ran a prompt (q: [T, H_q, D]; k, v: [T, H_kv, D] post-RoPE)
        for the request whose first block is ``request``."""

        def finish(curves: list[torch.Tensor], seconds: float) -> dict[str, Any]:
            head_dim, dtype, tokens = int(k.shape[2]), DTYPE_NAMES[k.dtype], int(k.shape[0])
            return telemetry_body(torch.stack(curves), head_dim, dtype, tokens, seconds) | _sender()

        self.sampler.add(layer, n_layers, request,
                         lambda: prompt_curves(k, v, q[-QUERY_WINDOW:], PLAN_KEEP_RATIOS), finish)


class DecodeRecall:
    """MosaicSettings.recall_every: on sampled decode steps, ``policy.decode_recall`` of the step's
    first decode request per layer (its core cache's selection at RECALL_TOKEN_RATIOS against full
    attention over the decompressed keys), one ``recall`` message per step."""

    _STEP = -1  # one event per step, whatever request it samples

    def __init__(self, every: int, send: Callable[[dict[str, Any]], None]) -> None:
        self.sampler = LayerSampler(every, send)

    def on_decode(self, layer: int, n_layers: int, cache: KVCache, q: torch.Tensor, scale: float) -> None:
        """Layer ``layer`` of ``n_layers`` attended ``q`` ([H_q, D]) over ``cache`` (token appended)."""

        def finish(recalls: list[torch.Tensor], seconds: float) -> dict[str, Any]:
            return recall_body(list(range(n_layers)), recalls, cache.length, seconds) | _sender()

        self.sampler.add(layer, n_layers, self._STEP, lambda: decode_recall(cache, q, scale), finish)


def _sender() -> dict[str, str]:
    """What names this engine-core process in its messages (the relay drops it: the worker sends
    its own ids)."""
    return {"worker_id": f"vllm-engine-core-{os.getpid()}", "model": ""}


_pushers: dict[str, TelemetryPusher] = {}
_prefill: dict[int, PrefillTelemetry] = {}
_recall: dict[int, DecodeRecall] = {}
_warned: set[str] = set()


def _pusher() -> TelemetryPusher | None:
    """The process's PUSH socket to MOSAICKV_TELEMETRY_ADDR; None (logged once) when no worker
    exported an address."""
    address = os.environ.get(ADDR_ENV)
    if not address:
        _warn_once(f"telemetry is on but {ADDR_ENV} is not set (no mosaickv worker started this vLLM): "
                   "nothing is sent")
        return None
    if address not in _pushers:
        _pushers[address] = TelemetryPusher(address)
    return _pushers[address]


def prefill_sampler(every: int) -> PrefillTelemetry | None:
    """The process's telemetry_every sampler (one count over every layer and request)."""
    pusher = _pusher()
    if pusher is None:
        return None
    return _prefill.setdefault(every, PrefillTelemetry(every, pusher.send))


def recall_sampler(every: int) -> DecodeRecall | None:
    """The process's recall_every sampler (one count over every layer and step)."""
    pusher = _pusher()
    if pusher is None:
        return None
    return _recall.setdefault(every, DecodeRecall(every, pusher.send))


STATS_PERIOD_S = 1.0
_stats_sent = float("-inf")


def report_cache_stats(stats: Callable[[], dict[str, int | float]]) -> None:
    """cache: manager: at most once every STATS_PERIOD_S, PUSH the manager's ``stats()`` as a
    ``stats`` message, whose engine map the worker merges into the vllm engine's stats (the manager
    lives in this engine-core process). Silent without a worker (plain ``vllm serve``); never raises."""
    global _stats_sent
    now = time.monotonic()
    if now - _stats_sent < STATS_PERIOD_S or not os.environ.get(ADDR_ENV):
        return
    _stats_sent = now
    try:
        values = stats()
        kv = int(values["cache_page_bytes"] + values["cache_dense_bytes"])
        pusher = _pusher()
        if pusher is not None:
            pusher.send({"type": "stats", "nonce": 0, "worker_id": _sender()["worker_id"],
                         "inflight": int(values["cache_requests"]), "requests_total": 0,
                         "tokens_generated_total": 0, "kv_bytes": kv, "kv_bytes_peak": kv, "engine": values})
    except Exception as err:  # noqa: BLE001 - best effort, like the telemetry
        _warn_once(f"cache manager stats not sent to the worker: {err!r}")


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        logger.warning(message)
