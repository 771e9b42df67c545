"""The shared error catalogue (docs/PROTOCOL.md, "Error codes"), mirrored by src/protocol/errors.ts.

Every `error` message carries one of these codes; the HTTP status lives here and only here.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType


@dataclass(frozen=True)
class ErrorSpec:
    code: str
    http_status: int
    summary: str


ERROR_CATALOGUE: MappingProxyType[str, ErrorSpec] = MappingProxyType(
    {
        spec.code: spec
        for spec in (
            ErrorSpec("bad_message", 400, "a frame failed validation"),
            ErrorSpec("bad_request", 400, "a request's fields are invalid"),
            ErrorSpec("protocol_version", 500, "the peer speaks another protocol version"),
            ErrorSpec("context_too_long", 400, "prompt + max_tokens exceed the model's context"),
            ErrorSpec("unsupported", 400, "the worker's engine/backend cannot do what was asked"),
            ErrorSpec("engine_error", 500, "the engine failed while running the request"),
            ErrorSpec("worker_lost", 502, "the worker died while the request was streaming"),
            ErrorSpec("overloaded", 503, "queue full; retry after the Retry-After seconds"),
            ErrorSpec("timeout", 504, "the request ran past its deadline"),
            ErrorSpec("unauthorized", 401, "missing or wrong API key"),
            ErrorSpec("not_found", 404, "unknown route or model"),
        )
    }
)


class MosaicError(Exception):
    """An error with a catalogue code; raised where a request (or a frame) cannot be served.

    `request_id` names the request it ends, or is None for a connection-level error.
    """

    def __init__(self, code: str, message: str, request_id: str | None = None) -> None:
        if code not in ERROR_CATALOGUE:
            raise ValueError(f"unknown error code {code!r}; allowed: {', '.join(ERROR_CATALOGUE)}")
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id

    @property
    def http_status(self) -> int:
        return ERROR_CATALOGUE[self.code].http_status
