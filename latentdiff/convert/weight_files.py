"""Reading third-party weight files as numpy state dicts: .safetensors (preferred), or PyTorch files through
torch.load(weights_only=True) (PyTorch only needed for those), and JSON config files of diffusers components."""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np

from latentdiff import config_utils
from latentdiff.convert.key_tables import ConversionError


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


def read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path!r} not found")
    return config_utils.read_json_file(path, "a diffusers config")


def read_weights(path: str) -> tuple[dict[str, np.ndarray], int]:
    """A weight file -> (numpy state dict, training step or -1): .safetensors (preferred), or a torch file read with
    torch.load(weights_only=True); a checkpoint holding {'state_dict': ..., 'global_step': ...} (CompVis / Lightning
    .ckpt) is unwrapped. Non-tensor entries inside the state dict are an error."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weight file {path!r} not found")
    if path.endswith(".safetensors"):
        import ml_dtypes  # registers numpy's 'bfloat16' dtype, which bf16 safetensors files need
        from safetensors.numpy import load_file

        bf16 = np.dtype(ml_dtypes.bfloat16)
        return {k: v.astype(np.float32) if v.dtype == bf16 else v for k, v in load_file(path).items()}, -1
    torch = import_torch(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError and friends: the file holds more than tensors and plain containers
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConversionError(
            f"{path!r} cannot be read with torch.load(weights_only=True): {first[:200]}. Only plain tensor "
            "checkpoints are accepted; use the model's .safetensors release instead"
        ) from None
    step = -1
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        step = int(obj["global_step"]) if isinstance(obj.get("global_step"), int) else -1
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ConversionError(f"{path!r} holds a {type(obj).__name__}, not a state dict")
    bad = sorted(str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor))
    if bad:
        raise ConversionError(f"{path!r}: entries that are not tensors: {bad[:10]}")
    return to_numpy_state_dict(obj), step


def load_state_dict(path: str) -> dict[str, np.ndarray]:
    """read_weights without the step."""
    return read_weights(path)[0]
