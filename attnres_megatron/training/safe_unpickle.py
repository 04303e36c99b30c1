"""Restricted unpickling of checkpoint files: no code from a checkpoint directory ever runs.

A pickle can name any importable callable (``os.system``, ``builtins.eval``...) and have the
loader call it. Every pickle read from a checkpoint -- torch.distributed.checkpoint's
``.metadata``, Megatron-Core's ``common.pt``, the byte items (RNG states) inside the
``.distcp`` files, a plain ``model_state.pt`` export -- goes through :class:`RestrictedUnpickler`,
which resolves only the globals in :data:`ALLOWED` (found by loading the checkpoints
``attnres-pretrain`` and Megatron-LM write) and refuses anything else with
:class:`RefusedPickleError` naming the file and the global. :func:`install` puts it where torch
and Megatron-Core read those files.
"""

from __future__ import annotations

import io
import os
import pickle
import types
from typing import IO, Any, Union

import torch

# (module, name) of every global a checkpoint written by attnres-pretrain holds, besides torch
# dtypes and storage types: the torch.distributed.checkpoint metadata classes, Megatron-Core's
# placeholder classes of older distributed checkpoints, torch's tensor and parameter rebuild
# functions, and inert builtins. Each only builds data; none can run code it is given.
ALLOWED: frozenset[tuple[str, str]] = frozenset(
    {
        ("collections", "OrderedDict"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
        ("builtins", "slice"),
        ("builtins", "bytearray"),
        ("_io", "BytesIO"),  # Transformer Engine's extra state in a plain state-dict export
        ("_codecs", "encode"),  # bytes in protocol-2 pickles (torch.save)
        ("pathlib", "PosixPath"),
        ("pathlib", "PurePosixPath"),
        ("torch", "Size"),
        ("torch", "device"),
        ("torch._utils", "_rebuild_tensor_v2"),
        ("torch._utils", "_rebuild_parameter"),
        ("torch.serialization", "_get_layout"),
        ("torch.distributed.checkpoint.metadata", "Metadata"),
        ("torch.distributed.checkpoint.metadata", "MetadataIndex"),
        ("torch.distributed.checkpoint.metadata", "StorageMeta"),
        ("torch.distributed.checkpoint.metadata", "TensorStorageMetadata"),
        ("torch.distributed.checkpoint.metadata", "BytesStorageMetadata"),
        ("torch.distributed.checkpoint.metadata", "ChunkStorageMetadata"),
        ("torch.distributed.checkpoint.metadata", "TensorProperties"),
        ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING"),
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch.distributed.checkpoint.planner", "SavePlan"),
        ("torch.distributed.checkpoint.planner", "WriteItem"),
        ("torch.distributed.checkpoint.planner", "WriteItemType"),
        ("torch.distributed.checkpoint.planner", "TensorWriteData"),
        ("megatron.core.dist_checkpointing.strategies.torch", "MCoreMetadata"),
        ("megatron.core.dist_checkpointing.strategies.torch", "MCoreSavePlan"),
        # Megatron-LM's checkpoint content (attnres-pretrain writes it too): the run's arguments
        # (an argparse.Namespace, read as SavedArgs below) and the enums and numpy arrays among
        # them and in its RNG states -- the classes Megatron-Core itself registers as safe for
        # torch's weights-only loader (megatron/core/safe_globals.py). Enum members are looked
        # up by value; numpy's _reconstruct only allocates an array that the pickle then fills.
        ("argparse", "Namespace"),
        ("types", "SimpleNamespace"),
        ("signal", "Signals"),
        ("megatron.core.enums", "ModelType"),
        ("megatron.core.transformer.enums", "AttnBackend"),
        ("megatron.core.transformer.enums", "CudaGraphScope"),
        ("megatron.core.rerun_state_machine", "RerunMode"),
        ("megatron.core.rerun_state_machine", "RerunState"),
        ("megatron.core.rerun_state_machine", "RerunDiagnostic"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.dtypes", "UInt32DType"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
    }
)


class SavedArgs(dict):
    """A checkpoint's ``argparse.Namespace`` of run arguments, as the restricted unpickler reads
    it: a dict of its attributes (what attnres-pretrain's readers take) that also answers
    attribute access (what Megatron-LM's code uses). Unpickling only stores the saved values."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise RefusedPickleError(f"argparse.Namespace with a {type(state).__name__} state")
        self.update(state)


# Globals read as another (data-only) class.
_READ_AS: dict[tuple[str, str], type] = {("argparse", "Namespace"): SavedArgs}


class RefusedPickleError(pickle.UnpicklingError):
    """A checkpoint file names a global that no checkpoint needs (it could run code)."""


def _refusal(source: str, module: str, name: str) -> str:
    return (
        f"{source}: refused to unpickle {module}.{name}: a checkpoint written by attnres-pretrain "
        "or Megatron-LM never holds it, and loading it could run code. The file was written by "
        "something else or altered; do not load it (re-save the checkpoint, or load another one)."
    )


def _admitted(module: str, name: str) -> Any:
    """The object ``module.name`` when the allowlist admits it, else None."""
    if (module, name) in _READ_AS:
        return _READ_AS[module, name]
    if (module, name) in ALLOWED:
        return getattr(__import__(module, fromlist=[name]), name)
    if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
        return getattr(torch, name)
    return None


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals in :data:`ALLOWED` (and torch dtypes)."""

    source = "a checkpoint file"

    def find_class(self, module: str, name: str) -> Any:
        found = _admitted(module, name)
        if found is None:
            raise RefusedPickleError(_refusal(self.source, module, name))
        return found


def _restricted_module(source: str) -> types.ModuleType:
    """A pickle module (``Unpickler`` and ``load``) for ``torch.load``, naming ``source`` in errors."""
    module = types.ModuleType("attnres_restricted_pickle")
    unpickler = type("Unpickler", (RestrictedUnpickler,), {"source": source})
    module.Unpickler = unpickler
    module.load = lambda file, **kwargs: unpickler(file, **kwargs).load()
    return module


def restricted_pickle_load(file: IO[bytes], source: str) -> Any:
    """Unpickle a plain pickle stream (e.g. ``.metadata``) with the allowlist."""
    return _restricted_module(source).load(file)


def _forced_weights_only() -> bool:
    return os.getenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "0").lower() in ("1", "y", "yes", "true")


def restricted_torch_load(file: Union[str, os.PathLike, IO[bytes]], source: str = "") -> Any:
    """``torch.load`` on the CPU with the allowlist (torch's weights-only loader when forced)."""
    source = source or str(file)
    if _forced_weights_only():  # torch refuses a pickle module then; its own allowlist applies
        return torch.load(file, map_location="cpu", weights_only=True)
    return torch.load(file, map_location="cpu", weights_only=False, pickle_module=_restricted_module(source))


# ---------------------------------------------------------------------------- installation


def _read_metadata(self: Any, *args: Any, **kwargs: Any) -> Any:
    """``FileSystemReader.read_metadata`` with the restricted unpickler."""
    from torch.distributed.checkpoint.metadata import StorageMeta

    path = self._get_metadata_path(kwargs.get("rank"))
    with self.fs.create_stream(path, "rb") as stream:
        metadata = restricted_pickle_load(stream, str(path))
    for info in (getattr(metadata, "storage_data", None) or {}).values():
        name = getattr(info, "relative_path", "")
        if not isinstance(name, str) or os.path.basename(name) != name or name in ("", ".", ".."):
            raise RefusedPickleError(
                f"{path}: names the data file {name!r}, outside the checkpoint directory"
            )
    if getattr(metadata, "storage_meta", None) is None:
        metadata.storage_meta = StorageMeta()
    metadata.storage_meta.load_id = self.load_id
    return metadata


def _load_bytes(self: Any, read_item: Any, value: io.BytesIO) -> None:
    """``DefaultLoadPlanner.load_bytes`` with the restricted unpickler."""
    from torch.distributed.checkpoint import default_planner

    fqn = read_item.dest_index.fqn
    storage = getattr(getattr(self, "metadata", None), "storage_data", None) or {}
    info = storage.get(read_item.storage_index)
    where = f"{info.relative_path} (item {fqn})" if info is not None else f"checkpoint item {fqn}"
    loaded = restricted_torch_load(value, where)
    if self.flatten_state_dict:
        default_planner.set_element(self.original_state_dict, self.mappings[fqn], loaded)
    else:
        self.state_dict[fqn] = loaded


def _load_common(self: Any, checkpoint_dir: Union[str, os.PathLike]) -> Any:
    """Megatron-Core's ``TorchCommonLoadStrategy.load_common`` with the restricted unpickler."""
    from megatron.core.dist_checkpointing.core import CheckpointingException
    from megatron.core.dist_checkpointing.strategies.common import COMMON_STATE_FNAME

    path = os.path.join(checkpoint_dir, COMMON_STATE_FNAME)
    if not os.path.isfile(path):
        raise CheckpointingException(f"Common file {path} does not exist")
    return restricted_torch_load(path, path)


def _refuse_sharded_object_files(self: Any, sharded_objects_state_dict: Any, checkpoint_dir: Any) -> None:
    """Per-object ``.pt`` files belong to other checkpoint formats, which are not loaded here."""
    raise RefusedPickleError(
        f"{checkpoint_dir}: sharded objects stored as separate .pt files (not the torch_dist format "
        "attnres-pretrain writes) are not loaded."
    )


_INSTALLED = False


def install() -> None:
    """Route torch's and Megatron-Core's checkpoint unpickling through the allowlist (idempotent)."""
    global _INSTALLED
    if _INSTALLED:
        return
    from megatron.core.dist_checkpointing.strategies.common import TorchCommonLoadStrategy
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.filesystem import FileSystemReader

    for owner, name in (
        (FileSystemReader, "_get_metadata_path"),
        (DefaultLoadPlanner, "load_bytes"),
        (TorchCommonLoadStrategy, "load_common"),
    ):
        if not hasattr(owner, name):  # fail closed on an unknown torch / megatron-core version
            raise RuntimeError(f"cannot secure checkpoint loading: {owner.__qualname__}.{name} not found")
    FileSystemReader.read_metadata = _read_metadata
    DefaultLoadPlanner.load_bytes = _load_bytes
    TorchCommonLoadStrategy.load_common = _load_common
    TorchCommonLoadStrategy.load_sharded_objects = _refuse_sharded_object_files
    _INSTALLED = True
