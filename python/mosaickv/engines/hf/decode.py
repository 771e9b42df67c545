"""The hf engine's decode loop for one request: prefill, then one token per `step()`.

Our own loop rather than `model.generate`, so that the engine can interleave requests step by step,
cancel between steps, stream text, and hand the cache to a KV backend (backends.py).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from mosaickv.engines.base import Event, Finished, GenerateRequest, SamplingParams, TokenChunk
from mosaickv.protocol import MosaicError

from .backends import KVBackend, full_kv_bytes


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Picks the next token. `logits`: [vocab] of the last position, any float dtype.
    Greedy (argmax) at temperature 0; otherwise softmax(logits / temperature), restricted to the
    smallest set of tokens whose probability reaches `top_p`, sampled with `generator`."""
    if params.temperature == 0.0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # A token stays if the tokens ranked above it do not already reach top_p.
        drop = (torch.cumsum(sorted_probs, dim=-1) - sorted_probs) >= params.top_p
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


class Detokenizer:
    """Incremental detokenisation: each pushed token returns the text it completes. Text is decoded
    over a short window of recent tokens and diffed, so that multi-token characters (emitted as
    "\\ufffd" until complete) and merges across tokens come out right."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # start of the decode window
        self._read = 0  # tokens whose text has been returned

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        done = self._decode(self._ids[self._prefix : self._read])
        full = self._decode(self._ids[self._prefix :])
        if len(full) > len(done) and not full.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return full[len(done) :]
        return ""


class StopMatcher:
    """Finds stop strings in the generated text. Text that could be the start of a stop string is
    held back until it is known not to be one, so a stop string is never streamed."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = [s for s in stops if s]
        self._text = ""
        self._sent = 0

    def push(self, delta: str) -> tuple[str, bool]:
        """Adds `delta`; returns (text safe to send now, whether a stop string was found)."""
        search_from = max(0, self._sent - max((len(s) for s in self._stops), default=0))
        self._text += delta
        hits = [i for i in (self._text.find(s, search_from) for s in self._stops) if i >= 0]
        if hits:
            end = min(hits)
            out, self._sent = self._text[self._sent : end], end
            return out, True
        hold = max(
            (k for s in self._stops for k in range(1, len(s)) if self._text.endswith(s[:k])), default=0
        )
        end = max(self._sent, len(self._text) - hold)
        out, self._sent = self._text[self._sent : end], end
        return out, False

    def flush(self) -> str:
        """The held-back text, when generation ends for another reason."""
        out, self._sent = self._text[self._sent :], len(self._text)
        return out


def _eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    ids: set[int] = set()
    for source in (model.generation_config.eos_token_id, tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif source is not None:
            ids.update(source)
    return frozenset(ids)


def prompt_ids(request: GenerateRequest, tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> list[int]:
    """The request's input as token ids; raises MosaicError (bad_request / unsupported)."""
    if request.messages is not None:
        if not tokenizer.chat_template:
            raise MosaicError(
                "unsupported",
                "this model has no chat template; send a prompt or token_ids",
                request.request_id,
            )
        text = tokenizer.apply_chat_template(
            list(request.messages), tokenize=False, add_generation_prompt=True
        )
        ids = tokenizer(text, add_special_tokens=False).input_ids
    elif request.prompt is not None:
        ids = tokenizer(request.prompt).input_ids
    else:
        ids = list(request.token_ids or [])
        bad = [t for t in ids if t >= vocab_size]
        if bad:
            raise MosaicError(
                "bad_request",
                f"token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})",
                request.request_id,
            )
    if not ids:
        raise MosaicError(
            "bad_request", "the input is empty: send at least one token of prompt", request.request_id
        )
    return ids


class Generation:
    """One request's state. `step()` runs one forward pass (the first one is the prefill) and
    returns its events; after a Finished event, `finished` is True."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        backend: KVBackend,
        request: GenerateRequest,
        max_context: int,
    ) -> None:
        self.request = request
        self.params = request.params
        self._model = model
        self._backend = backend
        self._prompt = prompt_ids(request, tokenizer, model.config.vocab_size)
        if len(self._prompt) + self.params.max_tokens > max_context:
            raise MosaicError(
                "context_too_long",
                f"prompt ({len(self._prompt)} tokens) + max_tokens ({self.params.max_tokens}) exceed "
                "the model's "
                f"context of {max_context} tokens; shorten the prompt or lower max_tokens",
                request.request_id,
            )
        self._eos = frozenset() if self.params.ignore_eos else _eos_ids(model, tokenizer)
        self._detok = Detokenizer(tokenizer)
        self._stops = StopMatcher(self.params.stop)
        self._generator: torch.Generator | None = None
        if self.params.temperature > 0.0:
            self._generator = torch.Generator(device=model.device)
            if self.params.seed is None:
                self._generator.seed()
            else:
                self._generator.manual_seed(self.params.seed)
        self._cache = None
        self._last: int | None = None
        self.completion_tokens = 0
        self.prefill_kv_bytes = 0
        self._prefill_ms = 0.0
        self._decode_ms = 0.0
        self.finished = False

    @property
    def prompt_tokens(self) -> int:
        return len(self._prompt)

    def kv_bytes(self) -> int:
        """Real bytes of this request's cache now (0 before prefill and after the end)."""
        return 0 if self._cache is None else self._backend.kv_bytes(self._cache)

    @torch.inference_mode()
    def step(self) -> list[Event]:
        start = time.perf_counter()
        device = self._model.device
        if self._cache is None:
            self._cache = self._backend.new_cache(self._model)
            ids = torch.tensor([self._prompt], device=device)
            logits = self._model(input_ids=ids, cache=self._cache, use_cache=True, logits_to_keep=1).logits
            self._backend.end_prefill(self._cache)
            self.prefill_kv_bytes = self._backend.kv_bytes(self._cache)
        else:
            ids = torch.tensor([[self._last]], device=device)
            logits = self._model(input_ids=ids, cache=self._cache, use_cache=True).logits
        last = logits[0, -1]
        token = sample(last, self.params, self._generator)
        logprob = float(torch.log_softmax(last.float(), dim=-1)[token]) if self.params.logprobs else None
        elapsed_ms = (time.perf_counter() - start) * 1000.0
        if self.completion_tokens == 0:
            self._prefill_ms = elapsed_ms
        else:
            self._decode_ms += elapsed_ms
        self._last = token
        self.completion_tokens += 1

        text, stopped = self._stops.push(self._detok.push(token))
        reason = None
        if stopped or token in self._eos:
            reason = "stop"
        elif self.completion_tokens >= self.params.max_tokens:
            reason = "length"
        if reason is not None and not stopped:
            text += self._stops.flush()
        events: list[Event] = [TokenChunk(text, (token,), None if logprob is None else (logprob,))]
        if reason is not None:
            events.append(self.finish(reason))
        return events

    def finish(self, reason: str) -> Finished:
        """Ends the request (also used for cancellation and failures) and frees its cache."""
        self.finished = True
        if self._cache is not None:
            self._backend.release_cache(self._cache)
            self._cache = None
        return Finished(
            finish_reason=reason,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            kv_bytes=self.prefill_kv_bytes,
            full_kv_bytes=full_kv_bytes(self._model, self.prompt_tokens) if self.prefill_kv_bytes else 0,
            prefill_ms=self._prefill_ms,
            decode_ms=self._decode_ms,
        )
