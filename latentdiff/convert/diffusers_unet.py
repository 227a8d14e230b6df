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
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from latentdiff.convert.key_tables import (
    INVERSES,
    ConversionError,
    Rule,
    apply_table,
    attention_levels,
    conv_kernel,
    dense_kernel,
    field_problem,
    field_table,
    holds,
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


# ------------------------------------------------------------------------------- UNet2DConditionModel config <-> ours


def _uniform(value: Any, field: str) -> Any:
    """An int, or a list/tuple whose entries are all equal -> that value; else ConversionError."""
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ConversionError(f"unet config {field}={list(value)} varies per block; latentdiff uses one value")
        return value[0]
    return value


# Fields of UNet2DConditionModel's config that must hold the value our UNet implements; absent = diffusers default.
_UNET_FIXED = {
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "downsample_padding": 1,
    "center_input_sample": False,
    "dual_cross_attention": False,
    "only_cross_attention": False,
    "resnet_time_scale_shift": "default",
    "time_embedding_type": "positional",
    "class_embed_type": None,
    "addition_embed_type": None,
    "encoder_hid_dim": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "mid_block_scale_factor": 1,
    "time_embedding_dim": None,
    "timestep_post_act": None,
    "class_embeddings_concat": False,
    "attention_type": "default",
    "reverse_transformer_layers_per_block": None,
    "time_embedding_act_fn": None,
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "cross_attention_norm": None,
    "mid_block_only_cross_attention": (None, False),  # None: follows only_cross_attention (False above)
}


# Fields read into our unet config by unet_config_from_diffusers.
_UNET_MAPPED = (
    "in_channels",
    "out_channels",
    "block_out_channels",
    "down_block_types",
    "up_block_types",
    "layers_per_block",
    "num_attention_heads",
    "attention_head_dim",
    "transformer_layers_per_block",
    "cross_attention_dim",
    "num_class_embeds",
    "use_linear_projection",
    "dropout",
)


# Fields that do not change the forward pass of a UNet whose _UNET_FIXED fields hold, with the reason.
_UNET_INERT = {
    "sample_size": "metadata: the UNet is fully convolutional",
    "upcast_attention": "precision only: our attention computes its softmax in float32 always",
    "encoder_hid_dim_type": "used only with encoder_hid_dim (must be None)",
    "addition_time_embed_dim": "used only with addition_embed_type (must be None)",
    "addition_embed_type_num_heads": "used only with addition_embed_type (must be None)",
    "projection_class_embeddings_input_dim": "used only with class_embed_type 'projection' (must be None)",
}


# The fixed fields an exported config.json spells out (the others are diffusers' defaults).
_UNET_EXPORTED_FIXED = (
    "mid_block_type", "act_fn", "norm_num_groups", "norm_eps", "flip_sin_to_cos", "freq_shift", "downsample_padding",
)  # fmt: skip


def unet_field_table() -> dict[str, str]:
    """Every UNet2DConditionModel config field latentdiff knows -> 'mapped' | 'fixed' | 'inert'. A field outside it
    is refused by unet_config_from_diffusers (a newer diffusers may add fields that change the forward pass)."""
    return field_table(_UNET_FIXED, _UNET_MAPPED, _UNET_INERT)


def unet_config_from_diffusers(d: Mapping) -> dict:
    """UNet2DConditionModel config.json -> our unet config. ConversionError lists every unsupported setting."""
    problems = []
    known = unet_field_table()
    unknown = sorted(k for k in d if not k.startswith("_") and k not in known)
    if unknown:
        problems.append(f"fields latentdiff does not reproduce: {', '.join(unknown)}")
    for field, want in _UNET_FIXED.items():
        if field in d:
            got = d[field]
            got = next(iter(set(got))) if isinstance(got, (list, tuple)) and len(set(got)) == 1 else got
            if not holds(got, want):
                problems.append(field_problem(field, d[field], want[0] if isinstance(want, tuple) else want))
    channels = [int(c) for c in d["block_out_channels"]]
    mc = channels[0]
    if any(c % mc for c in channels):
        problems.append(f"block_out_channels={channels} are not multiples of the first")
    down, up = list(d["down_block_types"]), list(d["up_block_types"])
    cross_levels, block_problems = attention_levels(
        down, up, ("CrossAttnDownBlock2D", "CrossAttnUpBlock2D"), ("DownBlock2D", "UpBlock2D")
    )
    problems += block_problems
    attn = [2**level for level in cross_levels]
    if problems:
        raise ConversionError("unsupported UNet2DConditionModel config: " + "; ".join(dict.fromkeys(problems)))
    heads = d.get("num_attention_heads") or d["attention_head_dim"]  # diffusers: attention_head_dim = heads (legacy)
    if isinstance(heads, (list, tuple)):
        head_dims = {c // h for c, h in zip(channels, heads)}
        if len(head_dims) != 1 or any(c % h for c, h in zip(channels, heads)):
            raise ConversionError(f"per-block heads {list(heads)} with channels {channels} have no common head size")
        num_heads, num_head_channels = -1, head_dims.pop()
    else:
        num_heads, num_head_channels = int(heads), -1
    return dict(
        in_channels=int(d["in_channels"]),
        out_channels=int(d["out_channels"]),
        model_channels=mc,
        channel_mult=tuple(c // mc for c in channels),
        num_res_blocks=int(_uniform(d["layers_per_block"], "layers_per_block")),
        attention_resolutions=tuple(attn),
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        transformer_depth=int(_uniform(d.get("transformer_layers_per_block", 1), "transformer_layers_per_block")),
        context_dim=int(_uniform(d["cross_attention_dim"], "cross_attention_dim")),
        num_classes=int(d.get("num_class_embeds") or 0),
        dropout=float(d.get("dropout", 0.0)),
        use_linear_proj=bool(d.get("use_linear_projection", False)),
        dtype="float32",
        remat=False,
        attention_impl="xla",
    )


def diffusers_unet_config(unet: Mapping, sample_size: int) -> dict:
    """Our unet config -> UNet2DConditionModel constructor kwargs (config.json)."""
    c = dict(unet)
    if int(c["context_dim"]) == 0:
        raise ConversionError("a UNet without cross-attention (context_dim 0) has no UNet2DConditionModel equivalent")
    channels = [int(c["model_channels"]) * int(m) for m in c["channel_mult"]]
    attn = [2**level in tuple(c["attention_resolutions"]) for level in range(len(channels))]
    if int(c["num_head_channels"]) == -1:
        heads: Any = int(c["num_heads"])
    else:
        heads = [ch // int(c["num_head_channels"]) for ch in channels]
    return {
        "_class_name": "UNet2DConditionModel",
        "sample_size": int(sample_size),
        "in_channels": int(c["in_channels"]),
        "out_channels": int(c["out_channels"]),
        "block_out_channels": channels,
        "layers_per_block": int(c["num_res_blocks"]),
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        "cross_attention_dim": int(c["context_dim"]),
        "attention_head_dim": heads,
        "transformer_layers_per_block": int(c["transformer_depth"]),
        "use_linear_projection": bool(c["use_linear_proj"]),
        "num_class_embeds": int(c["num_classes"]) or None,
        **{field: _UNET_FIXED[field] for field in _UNET_EXPORTED_FIXED},
    }
