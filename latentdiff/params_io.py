"""Params pytrees <-> safetensors files ('/'-joined keys), shape-checked against an abstract target on load."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from latentdiff import atomic_files
from latentdiff.errors import UserError


def flatten(tree: Mapping) -> dict[str, np.ndarray]:
    """{'a': {'b': x}} -> {'a/b': np.asarray(x)}."""
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(dict(tree), sep="/").items()}


def default_file_mode() -> int:
    """0o666 minus the process umask: the mode `open(path, 'w')` would give a new file."""
    current = os.umask(0o022)  # os.umask is the only portable reader; restored at once
    os.umask(current)
    return 0o666 & ~current


def write_safetensors(path: str, arrays: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> None:
    """Writes flat arrays as safetensors, atomically (temporary file + rename), with the user's umask mode (the
    safetensors writer alone creates files 0600). Every safetensors file latentdiff writes goes through here."""
    from safetensors.numpy import save_file

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_files.replacing(path) as tmp:
        save_file(dict(arrays), tmp, metadata=dict(metadata or {}))
        os.chmod(tmp, default_file_mode())


def save_params(path: str, tree: Mapping, metadata: Mapping[str, str] | None = None) -> None:
    """Writes a params pytree as safetensors ('/'-joined keys), atomically."""
    write_safetensors(path, flatten(jax.device_get(tree)), metadata)


def read_metadata(path: str) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(path, framework="numpy") as f:
        return dict(f.metadata() or {})


def load_params(path: str, abstract: Mapping | None = None) -> dict:
    """Reads a safetensors params file; with `abstract` (jax.eval_shape of init) every key and shape must match."""
    from safetensors.numpy import load_file

    if not os.path.isfile(path):
        raise FileNotFoundError(f"params file {path!r} not found")
    flat = load_file(path)
    if abstract is not None:
        want = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(dict(abstract), sep="/").items()}
        got = {k: tuple(v.shape) for k, v in flat.items()}
        problems = [f"{k}: file {got.get(k)} vs config {s}" for k, s in want.items() if got.get(k) != s]
        problems += [f"{k}: in file, not in config" for k in got if k not in want]
        if problems:
            raise UserError(
                f"{path} does not match the model config ({'; '.join(problems[:3])}"
                f"{' ...' if len(problems) > 3 else ''}); load it with the config it was saved with"
            )
    return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


def count(tree: Any) -> int:
    """Number of scalars in a pytree of arrays or ShapeDtypeStructs."""
    return int(sum(np.prod(leaf.shape, dtype=np.int64) for leaf in jax.tree.leaves(tree)))
