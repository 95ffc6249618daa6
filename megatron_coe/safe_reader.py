"""Reading Megatron's distributed checkpoints without running code stored in them.

The format pickles in two places, and torch reads both with full unpickling: the ``.metadata``
file (``FileSystemReader.read_metadata``: ``pickle.load``) and every non-tensor item, e.g.
Megatron's common state (optimizer parameter groups, step counters) and each layer's
``_extra_state`` (``DefaultLoadPlanner.load_bytes``: ``torch.load(weights_only=False)``).  A
crafted checkpoint can therefore run any code when it is loaded.  :class:`SafeReader` closes
both:

  * ``.metadata`` is unpickled by :class:`_MetadataUnpickler`, which resolves only the classes
    the format is made of (:data:`METADATA_GLOBALS`, plus torch dtypes); any other global is
    refused before anything is built from it;
  * a non-tensor item reaches the load planner only after it has loaded with
    ``torch.load(weights_only=True)``, so the planner's own (unrestricted) load of the same bytes
    can only build what the weights-only unpickler allows: containers, numbers, strings,
    tensors.  Tensors themselves torch already reads weights-only.

:func:`reading` puts the reader under Megatron's load path (``dist_checkpointing.load`` and its
common-state read) for the duration of one load and collects its refusals
(:class:`UnsafeCheckpoint`; torch's loader catches and rewraps them, so they are recorded).
The ``.metadata`` allow-list is the format's own dataclasses; should a future torch add one,
its checkpoints are refused with the class named (extend the list after reading that class).
"""

from __future__ import annotations

import contextlib
import io
import pickle

import torch
from torch.distributed.checkpoint import FileSystemReader

_DCP = "torch.distributed.checkpoint"
METADATA_GLOBALS = frozenset({
    *((f"{_DCP}.metadata", name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")),
    # Megatron keeps every rank's save plan in the metadata (metadata reuse across saves)
    *((f"{_DCP}.planner", name) for name in (
        "SavePlan", "WriteItem", "WriteItemType", "TensorWriteData", "BytesIOWriteData")),
    (f"{_DCP}.filesystem", "_StorageInfo"),
    (f"{_DCP}.filesystem", "_StoragePrefix"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # torch.strided etc. by name
    ("collections", "OrderedDict"),
})


class UnsafeCheckpoint(pickle.UnpicklingError):
    """A checkpoint file holds something other than what the format writes."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in METADATA_GLOBALS or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise UnsafeCheckpoint(f".metadata refers to {module}.{name}, which the checkpoint "
                               "format never holds")


def _weights_only_check(value: io.BytesIO, what: str) -> None:
    try:
        torch.load(value, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UnsafeCheckpoint(f"item {what} is not plain data ({first})") from None
    value.seek(0)


class _WeightsOnlyItems:
    """The load planner as :class:`SafeReader` hands it to torch's ``read_data``: non-tensor
    items are checked weights-only before the planner reads them; everything else passes."""

    def __init__(self, planner, refusals: list):
        self._planner, self._refusals = planner, refusals

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            _weights_only_check(value, read_item.dest_index.fqn)
        except UnsafeCheckpoint as err:
            self._refusals.append(err)
            raise
        self._planner.load_bytes(read_item, value)

    def __getattr__(self, name):
        return getattr(self._planner, name)


class SafeReader(FileSystemReader):
    """torch's FileSystemReader with restricted unpickling (see the module docstring);
    what it refuses is also appended to ``refusals``."""

    def __init__(self, path, refusals: list | None = None):
        super().__init__(path)
        self.refusals = [] if refusals is None else refusals

    def read_metadata(self, *args, **kwargs):
        try:
            return self._read_metadata(kwargs.get("rank"))
        except UnsafeCheckpoint as err:
            self.refusals.append(err)
            raise

    def _read_metadata(self, rank):
        from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

        path = (self._get_metadata_path(rank) if hasattr(self, "_get_metadata_path")
                else self.fs.concat_path(self.path, ".metadata"))
        with self.fs.create_stream(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if not isinstance(metadata, Metadata):
            raise UnsafeCheckpoint(f".metadata holds a {type(metadata).__name__}, not the "
                                   "format's Metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def read_data(self, plan, planner):
        return super().read_data(plan, _WeightsOnlyItems(planner, self.refusals))


_READER_FACTORIES = ("megatron.core.dist_checkpointing.strategies.torch",
                     "megatron.core.dist_checkpointing.serialization")


@contextlib.contextmanager
def reading():
    """Within: every reader Megatron's dist_checkpointing opens is a :class:`SafeReader`;
    yields the list of refusals (empty unless something was refused).

    Megatron-Core 0.19.2 makes its readers in ``_get_filesystem_reader`` (imported by name into
    ``serialization`` for the common state); both names are replaced for the block and put back
    after.  If a Megatron lacks them the load is refused rather than done unsafely."""
    import importlib

    refusals: list[UnsafeCheckpoint] = []

    def safe_reader(checkpoint_dir, *args, **kwargs):
        return SafeReader(checkpoint_dir, refusals)

    modules = [importlib.import_module(name) for name in _READER_FACTORIES]
    missing = [m.__name__ for m in modules if not hasattr(m, "_get_filesystem_reader")]
    if missing:
        raise RuntimeError(f"{', '.join(missing)} has no _get_filesystem_reader: this "
                           "megatron-core is not the one megatron-coe supports (0.19.2), so "
                           "checkpoints cannot be read safely")
    originals = [m._get_filesystem_reader for m in modules]
    for m in modules:
        m._get_filesystem_reader = safe_reader
    try:
        yield refusals
    finally:
        for m, original in zip(modules, originals):
            m._get_filesystem_reader = original

