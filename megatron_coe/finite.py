"""all_finite: whether every element of a tensor is finite, as a 0-dim bool tensor (no sync).

    all_finite(x) = isfinite(min(x)) and isfinite(max(x))

min and max propagate NaN, and an infinite element is the minimum (-inf) or the maximum (+inf),
so the two extremes are finite exactly when every element is.  One fused reduction
(``torch.aminmax``) reads x once and allocates nothing of its size; ``torch.isfinite(x).all()``
materialises a boolean per element first and on CPU costs about 16x as much (0.72 ms against
0.04 ms for the [256, 8, 128] output of one CoE iteration, one thread) - paid C times per layer
per step, and once per parameter for the gradient check.
"""

from __future__ import annotations

import torch


def all_finite(x: torch.Tensor) -> torch.Tensor:
    if x.numel() == 0 or not (x.is_floating_point() or x.is_complex()):
        return torch.ones((), dtype=torch.bool, device=x.device)
    if x.is_complex():
        x = torch.view_as_real(x.resolve_conj())
    if x.element_size() == 1:  # FP8: no aminmax kernel
        return torch.isfinite(x).all()
    lo, hi = torch.aminmax(x)
    return torch.isfinite(lo) & torch.isfinite(hi)
