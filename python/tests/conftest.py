"""Shared test settings."""

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_intra_op_thread() -> Iterator[None]:
    """The tests' tensors are small: torch's intra-op pool only adds contention on a loaded 2-core CI
    box (an einsum of [1, 2, 32] took 20 ms with 2 threads there, 80 us with 1). Parallelism that a
    test checks (the cache manager's re-encoders) comes from its own threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
