"""Full attention: every token dense, nothing selected. The accuracy and memory reference."""

from typing import ClassVar

from mosaickv.core.base import CompressionMethod


class FullMethod(CompressionMethod):
    """Dense KV cache (standard attention, Vaswani et al. 2017); every token stays in the tail."""

    name: ClassVar[str] = "full"
    compresses: ClassVar[bool] = False
