"""UNet weights: diffusers UNet2DConditionModel and CompVis openaimodel checkpoints <-> our `latentdiff.nn.unet.UNet`.

The table is written out by walking our own param tree (from `jax.eval_shape(init)`) and naming, for each of our
params, the one source key it comes from; `apply_table` then rejects every missing, unexpected or mis-shaped key.

Block correspondence (L = len(channel_mult), n = num_res_blocks, l = level, j = block in level):
  ours                 diffusers                               CompVis (model.diffusion_model.)
  time_embed_0/1       time_embedding.linear_1/2               time_embed.0/2
  label_emb            class_embedding                         label_emb
  conv_in              conv_in                                 input_blocks.0.0
  down_{l}_res_{j}     down_blocks.{l}.resnets.{j}             input_blocks.{1 + l(n+1) + j}.0
  down_{l}_attn_{j}    down_blocks.{l}.attentions.{j}          input_blocks.{1 + l(n+1) + j}.1
  down_{l}_down        down_blocks.{l}.downsamplers.0.conv     input_blocks.{(l+1)(n+1)}.0.op
  mid_res_0/mid_attn/mid_res_1   mid_block.resnets.0/attentions.0/resnets.1   middle_block.0/1/2
  up_{l}_res_{j}       up_blocks.{L-1-l}.resnets.{j}           output_blocks.{(L-1-l)(n+1) + j}.0
  up_{l}_attn_{j}      up_blocks.{L-1-l}.attentions.{j}        output_blocks.{(L-1-l)(n+1) + j}.1
  up_{l}_up            up_blocks.{L-1-l}.upsamplers.0.conv     output_blocks.{(L-1-l)(n+1) + n}.{2 if attn else 1}.conv
  out_norm, conv_out   conv_norm_out, conv_out                 out.0, out.2
ResBlock: norm1/conv1/time_proj/norm2/conv2/skip = diffusers norm1/conv1/time_emb_proj/norm2/conv2/conv_shortcut
= CompVis in_layers.0/in_layers.2/emb_layers.1/out_layers.0/out_layers.3/skip_connection.
Transformer: identical names in both (norm, proj_in, transformer_blocks.{d}.{norm1..3, attn1/attn2.to_q/to_k/to_v,
to_out.0, ff.net.0.proj, ff.net.2}, proj_out). proj_in/proj_out are 1x1 convs [O, I, 1, 1] unless use_linear_proj
(Linear [O, I]).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping

import jax
import numpy as np
from flax import traverse_util

from latentdiff.convert.common import (
    INVERSES,
    ConversionError,
    Rule,
    apply_table,
    conv_kernel,
    dense_kernel,
    identity,
    inverse_dense_kernel,
    invert_table,
)
from latentdiff.errors import UserError
from latentdiff.nn.unet import UNET_FIELDS, UNet, build_unet, check_fields, init_inputs

LAYOUTS = ("diffusers", "compvis")

_RES = {
    "diffusers": {
        "norm1": "norm1",
        "conv1": "conv1",
        "time_proj": "time_emb_proj",
        "norm2": "norm2",
        "conv2": "conv2",
        "skip": "conv_shortcut",
    },
    "compvis": {
        "norm1": "in_layers.0",
        "conv1": "in_layers.2",
        "time_proj": "emb_layers.1",
        "norm2": "out_layers.0",
        "conv2": "out_layers.3",
        "skip": "skip_connection",
    },
}
_TOP = {
    "diffusers": {
        "time_embed_0": "time_embedding.linear_1",
        "time_embed_1": "time_embedding.linear_2",
        "label_emb": "class_embedding",
        "conv_in": "conv_in",
        "out_norm": "conv_norm_out",
        "conv_out": "conv_out",
        "mid_res_0": "mid_block.resnets.0",
        "mid_attn": "mid_block.attentions.0",
        "mid_res_1": "mid_block.resnets.1",
    },
    "compvis": {
        "time_embed_0": "time_embed.0",
        "time_embed_1": "time_embed.2",
        "label_emb": "label_emb",
        "conv_in": "input_blocks.0.0",
        "out_norm": "out.0",
        "conv_out": "out.2",
        "mid_res_0": "middle_block.0",
        "mid_attn": "middle_block.1",
        "mid_res_1": "middle_block.2",
    },
}
_TRANSFORMER_SUB = {"to_out": "to_out.0", "proj": "net.0.proj", "out": "net.2"}
_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias", "embedding": "weight"}


def conv1x1_kernel(w: np.ndarray) -> np.ndarray:
    """A 1x1 conv weight [O, I, 1, 1] -> Dense kernel [I, O]; anything else is a layout error."""
    if w.ndim != 4 or w.shape[2:] != (1, 1):
        raise ConversionError(
            f"expected a 1x1 conv weight [O, I, 1, 1] for proj_in/proj_out, got shape {w.shape}; "
            "a Linear [O, I] weight means the checkpoint uses linear projections: set use_linear_proj=True"
        )
    return np.transpose(w[:, :, 0, 0], (1, 0))


def linear_kernel(w: np.ndarray) -> np.ndarray:
    """A Linear weight [O, I] -> Dense kernel [I, O]; anything else is a layout error."""
    if w.ndim != 2:
        raise ConversionError(
            f"expected a Linear weight [O, I] for proj_in/proj_out, got shape {w.shape}; "
            "a 1x1 conv weight means the checkpoint uses conv projections: set use_linear_proj=False"
        )
    return np.transpose(w, (1, 0))


def inverse_conv1x1_kernel(k: np.ndarray) -> np.ndarray:
    """Dense kernel [I, O] -> 1x1 conv weight [O, I, 1, 1]."""
    return np.transpose(k, (1, 0))[:, :, None, None]


_INVERSES: dict[Callable, Callable] = {
    **INVERSES,
    conv1x1_kernel: inverse_conv1x1_kernel,
    linear_kernel: inverse_dense_kernel,
}


def _block_prefix(name: str, layout: str, cfg: dict) -> str:
    """Our top-level module name -> the source module prefix in `layout`."""
    if name in _TOP[layout]:
        return _TOP[layout][name]
    levels, n = len(cfg["channel_mult"]), int(cfg["num_res_blocks"])
    parts = name.split("_")  # down_{l}_res_{j} | down_{l}_attn_{j} | down_{l}_down | up_{l}_res_{j} | ...
    side, level, kind = parts[0], int(parts[1]), parts[2]
    j = int(parts[3]) if len(parts) > 3 else None
    if layout == "diffusers":
        if side == "down":
            block = f"down_blocks.{level}"
            return {
                "res": f"{block}.resnets.{j}",
                "attn": f"{block}.attentions.{j}",
                "down": f"{block}.downsamplers.0.conv",
            }[kind]
        block = f"up_blocks.{levels - 1 - level}"
        return {"res": f"{block}.resnets.{j}", "attn": f"{block}.attentions.{j}", "up": f"{block}.upsamplers.0.conv"}[
            kind
        ]
    if side == "down":
        if kind == "down":
            return f"input_blocks.{(level + 1) * (n + 1)}.0.op"
        return f"input_blocks.{1 + level * (n + 1) + j}.{0 if kind == 'res' else 1}"
    base = (levels - 1 - level) * (n + 1)
    if kind == "up":
        has_attn = 2**level in tuple(cfg["attention_resolutions"])
        return f"output_blocks.{base + n}.{2 if has_attn else 1}.conv"
    return f"output_blocks.{base + j}.{0 if kind == 'res' else 1}"


def _rule(path: tuple[str, ...], shape: tuple[int, ...], layout: str, cfg: dict) -> Rule:
    """One of our params (path, shape) -> the Rule naming its source key and layout transform."""
    block, *inner, leaf = path
    prefix = _block_prefix(block, layout, cfg)
    if "_res_" in block:
        (sub,) = inner
        inner_key = [_RES[layout][sub]]
    else:
        inner_key = [
            f"transformer_blocks.{p.split('_')[1]}" if p.startswith("block_") else _TRANSFORMER_SUB.get(p, p)
            for p in inner
        ]
    src = ".".join([prefix, *inner_key, _LEAF[leaf]])
    if leaf != "kernel":
        transform = identity
    elif len(shape) == 4:
        transform = conv_kernel
    elif inner and inner[-1] in ("proj_in", "proj_out") and len(inner) == 1:
        transform = linear_kernel if cfg["use_linear_proj"] else conv1x1_kernel
    else:
        transform = dense_kernel
    return Rule(src, "/".join(path), transform)


def freeze_config(c: dict) -> tuple:
    """A hashable form of a config dict (lists become tuples)."""
    return tuple(sorted((k, tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in c.items()))


@functools.lru_cache(maxsize=16)
def _abstract_params(frozen: tuple) -> dict:
    c = dict(frozen)
    # The param tree does not depend on the attention kernel; 'xla' also traces where cuDNN is absent (CPU).
    tracer = build_unet({**c, "attention_impl": "xla"})
    inputs = init_inputs(c, batch=1, size=2 ** (len(c["channel_mult"]) - 1), context_len=1)
    return jax.eval_shape(lambda: tracer.init(jax.random.key(0), **inputs))["params"]


def abstract_unet(cfg: Mapping) -> tuple[UNet, dict]:
    """(module, abstract params) via jax.eval_shape (cached per config): nothing is allocated."""
    c = check_fields(cfg, UNET_FIELDS, "unet")
    return build_unet(c), _abstract_params(freeze_config(c))


def unet_table(cfg: Mapping, layout: str) -> list[Rule]:
    """The explicit key table for `layout` ('diffusers' | 'compvis'): one Rule per param of our UNet."""
    if layout not in LAYOUTS:
        raise UserError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    c = check_fields(cfg, UNET_FIELDS, "unet")
    _, abstract = abstract_unet(c)
    flat = traverse_util.flatten_dict(abstract)
    return [_rule(path, tuple(x.shape), layout, c) for path, x in flat.items()]


def _convert(state_dict: Mapping[str, np.ndarray], cfg: Mapping, layout: str, what: str) -> tuple[UNet, dict]:
    module, abstract = abstract_unet(cfg)
    params = apply_table(unet_table(cfg, layout), state_dict, abstract, what=what)
    return module, {"params": params}


def convert_unet(state_dict: Mapping[str, np.ndarray], cfg: Mapping) -> tuple[UNet, dict]:
    """diffusers UNet2DConditionModel state dict (numpy) -> (UNet, {'params': ...}). Raises ConversionError."""
    return _convert(state_dict, cfg, "diffusers", "diffusers UNet2DConditionModel state dict")


def convert_unet_compvis(
    state_dict: Mapping[str, np.ndarray], cfg: Mapping, prefix: str = "model.diffusion_model."
) -> tuple[UNet, dict]:
    """CompVis LDM checkpoint (numpy; keys outside `prefix` are other models' and skipped) -> (UNet, variables).

    Only the live weights under `prefix` are read (the EMA copy `model_ema.*` is not).
    """
    sub = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not sub:
        raise ConversionError(f"no key of the checkpoint starts with prefix {prefix!r}; pass the UNet's key prefix")
    return _convert(sub, cfg, "compvis", f"CompVis UNet state dict (prefix {prefix!r})")


def export_table(table: list[Rule], params: Mapping) -> dict[str, np.ndarray]:
    """Applies an inverted table (src = our param path) to our params -> {torch key: numpy array}."""
    flat = {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(dict(params)).items()}
    missing = sorted(set(flat) - {r.src for r in table})
    if missing:
        raise ConversionError(f"params not covered by the export table: {missing[:20]}")
    return {r.dst: r.transform(flat[r.src]) for r in table}


def export_unet(params: Mapping, cfg: Mapping) -> dict[str, np.ndarray]:
    """Our UNet params ({'params': ...} or the inner dict) -> diffusers UNet2DConditionModel state dict (numpy)."""
    params = params.get("params", params)
    return export_table(invert_table(unet_table(cfg, "diffusers"), _INVERSES), params)


def export_unet_compvis(params: Mapping, cfg: Mapping, prefix: str = "model.diffusion_model.") -> dict[str, np.ndarray]:
    """Our UNet params -> CompVis openaimodel keys (with `prefix`), numpy."""
    params = params.get("params", params)
    out = export_table(invert_table(unet_table(cfg, "compvis"), _INVERSES), params)
    return {prefix + k: v for k, v in out.items()}
