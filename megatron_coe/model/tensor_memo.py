"""One value remembered for one tensor, given back only for that tensor, unmodified.

    memo.remember(t, value);  memo.get(t) -> value while t is the same, living tensor object
                                             and its version counter is unchanged, else None

The tensor is held by a weak reference (a freed tensor's id may be reused), and an in-place
change bumps its version counter.  An inference tensor has no version counter, so nothing is
remembered for it.  A new ``remember`` replaces the last one.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch


class TensorMemo:
    def __init__(self):
        self._entry: tuple[weakref.ref, int, Any] | None = None

    def remember(self, tensor: torch.Tensor, value: Any) -> None:
        self._entry = (None if tensor.is_inference()
                       else (weakref.ref(tensor), tensor._version, value))

    def get(self, tensor: torch.Tensor) -> Any:
        entry = self._entry
        if (entry is None or tensor.is_inference() or entry[0]() is not tensor
                or entry[1] != tensor._version):
            return None
        return entry[2]

    def forget(self) -> None:
        self._entry = None
