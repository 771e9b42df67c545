"""The MosaicKV wire protocol (docs/PROTOCOL.md): one schema, mirrored by src/protocol/."""

from .errors import ERROR_CATALOGUE, ErrorSpec, MosaicError
from .wire import (
    CONTROL_SENDS,
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    SCHEMA,
    TENSOR_DTYPES,
    WORKER_SENDS,
    ProtocolError,
    Tensor,
    decode,
    encode,
    validate,
)

__all__ = [
    "CONTROL_SENDS",
    "ERROR_CATALOGUE",
    "MESSAGE_TYPES",
    "PROTOCOL_VERSION",
    "SCHEMA",
    "TENSOR_DTYPES",
    "WORKER_SENDS",
    "ErrorSpec",
    "MosaicError",
    "ProtocolError",
    "Tensor",
    "decode",
    "encode",
    "validate",
]
