"""What autograd keeps for backward, in bytes, while a forward and backward run.

Every tensor autograd saves passes through a ``saved_tensors_hooks`` pack; a storage counts
once, however many saved tensors view it, from its first save until the last of them is
released (after its backward node ran, or with the graph).  Parameters' storages are left out:
they are the model's state, not activations.  ``now`` is what is held at this moment, ``peak``
the most held at any moment (a recomputed forward's tensors count while they live), and
``by_label`` splits ``now`` by the label the ``label`` callable gave when a storage was first
saved (the module running at the time, say).
"""

from __future__ import annotations

import weakref
from collections import Counter
from typing import Callable

import torch


class SavedTensors:
    """Use as ``with SavedTensors(model) as saved: ...``; read ``now``, ``peak``, ``by_label``."""

    def __init__(self, module: torch.nn.Module, label: Callable[[], str] = lambda: "all"):
        self._params = {p.untyped_storage().data_ptr() for p in module.parameters()}
        self._label = label
        self._live: dict[tuple[int, int], list] = {}  # storage -> [bytes, saves alive, label]
        self.now = self.peak = 0
        self.by_label: Counter = Counter()
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)

    def __enter__(self) -> "SavedTensors":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    def _pack(self, tensor: torch.Tensor) -> "_Held":
        # detached: a saved output would otherwise hold its own node (tensor -> grad_fn ->
        # this object -> tensor), a cycle that outlives a graph dropped without a backward
        held = _Held(tensor.detach())
        storage = tensor.untyped_storage()
        if storage.data_ptr() in self._params:
            return held
        key = (storage.data_ptr(), storage.nbytes())
        if key in self._live:
            self._live[key][1] += 1
        else:
            label = self._label()
            self._live[key] = [key[1], 1, label]
            self.now += key[1]
            self.by_label[label] += key[1]
            self.peak = max(self.peak, self.now)
        weakref.finalize(held, self._release, key)
        return held

    def _release(self, key) -> None:
        entry = self._live[key]
        entry[1] -= 1
        if entry[1] == 0:
            del self._live[key]
            self.now -= entry[0]
            self.by_label[entry[2]] -= entry[0]


class _Held:
    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


def _unpack(held: _Held) -> torch.Tensor:
    return held.tensor
