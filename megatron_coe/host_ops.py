"""HostOps: count, on any device, the host-side work that bounds a small model's speed on a GPU.

    with HostOps() as ops:
        ... one training step, or one layer's forward + backward ...
    ops.launches, ops.syncs, ops.by_op, ops.sync_sites

A GPU runs what the host enqueues; when each kernel is short (a small model, few tokens per
expert) the GPU waits for the host, and the step time is the host's time per op times the ops.
Two counts measure that host side, the same on CPU as on CUDA because they are taken at
PyTorch's dispatcher, below autograd and above the device kernels:

- ``launches``: dispatched ATen ops that do work, i.e. all but views and bare allocations
  (``empty``, ``new_empty``, ``_unsafe_view``, ...).  On a GPU each is about one kernel launch (a few
  microseconds of host time at best; more with Python framework code around it).
- ``syncs``: points where the host must read a value the device computed, so it waits for every
  kernel enqueued before: ``item()`` / ``float()`` / ``bool()`` (``_local_scalar_dense``), ops
  whose output size depends on values (``nonzero``, ``masked_select``, ``unique``, ...), and
  Python-level reads of tensor data (``tolist()``, ``numpy()``, ``cpu()``, ``torch.tensor``
  over a list of 0-dim tensors).  The Python-level reads are counted whatever the tensor's device:
  on a CUDA run they wait only when the tensor is on the GPU, so they are an upper bound.

The Python-level reads are counted by wrapping those functions while the mode is active
(process-wide: other threads' reads count too); one instance counts one block at a time.
``by_op`` counts launches per ATen op, ``by_site`` per Python function (file:function) or, in
backward, per autograd node; ``sync_sites`` names the function that caused each sync.  ``skip``
(default: megatron_coe/cpu.py, the CPU backend's replacements, which do not run on a GPU)
leaves out the syncs of code in files whose path ends with one of its entries; their launches
are counted, as they stand in for Megatron's ops doing the same job on a GPU (the CPU
permutation's ``nonzero`` for Megatron's fixed-shape argsort, for instance).  The counts are a
measurement, not an assertion: tests use them to bound syncs per step.

torch.compile'd functions (the fused SwiGLU of ``model.swiglu_fusion``) do not run compiled
while a dispatch mode is active: TorchDynamo runs them eagerly, so their ops are counted one by
one (forward 3 and backward 20 for Megatron's weighted SwiGLU), where a GPU launches one or two
generated kernels each way.  Count with the fusion off to compare launches.
"""

from __future__ import annotations

import collections
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# ops that launch no kernel besides views: bare allocations, and views outside the view list
_NO_KERNEL = {"aten.empty.memory_format", "aten.empty_strided.default", "aten.new_empty.default",
              "aten.new_empty_strided.default", "aten.empty_like.default",
              "aten._unsafe_view.default", "aten.lift_fresh.default"}
# ops whose output size is data-dependent: the host waits for the device to learn it
_DATA_DEPENDENT = {"aten.nonzero.default", "aten.masked_select.default",
                   "aten.unique_consecutive.default", "aten._unique2.default",
                   "aten.unique_dim.default", "aten.repeat_interleave.Tensor",
                   "aten.bincount.default"}
_SCALAR_READ = "aten._local_scalar_dense.default"


class HostOps(TorchDispatchMode):
    def __init__(self, skip: tuple[str, ...] = ("megatron_coe/cpu.py",)):
        super().__init__()
        self.skip = skip
        self.by_op: collections.Counter[str] = collections.Counter()
        self.by_site: collections.Counter[str] = collections.Counter()
        self.sync_sites: collections.Counter[str] = collections.Counter()
        self.views = 0
        self._saved: list[tuple[object, str, object]] = []

    @property
    def launches(self) -> int:
        return sum(self.by_op.values())

    @property
    def syncs(self) -> int:
        return sum(self.sync_sites.values())

    # -- attribution -------------------------------------------------------------------------

    def _caller(self, skip: bool = True):
        """file:function of the innermost frame outside torch, this file and torch-function
        modes (``__torch_function__``, e.g. the CPU backend's remapping), or None when that
        frame's file is skipped."""
        frame = sys._getframe(1)
        while frame is not None:
            name = frame.f_code.co_filename.replace("\\", "/")
            if not ("/torch/" in name or name.endswith("megatron_coe/host_ops.py")
                    or frame.f_code.co_name == "__torch_function__"):
                break
            frame = frame.f_back
        if frame is None:
            return "?"
        if skip and name.endswith(self.skip):
            return None
        return f"{name.rsplit('/', 1)[-1]}:{frame.f_code.co_name}"

    def _sync(self, n: int = 1) -> None:
        site = self._caller()
        if site is not None and n:
            self.sync_sites[site] += n

    # -- dispatcher ----------------------------------------------------------------------------

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if not (func.is_view or name in _NO_KERNEL):
            self.by_op[name] += 1
            node = torch._C._current_autograd_node()
            self.by_site[f"backward of {node.name()}" if node is not None
                         else self._caller(skip=False)] += 1
            if name == _SCALAR_READ or name in _DATA_DEPENDENT:
                self._sync()
        else:
            self.views += 1
        return func(*args, **(kwargs or {}))

    # -- Python-level reads of tensor data, which CPU tensors do without dispatching -----------

    def __enter__(self):
        if self._saved:
            raise RuntimeError("HostOps is already counting: use a new instance to nest")
        mode = self

        def wrap(owner, attr, count):
            own = attr in vars(owner)  # else inherited (Tensor's methods live on TensorBase)
            original = getattr(owner, attr)

            def read(*args, **kwargs):
                mode._sync(count(*args, **kwargs))
                return original(*args, **kwargs)

            self._saved.append((owner, attr, original if own else None))
            setattr(owner, attr, read)

        wrap(torch.Tensor, "tolist", lambda t, *a, **k: 1)
        wrap(torch.Tensor, "numpy", lambda t, *a, **k: 1)
        wrap(torch.Tensor, "cpu", lambda t, *a, **k: 1)
        wrap(torch, "tensor", lambda data=None, *a, **k: _scalars_in(data))
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            while self._saved:  # exactly as before: own attributes back, inherited ones removed
                owner, attr, original = self._saved.pop()
                if original is None:
                    delattr(owner, attr)
                else:
                    setattr(owner, attr, original)

    def summary(self, top: int = 12) -> dict:
        return {"launches": self.launches, "syncs": self.syncs, "views": self.views,
                "sync_sites": dict(self.sync_sites.most_common()),
                "top_ops": dict(self.by_op.most_common(top)),
                "top_sites": dict(self.by_site.most_common(top))}


def _scalars_in(data) -> int:
    """0-dim tensors inside a (nested) list given to torch.tensor: each is read on the host (a
    tensor given alone is copied on its device, not read)."""
    if not isinstance(data, (list, tuple)):
        return 0
    return sum(1 if torch.is_tensor(d) and d.dim() == 0 else _scalars_in(d) for d in data)
