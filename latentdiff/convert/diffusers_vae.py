"""Stage-1 autoencoder weights: diffusers AutoencoderKL / VQModel and CompVis (`first_stage_model.*`) -> our params.

Explicit key tables (latentdiff/convert/key_tables.py) built from the config: every source key maps to one param,
shapes are checked against `jax.eval_shape(module.init)`, and missing / unexpected keys raise ConversionError.

Naming correspondences (level i counts from the highest resolution; the decoder's diffusers `up_blocks.k` is our
level i = n_levels - 1 - k):

    ours                         CompVis                          diffusers
    encoder/down_{i}_block_{j}   encoder.down.{i}.block.{j}       encoder.down_blocks.{i}.resnets.{j}
      nin_shortcut                 nin_shortcut                     conv_shortcut
    encoder/down_{i}_attn_{j}    encoder.down.{i}.attn.{j}        encoder.down_blocks.{i}.attentions.{j}
      norm, q, k, v, proj_out      norm, q, k, v, proj_out (1x1)    group_norm, to_q, to_k, to_v, to_out.0 (Linear)
    encoder/down_{i}_downsample  encoder.down.{i}.downsample      encoder.down_blocks.{i}.downsamplers.0
    */mid_block_1, mid_attn_1,   *.mid.block_1, attn_1, block_2   *.mid_block.resnets.0, attentions.0, resnets.1
      mid_block_2
    */norm_out                   *.norm_out                       *.conv_norm_out
    decoder/up_{i}_upsample      decoder.up.{i}.upsample          decoder.up_blocks.{k}.upsamplers.0
    quantize/embedding           quantize.embedding.weight        quantize.embedding.weight

diffusers checkpoints saved before its attention refactor name the attention layers query/key/value/proj_attn; they
are recognised by the key `encoder.mid_block.attentions.0.query.weight` and mapped with their own table.
diffusers' `block_out_channels` = [ch * m for m in ch_mult], `layers_per_block` = num_res_blocks,
`latent_channels` = z_channels (= embed_dim for AutoencoderKL), `vq_embed_dim` = embed_dim,
`num_vq_embeddings` = n_embed.
"""

from __future__ import annotations

from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
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
    field_problems,
    field_table,
    identity,
    invert_table,
)
from latentdiff.errors import UserError
from latentdiff.nn.autoencoder import build_autoencoder

_ATTN = {
    "compvis": {"norm": "norm", "q": "q", "k": "k", "v": "v", "proj_out": "proj_out"},
    "diffusers": {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"},
    "diffusers_legacy": {"norm": "group_norm", "q": "query", "k": "key", "v": "value", "proj_out": "proj_attn"},
}
_LEGACY_PROBE = "encoder.mid_block.attentions.0.query.weight"


def _conv_rules(src: str, dst: str) -> list[Rule]:
    return [Rule(f"{src}.weight", f"{dst}/kernel", conv_kernel), Rule(f"{src}.bias", f"{dst}/bias")]


def _norm_rules(src: str, dst: str) -> list[Rule]:
    return [Rule(f"{src}.weight", f"{dst}/scale"), Rule(f"{src}.bias", f"{dst}/bias")]


def _dense_rules(src: str, dst: str) -> list[Rule]:
    return [Rule(f"{src}.weight", f"{dst}/kernel", dense_kernel), Rule(f"{src}.bias", f"{dst}/bias")]


def _resnet_rules(src: str, dst: str, c_in: int, c_out: int, style: str) -> list[Rule]:
    rules = _norm_rules(f"{src}.norm1", f"{dst}/norm1") + _conv_rules(f"{src}.conv1", f"{dst}/conv1")
    rules += _norm_rules(f"{src}.norm2", f"{dst}/norm2") + _conv_rules(f"{src}.conv2", f"{dst}/conv2")
    if c_in != c_out:
        shortcut = "nin_shortcut" if style == "compvis" else "conv_shortcut"
        rules += _conv_rules(f"{src}.{shortcut}", f"{dst}/nin_shortcut")
    return rules


def _attn_rules(src: str, dst: str, style: str) -> list[Rule]:
    names = _ATTN[style]
    rules = _norm_rules(f"{src}.{names['norm']}", f"{dst}/norm")
    for ours in ("q", "k", "v", "proj_out"):
        rules += _dense_rules(f"{src}.{names[ours]}", f"{dst}/{ours}")
    return rules


def _names(style: str) -> dict[str, object]:
    """Source-name builders for one key style."""
    if style == "compvis":
        return dict(
            enc_block=lambda i, j: f"encoder.down.{i}.block.{j}",
            enc_attn=lambda i, j: f"encoder.down.{i}.attn.{j}",
            enc_down=lambda i: f"encoder.down.{i}.downsample.conv",
            dec_block=lambda i, j, n: f"decoder.up.{i}.block.{j}",
            dec_attn=lambda i, j, n: f"decoder.up.{i}.attn.{j}",
            dec_up=lambda i, n: f"decoder.up.{i}.upsample.conv",
            mid=lambda part: {"block_1": "mid.block_1", "attn_1": "mid.attn_1", "block_2": "mid.block_2"}[part],
            norm_out="norm_out",
        )
    return dict(
        enc_block=lambda i, j: f"encoder.down_blocks.{i}.resnets.{j}",
        enc_attn=lambda i, j: f"encoder.down_blocks.{i}.attentions.{j}",
        enc_down=lambda i: f"encoder.down_blocks.{i}.downsamplers.0.conv",
        dec_block=lambda i, j, n: f"decoder.up_blocks.{n - 1 - i}.resnets.{j}",
        dec_attn=lambda i, j, n: f"decoder.up_blocks.{n - 1 - i}.attentions.{j}",
        dec_up=lambda i, n: f"decoder.up_blocks.{n - 1 - i}.upsamplers.0.conv",
        mid=lambda part: {
            "block_1": "mid_block.resnets.0",
            "attn_1": "mid_block.attentions.0",
            "block_2": "mid_block.resnets.1",
        }[part],
        norm_out="conv_norm_out",
    )


def _mid_rules(side: str, channels: int, style: str, names: dict) -> list[Rule]:
    mid = names["mid"]
    rules = _resnet_rules(f"{side}.{mid('block_1')}", f"{side}/mid_block_1", channels, channels, style)
    rules += _attn_rules(f"{side}.{mid('attn_1')}", f"{side}/mid_attn_1", style)
    rules += _resnet_rules(f"{side}.{mid('block_2')}", f"{side}/mid_block_2", channels, channels, style)
    return rules


def build_table(cfg: ml_collections.ConfigDict, style: str) -> list[Rule]:
    """The key table for `cfg` (kind 'kl' or 'vq'); style 'compvis', 'diffusers' or 'diffusers_legacy'.

    Source keys are unprefixed (`encoder.conv_in.weight`, `quant_conv.bias` ...); destinations are param paths.
    """
    if style not in _ATTN:
        raise UserError(f"unknown key style {style!r}; expected one of {sorted(_ATTN)}")
    names = _names("compvis" if style == "compvis" else "diffusers")
    ch, mult, nrb = cfg.ch, tuple(cfg.ch_mult), cfg.num_res_blocks
    n = len(mult)
    attn_res = tuple(cfg.attn_resolutions)
    rules = _conv_rules("encoder.conv_in", "encoder/conv_in")
    res = cfg.resolution
    in_mult = (1, *mult)
    for i in range(n):
        c_in = ch * in_mult[i]
        for j in range(nrb):
            rules += _resnet_rules(names["enc_block"](i, j), f"encoder/down_{i}_block_{j}", c_in, ch * mult[i], style)
            c_in = ch * mult[i]
            if res in attn_res:
                rules += _attn_rules(names["enc_attn"](i, j), f"encoder/down_{i}_attn_{j}", style)
        if i != n - 1:
            rules += _conv_rules(names["enc_down"](i), f"encoder/down_{i}_downsample/conv")
            res //= 2
    rules += _mid_rules("encoder", ch * mult[-1], style, names)
    rules += _norm_rules(f"encoder.{names['norm_out']}", "encoder/norm_out")
    rules += _conv_rules("encoder.conv_out", "encoder/conv_out")

    rules += _conv_rules("decoder.conv_in", "decoder/conv_in")
    rules += _mid_rules("decoder", ch * mult[-1], style, names)
    c_in = ch * mult[-1]
    for i in reversed(range(n)):
        for j in range(nrb + 1):
            rules += _resnet_rules(names["dec_block"](i, j, n), f"decoder/up_{i}_block_{j}", c_in, ch * mult[i], style)
            c_in = ch * mult[i]
            if res in attn_res:
                rules += _attn_rules(names["dec_attn"](i, j, n), f"decoder/up_{i}_attn_{j}", style)
        if i != 0:
            rules += _conv_rules(names["dec_up"](i, n), f"decoder/up_{i}_upsample/conv")
            res *= 2
    rules += _norm_rules(f"decoder.{names['norm_out']}", "decoder/norm_out")
    rules += _conv_rules("decoder.conv_out", "decoder/conv_out")

    rules += _conv_rules("quant_conv", "quant_conv") + _conv_rules("post_quant_conv", "post_quant_conv")
    if cfg.kind == "vq":
        rules.append(Rule("quantize.embedding.weight", "quantize/embedding", identity))
    return rules


def _abstract_params(module: nn.Module, cfg: ml_collections.ConfigDict) -> Mapping:
    x = jnp.zeros((1, cfg.resolution, cfg.resolution, cfg.in_channels), jnp.float32)
    if cfg.kind == "kl":
        init = lambda: module.init(jax.random.PRNGKey(0), x, None, False, False)
    else:
        init = lambda: module.init(jax.random.PRNGKey(0), x, False)
    return jax.eval_shape(init)["params"]


def _convert(
    state_dict: Mapping[str, np.ndarray], cfg: ml_collections.ConfigDict, kind: str, style: str, what: str
) -> tuple[nn.Module, dict]:
    if cfg.kind != kind:
        raise UserError(f"{what} needs an autoencoder config with kind {kind!r}, got {cfg.kind!r}")
    if kind == "vq" and cfg.ema_codebook:
        raise UserError(
            "checkpoints carry a gradient-trained codebook in params; convert with ema_codebook=False "
            "(an EMA codebook lives in the 'vq_stats' collection)"
        )
    module = build_autoencoder(cfg)
    params = apply_table(build_table(cfg, style), state_dict, _abstract_params(module, cfg), what=what)
    return module, params


def _diffusers_style(state_dict: Mapping[str, np.ndarray]) -> str:
    return "diffusers_legacy" if _LEGACY_PROBE in state_dict else "diffusers"


def convert_vae(state_dict: Mapping[str, np.ndarray], cfg: ml_collections.ConfigDict) -> tuple[nn.Module, dict]:
    """diffusers AutoencoderKL state dict (numpy) -> (AutoencoderKL module, params). cfg.kind must be 'kl'."""
    return _convert(state_dict, cfg, "kl", _diffusers_style(state_dict), "diffusers AutoencoderKL state dict")


def convert_vq(state_dict: Mapping[str, np.ndarray], cfg: ml_collections.ConfigDict) -> tuple[nn.Module, dict]:
    """diffusers VQModel state dict (numpy) -> (VQAutoencoder module, params). cfg.kind must be 'vq'.

    The quantiser loss convention is not stored in checkpoints: build_autoencoder uses the VQ-VAE paper's
    (legacy_beta False); diffusers/CompVis default to legacy. Forward outputs do not depend on it."""
    return _convert(state_dict, cfg, "vq", _diffusers_style(state_dict), "diffusers VQModel state dict")


def convert_vae_compvis(
    state_dict: Mapping[str, np.ndarray], cfg: ml_collections.ConfigDict, prefix: str = "first_stage_model."
) -> tuple[nn.Module, dict]:
    """CompVis keys (`{prefix}encoder.down.0.block.0.norm1.weight` ...) -> (module, params); kl or vq by cfg.kind.

    Only keys starting with `prefix` are considered (a full LDM checkpoint also holds the UNet, text encoder ...);
    under the prefix, the training-loss modules (`{prefix}loss.*`: LPIPS, discriminator) are ignored, every other key
    must map. Use prefix "" for a standalone autoencoder checkpoint.
    """
    ours = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not ours:
        raise ConversionError(
            f"no key starts with prefix {prefix!r}; pass the right prefix (e.g. '' or 'first_stage_model.')"
        )
    ours = {k: v for k, v in ours.items() if not k.startswith("loss.")}
    return _convert(ours, cfg, cfg.kind, "compvis", f"CompVis autoencoder state dict (prefix {prefix!r})")


def export_vae(params: Mapping, cfg: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
    """Our params -> diffusers AutoencoderKL (kind 'kl') or VQModel (kind 'vq') state dict of numpy arrays."""
    flat = {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(dict(params)).items()}
    table = invert_table(build_table(cfg, "diffusers"), INVERSES)
    missing = sorted({r.src for r in table} - set(flat))
    extra = sorted(set(flat) - {r.src for r in table})
    if missing or extra:
        raise ConversionError(f"params do not match the config: missing {missing[:10]}, unexpected {extra[:10]}")
    return {r.dst: np.ascontiguousarray(r.transform(flat[r.src])).astype(np.float32) for r in table}


def diffusers_config(cfg: ml_collections.ConfigDict) -> dict:
    """Constructor kwargs of the diffusers AutoencoderKL (kind 'kl') or VQModel (kind 'vq') with our architecture."""
    n = len(cfg.ch_mult)
    sizes = [cfg.resolution // 2**i for i in range(n)]
    attn = set(cfg.attn_resolutions)
    out = dict(
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        block_out_channels=tuple(cfg.ch * m for m in cfg.ch_mult),
        layers_per_block=cfg.num_res_blocks,
        down_block_types=tuple("AttnDownEncoderBlock2D" if s in attn else "DownEncoderBlock2D" for s in sizes),
        up_block_types=tuple("AttnUpDecoderBlock2D" if s in attn else "UpDecoderBlock2D" for s in reversed(sizes)),
        act_fn="silu",
        latent_channels=cfg.z_channels,
        norm_num_groups=32,
        sample_size=cfg.resolution,
    )
    if cfg.kind == "vq":
        out.update(num_vq_embeddings=cfg.n_embed, vq_embed_dim=cfg.embed_dim)
    elif cfg.embed_dim != cfg.z_channels:
        raise UserError("diffusers AutoencoderKL has embed_dim == latent_channels == z_channels; set them equal")
    return out


# ----------------------------------------------------------------------------- AutoencoderKL / VQModel config -> ours


_VAE_FIXED = {
    "act_fn": "silu",
    "norm_num_groups": 32,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
    "norm_type": "group",
    "lookup_from_codebook": False,
    "shift_factor": None,
    "latents_mean": None,
    "latents_std": None,
}


# AutoencoderKL / VQModel fields read into our config (scaling_factor: by the stage-2 conversion, as scale_factor).
_VAE_MAPPED = (
    "in_channels",
    "out_channels",
    "down_block_types",
    "up_block_types",
    "block_out_channels",
    "layers_per_block",
    "latent_channels",
    "sample_size",
    "num_vq_embeddings",
    "vq_embed_dim",
    "scaling_factor",
)


_VAE_INERT = {
    "force_upcast": "precision only: diffusers' fp16 pipelines upcast the VAE; latentdiff runs it in its dtype"
}


def vae_field_table() -> dict[str, str]:
    """Every AutoencoderKL / VQModel config field latentdiff knows -> 'mapped' | 'fixed' | 'inert'; any other field is
    refused by vae_config_from_diffusers."""
    return field_table(_VAE_FIXED, _VAE_MAPPED, _VAE_INERT)


def vae_config_from_diffusers(d: Mapping, kind: str) -> dict:
    """AutoencoderKL ('kl') / VQModel ('vq') config.json -> our autoencoder config."""
    problems = field_problems(d, _VAE_FIXED, vae_field_table())
    channels = [int(c) for c in d["block_out_channels"]]
    ch = channels[0]
    if any(c % ch for c in channels):
        problems.append(f"block_out_channels={channels} are not multiples of the first")
    down, up = list(d["down_block_types"]), list(d["up_block_types"])
    res = int(d["sample_size"]) if not isinstance(d["sample_size"], (list, tuple)) else int(d["sample_size"][0])
    attn_levels, block_problems = attention_levels(
        down, up, ("AttnDownEncoderBlock2D", "AttnUpDecoderBlock2D"), ("DownEncoderBlock2D", "UpDecoderBlock2D")
    )
    problems += block_problems
    attn = [res // 2**level for level in attn_levels]
    if problems:
        raise ConversionError(f"unsupported diffusers autoencoder config: {'; '.join(dict.fromkeys(problems))}")
    z = int(d["latent_channels"])
    vq = kind == "vq"
    return dict(
        kind=kind,
        in_channels=int(d["in_channels"]),
        out_channels=int(d["out_channels"]),
        resolution=res,
        ch=ch,
        ch_mult=tuple(c // ch for c in channels),
        num_res_blocks=int(d["layers_per_block"]),
        attn_resolutions=tuple(attn),
        dropout=0.0,
        z_channels=z,
        double_z=not vq,
        embed_dim=int(d.get("vq_embed_dim") or z) if vq else z,
        n_embed=int(d["num_vq_embeddings"]) if vq else 0,
        beta=0.25,
        ema_codebook=False,
        ema_decay=0.99,
        dtype="float32",
    )
