"""What the worker needs from an engine: requests in, events out, cancel, stats.

An engine runs generation on its own thread(s) and reports through an `EventSink`, which may be
called from any thread. Engines: `hf` (embedded, engines/hf/), `vllm` and `sglang` (engines/vllm/,
engines/sglang/). The worker (mosaickv.worker) owns the socket and translates events into protocol
messages.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mosaickv.protocol import MosaicError


@dataclass(frozen=True)
class SamplingParams:
    """`generate.params` of docs/PROTOCOL.md, with its defaults."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False

    @classmethod
    def from_wire(cls, params: Mapping[str, Any]) -> SamplingParams:
        """From a validated `params` map (types and ranges already checked by the protocol)."""
        return cls(**{**params, "stop": tuple(params.get("stop", ()))})


@dataclass(frozen=True)
class GenerateRequest:
    """One `generate` message: exactly one of `prompt`, `token_ids`, `messages` is set."""

    request_id: str
    params: SamplingParams
    prompt: str | None = None
    token_ids: Sequence[int] | None = None
    messages: Sequence[Mapping[str, str]] | None = None

    @classmethod
    def from_wire(cls, message: Mapping[str, Any]) -> GenerateRequest:
        """From a validated `generate` message."""
        return cls(
            request_id=message["request_id"],
            params=SamplingParams.from_wire(message["params"]),
            **message["input"],
        )


@dataclass(frozen=True)
class TokenChunk:
    """Newly generated tokens and the text they completed (may be empty mid-character)."""

    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...] | None = None


@dataclass(frozen=True)
class Finished:
    """The request ended; `kv_bytes` is the real size of its cache at the end of prefill."""

    finish_reason: str  # "stop" | "length" | "cancelled"
    prompt_tokens: int
    completion_tokens: int
    kv_bytes: int
    full_kv_bytes: int
    prefill_ms: float
    decode_ms: float


@dataclass(frozen=True)
class Failed:
    """The request failed; `error.code` comes from the catalogue (e.g. engine_error, bad_request)."""

    error: MosaicError


Event = TokenChunk | Finished | Failed
EventSink = Callable[[str, Event], None]
"""Called as sink(request_id, event), from any thread; after Finished or Failed, never again for that id."""


class Engine(ABC):
    """An engine hosting one model. Every request ends with exactly one Finished or Failed event."""

    engine_name: str
    model_name: str
    backend_name: str
    device: str
    """Human-readable device, e.g. "cpu" or "cuda:0 (NVIDIA H200)"."""
    max_context: int
    max_inflight: int
    method: str | None
    """The compression method when the backend is `mosaickv`, else None."""
    chat_template: bool

    @abstractmethod
    def submit(self, request: GenerateRequest, sink: EventSink) -> None:
        """Starts a request without blocking. Raises MosaicError(`overloaded`) when `max_inflight`
        requests are already running, or another code when the request is invalid for this engine."""

    @abstractmethod
    def cancel(self, request_id: str) -> None:
        """Stops a request at its next step; it ends with Finished("cancelled"). Unknown ids are ignored."""

    @abstractmethod
    def inflight(self) -> int:
        """Requests running now."""

    @abstractmethod
    def kv_bytes(self) -> int:
        """Real bytes of the KV caches held now, over all running requests."""

    @abstractmethod
    def stats(self) -> dict[str, int | float]:
        """Engine-specific numbers for the `stats` message (str -> number)."""

    def apply_policy(self, heads: list[dict[str, Any]]) -> None:
        """Applies a segment policy (the ``heads`` of a ``policy`` message) to requests that start
        from now on. Raises ValueError or MosaicError with the reason when it cannot."""
        raise MosaicError("unsupported", f"the {self.engine_name} engine with backend {self.backend_name} "
                          "does not apply segment policies")

    def set_telemetry_sink(self, sink: Callable[[dict[str, Any]], None]) -> None:
        """Where the engine hands policy telemetry (a ``telemetry`` message's head_dim, dtype,
        keep_ratios, curves, tokens and overhead_s), from any thread. Engines without telemetry
        ignore it."""
        return None

    @abstractmethod
    def close(self) -> None:
        """Cancels every running request (each ends with Finished("cancelled")) and stops the engine."""
