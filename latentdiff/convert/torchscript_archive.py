"""Reads the tensors of a TorchScript archive (`torch.jit.save` zip) as data, without torch and without running it.

`torch.jit.load` compiles the archive's `code/` and calls each module's `__setstate__`, so a crafted `.pt` runs code at
load. This reader never looks at `code/`: it unpickles `<root>/data.pkl` with an unpickler that admits only
  - `__torch__.*` classes (the scripted modules), each rebuilt as an inert `ScriptObject` that just records its state;
  - `torch.<Type>Storage` dtype markers, whose bytes come from the archive's `<root>/data/<key>` records;
  - `torch._utils._rebuild_tensor_v2` / `_rebuild_parameter` (numpy views, bounds-checked), `collections.OrderedDict`,
    `torch.jit._pickle.build_*list`;
and refuses every other global (os.system, builtins.eval, ...) with `UnsafePickleError` before anything is called.
`read_state_dict` then walks the module tree and returns the tensor attributes under their `state_dict()` names
(`net.layers.conv.weight`): parameters and buffers.
"""

from __future__ import annotations

import collections
import io
import pickle
import zipfile

import ml_dtypes
import numpy as np

from latentdiff.convert.safe_pickle import UnsafePickleError

STORAGE_DTYPES: dict[str, np.dtype] = {
    "FloatStorage": np.dtype(np.float32),
    "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}


class ScriptObject:
    """Stands for an instance of a scripted `__torch__.*` class: holds the pickled state, runs nothing."""

    qualified_name = "__torch__"

    def __init__(self, *args: object) -> None:
        self.state: object = None

    def __setstate__(self, state: object) -> None:
        self.state = state


class _StorageType:
    """`torch.FloatStorage` etc.: only a dtype."""

    def __init__(self, dtype: np.dtype) -> None:
        self.dtype = dtype


def _check_strides(storage: np.ndarray, offset: int, size: tuple, stride: tuple) -> None:
    """A tensor view must stay inside its storage (a crafted file could otherwise read outside it)."""
    if offset < 0 or any(s < 0 for s in size) or any(s < 0 for s in stride) or len(size) != len(stride):
        raise UnsafePickleError(f"tensor with offset {offset}, size {size}, stride {stride} is malformed")
    if any(s == 0 for s in size):
        return
    last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
    if last >= storage.size:
        raise UnsafePickleError(f"tensor view (last element {last}) reaches past its storage of {storage.size}")


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    """torch._utils._rebuild_tensor_v2 -> a numpy copy of the strided view."""
    if not isinstance(storage, np.ndarray):
        raise UnsafePickleError(f"tensor storage is a {type(storage).__name__}, expected an archive record")
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    _check_strides(storage, int(storage_offset), size, stride)
    item = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage[int(storage_offset) :], shape=size, strides=tuple(s * item for s in stride), writeable=False
    )
    return np.array(view)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    """torch._utils._rebuild_parameter -> the tensor's data."""
    return data


def _build_list(items):
    """torch.jit._pickle.build_intlist / build_doublelist / build_boollist / build_tensorlist -> a list."""
    return list(items)


_FIXED_GLOBALS: dict[tuple[str, str], object] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch.jit._pickle", "build_intlist"): _build_list,
    ("torch.jit._pickle", "build_doublelist"): _build_list,
    ("torch.jit._pickle", "build_boollist"): _build_list,
    ("torch.jit._pickle", "build_tensorlist"): _build_list,
}


class ArchiveUnpickler(pickle.Unpickler):
    """Unpickles a TorchScript `data.pkl`; storages are read from `records` (record key -> bytes)."""

    def __init__(self, data: bytes, records: dict[str, bytes]) -> None:
        super().__init__(io.BytesIO(data))
        self.records = records
        self.classes: dict[str, type] = {}

    def find_class(self, module: str, name: str) -> object:
        if (module, name) in _FIXED_GLOBALS:
            return _FIXED_GLOBALS[(module, name)]
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(STORAGE_DTYPES[name])
        if module == "__torch__" or module.startswith("__torch__."):
            qualified = f"{module}.{name}"
            if qualified not in self.classes:  # a fresh inert class per scripted class name
                self.classes[qualified] = type(name, (ScriptObject,), {"qualified_name": qualified})
            return self.classes[qualified]
        raise UnsafePickleError(f"refusing global {module}.{name} in a TorchScript archive: only tensors and modules")

    def persistent_load(self, pid: object) -> np.ndarray:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise UnsafePickleError(f"unexpected persistent id {pid!r} in a TorchScript archive")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType) or not isinstance(key, str) or key not in self.records:
            raise UnsafePickleError(f"storage {key!r} of type {storage_type!r} is not a record of this archive")
        data = np.frombuffer(self.records[key], dtype=storage_type.dtype)
        if data.size < int(numel):
            raise UnsafePickleError(f"storage {key!r} holds {data.size} elements, the archive says {numel}")
        return data


def _archive_root(names: list[str]) -> str:
    roots = {n.split("/")[0] for n in names if n.endswith("/data.pkl") and n.count("/") == 1}
    if len(roots) != 1:
        raise UnsafePickleError(f"not a TorchScript archive: expected one '<root>/data.pkl', found {sorted(roots)}")
    return roots.pop()


def load_module_tree(path: str) -> ScriptObject:
    """The archive's root module as inert `ScriptObject`s (state = attribute dict), tensors as numpy arrays."""
    with zipfile.ZipFile(path) as archive:
        root = _archive_root(archive.namelist())
        prefix = f"{root}/data/"
        records = {n[len(prefix) :]: archive.read(n) for n in archive.namelist() if n.startswith(prefix)}
        data = archive.read(f"{root}/data.pkl")
    module = ArchiveUnpickler(data, records).load()
    if not isinstance(module, ScriptObject):
        raise UnsafePickleError(f"{path}: data.pkl holds a {type(module).__name__}, expected a scripted module")
    return module


def _attributes(module: ScriptObject) -> dict:
    state = module.state
    if isinstance(state, dict):
        return state
    kind = type(state).__name__
    raise UnsafePickleError(f"module {module.qualified_name} has a custom state ({kind}), not an attribute dict")


def module_tensors(module: ScriptObject, prefix: str = "") -> dict[str, np.ndarray]:
    """'.'-joined attribute paths of every tensor in the module tree (the names `state_dict()` gives)."""
    out: dict[str, np.ndarray] = {}
    for name, value in _attributes(module).items():
        if isinstance(value, np.ndarray):
            out[f"{prefix}{name}"] = value
        elif isinstance(value, ScriptObject):
            out |= module_tensors(value, f"{prefix}{name}.")
    return out


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """The tensors of the TorchScript archive at `path` by state-dict name, read as data (never executed)."""
    return module_tensors(load_module_tree(path))


def is_torchscript(path: str) -> bool:
    """TorchScript archives are zips with a `<root>/code/` folder (plain torch.save zips have none)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.split("/")[1:2] == ["code"] for name in archive.namelist())
