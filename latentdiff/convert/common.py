"""Shared machinery of the weight converters: explicit key tables, layout transforms, strict checks.

A converter builds a *table*: a list of `Rule(src, dst, transform)` where `src` is a key of the source state dict
(PyTorch layout, numpy arrays) and `dst` is a '/'-joined path into our Flax params. `apply_table` checks every
converted array against the abstract params from `jax.eval_shape(init)`, and raises `ConversionError` listing every
missing, unexpected or mis-shaped key: nothing is renamed heuristically and nothing is silently dropped (keys a
converter deliberately ignores are passed as `ignored`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import jax
import numpy as np
from flax import traverse_util

from latentdiff.errors import UserError


class ConversionError(UserError):
    """Raised when a state dict does not map one-to-one onto our params."""


def conv_kernel(w: np.ndarray) -> np.ndarray:
    """PyTorch conv weight [O, I, kh, kw] -> Flax kernel [kh, kw, I, O]."""
    return np.transpose(w, (2, 3, 1, 0))


def dense_kernel(w: np.ndarray) -> np.ndarray:
    """PyTorch linear weight [O, I] -> Flax kernel [I, O]. A 1x1 conv weight [O, I, 1, 1] is accepted too."""
    if w.ndim == 4:
        w = w[:, :, 0, 0]
    return np.transpose(w, (1, 0))


def identity(w: np.ndarray) -> np.ndarray:
    """Biases, norm scales and embeddings keep their layout."""
    return w


def inverse_conv_kernel(k: np.ndarray) -> np.ndarray:
    """Flax kernel [kh, kw, I, O] -> PyTorch conv weight [O, I, kh, kw]."""
    return np.transpose(k, (3, 2, 0, 1))


def inverse_dense_kernel(k: np.ndarray) -> np.ndarray:
    """Flax kernel [I, O] -> PyTorch linear weight [O, I]."""
    return np.transpose(k, (1, 0))


@dataclass(frozen=True)
class Rule:
    """One source key mapped to one destination param path ('a/b/kernel') through `transform`."""

    src: str
    dst: str
    transform: Callable[[np.ndarray], np.ndarray] = identity


def import_torch(path: str):
    """The torch module, to read the PyTorch file `path` (torch.load with weights_only=True); ConversionError in one
    line when PyTorch is not installed (it is never needed to train or sample, only to read .pth / .ckpt files)."""
    try:
        import torch
    except ImportError:
        raise ConversionError(
            f"reading {path} (a PyTorch pickle file) needs PyTorch: `pip install torch` (the CPU build is enough), "
            "or use a .safetensors copy of the weights"
        ) from None
    return torch


def to_numpy_state_dict(state_dict: Mapping[str, object]) -> dict[str, np.ndarray]:
    """Torch tensors (or anything array-like) -> float32/int numpy arrays, without importing torch."""
    out = {}
    for key, value in state_dict.items():
        if hasattr(value, "detach"):
            value = value.detach().cpu().float().numpy() if value.is_floating_point() else value.detach().cpu().numpy()
        out[key] = np.asarray(value)
    return out


def apply_table(
    table: Iterable[Rule],
    state_dict: Mapping[str, np.ndarray],
    abstract_params: Mapping,
    *,
    ignored: Iterable[str] = (),
    what: str = "state dict",
) -> dict:
    """Maps `state_dict` into a params pytree shaped like `abstract_params` (from jax.eval_shape).

    Raises ConversionError naming every missing source key, unexpected source key (not in the table and not
    `ignored`), shape mismatch, and every destination param the table leaves unset.
    """
    table = list(table)
    flat_target = {"/".join(k): v for k, v in traverse_util.flatten_dict(dict(abstract_params)).items()}
    problems: list[str] = []
    out: dict[str, np.ndarray] = {}
    used: set[str] = set()
    for rule in table:
        if rule.src not in state_dict:
            problems.append(f"missing source key {rule.src!r} (for {rule.dst})")
            continue
        used.add(rule.src)
        if rule.dst not in flat_target:
            problems.append(f"table maps {rule.src!r} to unknown param {rule.dst!r}")
            continue
        value = np.asarray(rule.transform(np.asarray(state_dict[rule.src])))
        expected = tuple(flat_target[rule.dst].shape)
        if value.shape != expected:
            problems.append(f"shape mismatch for {rule.src!r} -> {rule.dst}: got {value.shape}, expected {expected}")
            continue
        if rule.dst in out:
            problems.append(f"param {rule.dst} assigned twice (second from {rule.src!r})")
        out[rule.dst] = value.astype(flat_target[rule.dst].dtype)
    ignored = set(ignored)
    unexpected = sorted(set(state_dict) - used - ignored)
    problems += [f"unexpected source key {k!r}" for k in unexpected]
    unset = sorted(set(flat_target) - set(out))
    problems += [f"param {k} not set by any source key" for k in unset]
    if problems:
        head = f"{what} does not match the model config ({len(problems)} problems):\n  "
        raise ConversionError(head + "\n  ".join(problems[:50]) + ("\n  ..." if len(problems) > 50 else ""))
    return traverse_util.unflatten_dict({tuple(k.split("/")): jax.numpy.asarray(v) for k, v in out.items()})


def invert_table(table: Iterable[Rule], inverse: Mapping[Callable, Callable]) -> list[Rule]:
    """The export table: dst -> src with each transform replaced by its inverse (`inverse[transform]`)."""
    return [Rule(r.dst, r.src, inverse[r.transform]) for r in table]


INVERSES: dict[Callable, Callable] = {
    conv_kernel: inverse_conv_kernel,
    dense_kernel: inverse_dense_kernel,
    identity: identity,
}
