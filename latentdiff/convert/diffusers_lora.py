"""UNet LoRA adapters <-> the safetensors layout diffusers' `load_lora_weights` / `load_lora_adapter` read (peft keys).

    unet.{diffusers module}.lora_A.weight   [r, in]  (1x1 conv modules: [r, in, 1, 1])
    unet.{diffusers module}.lora_B.weight   [out, r] (1x1 conv modules: [out, r, 1, 1])

The module names come from the UNet's key table (convert/diffusers_unet.py), so every adapted kernel of ours has
exactly one diffusers module. Export folds the scale alpha / r into lora_B, so a loader that assumes alpha = r
(diffusers does without adapter metadata) applies the same update. Import reads that layout, the adapter metadata
diffusers' save_lora_weights stores (unet.lora_alpha / unet.r) and kohya-style '.alpha' scalars (scale = alpha / r,
folded into B); any key it cannot map is listed in one error, never dropped.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import numpy as np

from latentdiff import lora
from latentdiff.convert.diffusers_unet import conv1x1_kernel, linear_kernel, unet_table
from latentdiff.convert.key_tables import ConversionError, dense_kernel

PREFIX = "unet."
METADATA_KEY = "lora_adapter_metadata"  # diffusers' safetensors metadata entry (a JSON object)
FILE_NAME = "pytorch_lora_weights.safetensors"  # what diffusers' save_lora_weights writes and load_lora_weights reads


def write_lora_file(path: str, state_dict: Mapping[str, np.ndarray]) -> None:
    """A diffusers LoRA file (safetensors, its scale already folded into lora_B), written atomically."""
    from safetensors.numpy import save

    from latentdiff.atomic_files import write_bytes

    write_bytes(path, save({k: np.ascontiguousarray(v) for k, v in state_dict.items()}, metadata={"format": "pt"}))


def read_lora_file(path: str) -> tuple[dict[str, np.ndarray], float]:
    """(state dict, scale) of a diffusers LoRA file (a directory: its pytorch_lora_weights.safetensors). The scale is
    unet.lora_alpha / unet.r from diffusers' adapter metadata (1 without it: alpha = r, as diffusers assumes)."""
    from safetensors import safe_open

    if os.path.isdir(path):
        path = os.path.join(path, FILE_NAME)
    if not os.path.isfile(path) or not path.endswith(".safetensors"):
        raise ConversionError(f"{path}: no LoRA .safetensors file there (diffusers writes {FILE_NAME})")
    try:
        with safe_open(path, "np") as f:
            state_dict = {key: f.get_tensor(key) for key in f.keys()}
            metadata = json.loads((f.metadata() or {}).get(METADATA_KEY) or "{}")
    except Exception as error:  # a damaged header or metadata (safetensors raises its own error type)
        raise ConversionError(f"{path}: not a readable LoRA safetensors file ({type(error).__name__})") from None
    if metadata.get("unet.use_rslora") or metadata.get("unet.use_dora"):
        raise ConversionError(f"{path}: rsLoRA / DoRA adapters are not supported (plain LoRA: scale alpha / r)")
    for pattern in ("unet.rank_pattern", "unet.alpha_pattern"):
        if metadata.get(pattern):
            raise ConversionError(f"{path}: per-module {pattern.split('.')[1]} is not supported (one rank, one alpha)")
    if "unet.lora_alpha" in metadata and "unet.r" in metadata:
        return state_dict, float(metadata["unet.lora_alpha"]) / float(metadata["unet.r"])
    return state_dict, 1.0


def module_table(unet_cfg: Mapping) -> dict[tuple[str, ...], tuple[str, bool]]:
    """{our module path (without 'kernel'): (diffusers module name, is a 1x1 conv)} of every dense kernel: linear
    layers and the 1x1-conv projections (3x3 convolutions take no adapters here: their keys are unmapped)."""
    table = {}
    for rule in unet_table(unet_cfg, "diffusers"):
        dense = rule.transform in (dense_kernel, linear_kernel, conv1x1_kernel)
        if dense and rule.dst.endswith("/kernel") and rule.src.endswith(".weight"):
            table[tuple(rule.dst.split("/")[:-1])] = (rule.src[: -len(".weight")], rule.transform is conv1x1_kernel)
    return table


def export_unet_lora(adapters: Mapping, unet_cfg: Mapping, scale: float) -> dict[str, np.ndarray]:
    """Our UNet adapters (the 'unet' subtree) -> diffusers/peft state dict with `scale` folded into lora_B."""
    table = module_table(unet_cfg)
    out = {}
    for path, pair in lora.adapter_pairs(adapters).items():
        if path not in table:
            raise ConversionError(f"LoRA adapter of {'/'.join(path)} has no diffusers module (not a UNet layer?)")
        name, conv = table[path]
        a = np.asarray(pair[lora.A_NAME], np.float32)
        b = np.asarray(pair[lora.B_NAME], np.float32) * np.float32(scale)
        if a.ndim != 2:
            raise ConversionError(
                f"LoRA adapter of {'/'.join(path)} is stacked ({a.shape}): diffusers has no such layer"
            )
        lora_a, lora_b = a.T, b.T
        if conv:
            lora_a, lora_b = lora_a[:, :, None, None], lora_b[:, :, None, None]
        out[f"{PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(lora_a)
        out[f"{PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(lora_b)
    return out


def import_unet_lora(state_dict: Mapping[str, np.ndarray], unet_cfg: Mapping, scale: float = 1.0) -> dict:
    """A diffusers/peft UNet LoRA state dict -> our 'unet' adapter subtree with `scale` (read_lora_file's) and any
    '.alpha' / r folded into lora_b (merge it with scale 1 · lora_scale). ConversionError listing every key that maps
    to no module of this UNet."""
    by_name = {name: path for path, (name, _) in module_table(unet_cfg).items()}
    parts: dict[str, dict[str, np.ndarray]] = {}
    unmapped = []
    for key, value in state_dict.items():
        body = key[len(PREFIX) :] if key.startswith(PREFIX) else key
        for suffix, part in ((".lora_A.weight", "a"), (".lora_B.weight", "b"), (".alpha", "alpha")):
            if body.endswith(suffix) and body[: -len(suffix)] in by_name:
                parts.setdefault(body[: -len(suffix)], {})[part] = np.asarray(value, np.float32)
                break
        else:
            unmapped.append(key)
    if unmapped:
        shown = ", ".join(sorted(unmapped)[:8]) + (f" (+{len(unmapped) - 8} more)" if len(unmapped) > 8 else "")
        raise ConversionError(
            f"{len(unmapped)} LoRA key(s) map to no module of this UNet (expected unet.<module>.lora_A.weight / "
            f".lora_B.weight, e.g. as diffusers' save_lora_weights writes them): {shown}"
        )
    flat = {}
    for name, pair in parts.items():
        if "a" not in pair or "b" not in pair:
            raise ConversionError(f"LoRA module {name} has {' and '.join(sorted(pair))} but not both lora_A and lora_B")
        a, b = pair["a"], pair["b"]
        if not (a.ndim == 2 or (a.ndim == 4 and a.shape[2:] == (1, 1))) or b.ndim != a.ndim or a.shape[0] != b.shape[1]:
            raise ConversionError(
                f"LoRA module {name}: lora_A {a.shape} and lora_B {b.shape} are not [r, in] and [out, r] (1x1: "
                "[r, in, 1, 1] and [out, r, 1, 1]) of one rank r"
            )
        a, b = a.reshape(a.shape[:2]), b.reshape(b.shape[:2])
        rank = a.shape[0]
        module_scale = scale * (float(pair["alpha"]) / rank if "alpha" in pair else 1.0)
        path = by_name[name]
        flat[(*path, lora.A_NAME)] = a.T.copy()
        flat[(*path, lora.B_NAME)] = (b.T * np.float32(module_scale)).copy()
    from flax import traverse_util

    return traverse_util.unflatten_dict(flat)
