"""Per-head rotations from the eigenvectors of a segment's second-moment matrix, accumulated
incrementally so decode tokens can be folded in one at a time."""

import torch


class CovarianceAccumulator:
    """Running count, sum and sum of outer products of vectors, per KV head (float64).

    ``update`` is exact and order-independent, so the moments of tokens added one by one during
    decode equal the moments of the same tokens added in one batch.

    Args:
        n_heads: H_kv.
        dim: D.
        device: where the sums live (the cache's device).
    """

    def __init__(self, n_heads: int, dim: int, device: torch.device | str = "cpu") -> None:
        self.count = 0
        self.sum = torch.zeros(n_heads, dim, dtype=torch.float64, device=device)
        self.outer = torch.zeros(n_heads, dim, dim, dtype=torch.float64, device=device)

    def update(self, x: torch.Tensor) -> None:
        """Fold in vectors ``x``: [t, H_kv, D], any float dtype (t may be 0).

        Products run in float32 for 16/32-bit inputs (a bf16 x bf16 product is exact there, and float64
        matmuls are several times slower on CPU); sums accumulate in float64.
        """
        xc = x.to(torch.float64) if x.dtype == torch.float64 else x.float()
        self.count += x.shape[0]
        self.sum += xc.sum(0).double()
        self.outer += torch.einsum("thd,the->hde", xc, xc).double()

    def second_moment(self) -> torch.Tensor:
        """E[x x^T] per head: [H_kv, D, D] float64 (needs count >= 1)."""
        if self.count == 0:
            raise ValueError("second_moment needs at least one vector; the accumulator is empty")
        return self.outer / self.count

    def covariance(self) -> torch.Tensor:
        """Unbiased covariance per head (same convention as ``torch.cov``): [H_kv, D, D] float64."""
        if self.count < 2:
            raise ValueError(f"covariance needs at least two vectors, have {self.count}")
        mean = self.sum / self.count
        centred = self.outer - self.count * torch.einsum("hd,he->hde", mean, mean)
        return centred / (self.count - 1)


def rotation_from_moment(moment: torch.Tensor) -> torch.Tensor:
    """Rotations whose rows are the eigenvectors of ``moment``, eigenvalue descending.

    We rotate by the eigenvectors of the uncentred second moment E[x x^T] (the covariance about
    zero): the stored vectors are not centred, so this is the basis that puts the most of their
    energy in the fewest leading coordinates.

    Args:
        moment: [H, D, D] symmetric, any float dtype.
    Returns:
        R: [H, D, D] float32, orthonormal; rotated x' = R x (row form: x' = x @ R^T).
    """
    _, vecs = torch.linalg.eigh(moment.to(torch.float64))
    return vecs.flip(-1).transpose(-1, -2).contiguous().to(torch.float32)
