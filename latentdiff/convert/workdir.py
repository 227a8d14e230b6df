"""Converted models as latentdiff workdirs, and diffusers pipeline directories <-> workdirs.

A *converted* stage-2 workdir is what `sample.py --workdir` and `Pipeline.from_workdir` load, without checkpoints/:

    config.json                  a full stage-2 config (the fields of configs/ldm_txt2img_kl8.py), stage 'ldm'
    tokenizer/                   Hugging Face tokenizer files (text models)
    first_stage/                 autoencoder.json + params.safetensors (latentdiff.first_stage export)
    params/ema.safetensors       {'unet': ..., 'cond': ...} the weights to sample with (EMA where the source has it);
                                 metadata: scale_factor, step, source
    params/params.safetensors    the non-EMA weights, only when the source holds both (CompVis `model_ema.*`)

Diffusers directories: `LDMTextToImagePipeline` (vqvae = AutoencoderKL | VQModel, bert = LDMBertModel, unet,
scheduler, tokenizer) and `StableDiffusionPipeline` v1 (vae, text_encoder = CLIPTextModel, unet, scheduler,
tokenizer; safety_checker / feature_extractor are not converted). Weights are read from safetensors, or from .bin
files with torch.load(weights_only=True). `export_diffusers` writes a workdir back as such a directory.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np

from latentdiff import config_blocks, config_utils, first_stage, params_io
from latentdiff import workdir as workdir_lib
from latentdiff.convert.common import HF_GENERIC_INERT, ConversionError, field_problems, field_table
from latentdiff.errors import UserError

PARAMS_DIR, EMA_FILE, LIVE_FILE, FORMAT = (  # the format is latentdiff.workdir's; conversion writes it
    workdir_lib.PARAMS_DIR,
    workdir_lib.EMA_FILE,
    workdir_lib.LIVE_FILE,
    workdir_lib.CONVERTED_FORMAT,
)
abstract_stage2 = workdir_lib.abstract_stage2
# diffusers' AutoencoderKL / VQModel class default, used when a vae config.json has no `scaling_factor` (older files).
DIFFUSERS_DEFAULT_SCALING = 0.18215
# LDMTextToImagePipeline tokenizes to this fixed length (padding "max_length", max_length=77).
LDM_TOKEN_LENGTH = 77

PIPELINES = {
    "LDMTextToImagePipeline": {"vae": "vqvae", "text": "bert"},
    "StableDiffusionPipeline": {"vae": "vae", "text": "text_encoder"},
}


# ---------------------------------------------------------------------------------------------------- stage-2 config


def stage2_config(
    *,
    unet: Mapping,
    text_encoder: Mapping,
    tokenizer: Mapping,
    diffusion: Mapping,
    scale_factor: float,
    resolution: int,
    sampling: Mapping,
) -> ml_collections.ConfigDict:
    """A complete stage-2 config (every field configs/ldm_txt2img_kl8.py has) for a converted model."""
    from latentdiff.data.pipeline import default_data_config

    config = config_blocks.run_block(batch_size=8, num_train_steps=0, seed=0)
    config.stage = "ldm"
    config.data = default_data_config()
    config.data.resolution = int(resolution)
    config.first_stage = ml_collections.ConfigDict(
        dict(workdir="", latents="", scale_factor=float(scale_factor), sample_posterior=True, dtype="")
    )
    config.conditioning = ml_collections.ConfigDict(dict(concat="none"))  # converted models: text-to-image
    config.unet = ml_collections.ConfigDict(dict(unet))
    config.text_encoder = ml_collections.ConfigDict(dict(text_encoder))
    config.tokenizer = ml_collections.ConfigDict(dict(tokenizer))
    config.diffusion = config_blocks.diffusion_block(**dict(diffusion), p_uncond=0.1)
    config.optim = config_blocks.adamw_block(
        lr=1e-5, weight_decay=0.01, warmup_steps=0, schedule="constant"
    )  # for fine-tuning a converted model
    config.ema = ml_collections.ConfigDict(dict(decay=0.9999, warmup=False))
    config.sampling = ml_collections.ConfigDict(dict(sampling))
    config.log_every = 50
    config.eval_every = 10**9
    config.image_every = 5_000
    config.checkpoint_every = 5_000
    return config


def schedule_fields(kind: str, timesteps: int, linear_start: float, linear_end: float, parameterization: str) -> dict:
    """The schedule fields of config.diffusion (stage2_config adds the training fields via config_blocks)."""
    return dict(
        schedule=kind,
        timesteps=int(timesteps),
        linear_start=float(linear_start),
        linear_end=float(linear_end),
        parameterization=parameterization,
    )


def sampling_block(prompts: tuple, guidance: float) -> dict:
    return dict(sampler="ddim", steps=50, eta=0.0, guidance=float(guidance), prompts=tuple(prompts))


TEXT_PROMPTS = config_blocks.PAPER_TEXT_PROMPTS  # sample-grid prompts of converted text-to-image models


def tokenizer_block(tokenizer: Any, name_or_path: str) -> dict:
    if tokenizer is None:
        return dict(name_or_path="", vocab_size=0, max_length=0)
    return dict(name_or_path=str(name_or_path), vocab_size=int(tokenizer.vocab_size), max_length=tokenizer.max_length)


# ---------------------------------------------------------------------------------------------- writing / reading


def write_workdir(
    workdir: str,
    *,
    config: ml_collections.ConfigDict,
    fs_config: ml_collections.ConfigDict,
    fs_variables: Mapping,
    ema_params: Mapping,
    params: Mapping | None,
    tokenizer: Any,
    source: str,
    step: int,
    overwrite: bool,
) -> None:
    """Writes a converted stage-2 workdir (layout in the module docstring). `ema_params`/`params` are {'unet', 'cond'}.

    Refuses a directory that already holds a workdir (config.json or checkpoints/) unless `overwrite`.
    """
    check_target(workdir, overwrite)
    check_stage2(config, ema_params)
    os.makedirs(workdir, exist_ok=True)
    metadata = {"format": FORMAT, "scale_factor": repr(float(config.first_stage.scale_factor)), "step": str(int(step))}
    metadata["source"] = source
    first_stage.save_export(fs_config, dict(fs_variables), os.path.join(workdir, "first_stage"), {"source": source})
    if tokenizer is not None:
        tok_dir = os.path.join(workdir, "tokenizer")
        if os.path.isdir(tok_dir):
            shutil.rmtree(tok_dir)
        tokenizer.save(tok_dir)
    params_dir = os.path.join(workdir, PARAMS_DIR)
    params_io.save_params(os.path.join(params_dir, EMA_FILE), ema_params, metadata)
    live = os.path.join(params_dir, LIVE_FILE)
    if params is not None:
        params_io.save_params(live, params, metadata)
    elif os.path.exists(live):
        os.remove(live)
    config_utils.save_config(config, workdir)


def check_target(workdir: str, overwrite: bool) -> None:
    """ValueError when `workdir` already holds a workdir (config.json; with --overwrite allowed unless it has
    training checkpoints, which a conversion must never mix with)."""
    if os.path.exists(os.path.join(workdir, "checkpoints")):
        raise UserError(f"{workdir!r} holds training checkpoints; convert into a new directory")
    if os.path.exists(os.path.join(workdir, "config.json")) and not overwrite:
        raise UserError(f"{workdir!r} already holds a workdir; pass --overwrite or choose a new directory")


def check_stage2(config: ml_collections.ConfigDict, params: Mapping) -> None:
    """Config-level consistency a converted model must have (the text encoder feeds the UNet's cross-attention)."""
    from latentdiff.nn.unet import validate_context

    validate_context(config.unet, config.text_encoder)
    if set(params) != {"unet", "cond"}:
        raise ConversionError(f"stage-2 params must be {{'unet', 'cond'}}, got {sorted(params)}")
    if config.text_encoder.kind in ("bert", "clip") and config.tokenizer.max_length > config.text_encoder.max_length:
        raise ConversionError(
            f"tokenizer.max_length {config.tokenizer.max_length} exceeds the text encoder's "
            f"{config.text_encoder.max_length} positions"
        )


# ------------------------------------------------------------------------------------------ diffusers config maps


def _problem(field: str, got: Any, want: Any) -> str:
    return f"{field}={got!r} (latentdiff implements {want!r})"


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


def unet_field_table() -> dict[str, str]:
    """Every UNet2DConditionModel config field latentdiff knows -> 'mapped' | 'fixed' | 'inert'. A field outside it
    is refused by unet_config_from_diffusers (a newer diffusers may add fields that change the forward pass)."""
    return field_table(_UNET_FIXED, _UNET_MAPPED, _UNET_INERT)


def _holds(got: object, want: object) -> bool:
    if isinstance(want, tuple):
        return any(_holds(got, w) for w in want)
    if isinstance(want, float) and isinstance(got, int | float) and not isinstance(got, bool):
        return got == want
    return got == want


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
            if not _holds(got, want):
                problems.append(_problem(field, d[field], want[0] if isinstance(want, tuple) else want))
    channels = [int(c) for c in d["block_out_channels"]]
    mc = channels[0]
    if any(c % mc for c in channels):
        problems.append(f"block_out_channels={channels} are not multiples of the first")
    down, up = list(d["down_block_types"]), list(d["up_block_types"])
    levels = len(channels)
    attn = []
    for level in range(levels):
        cross = down[level] == "CrossAttnDownBlock2D"
        if down[level] not in ("CrossAttnDownBlock2D", "DownBlock2D"):
            problems.append(f"down_block_types[{level}]={down[level]!r} (CrossAttnDownBlock2D or DownBlock2D)")
        want_up = "CrossAttnUpBlock2D" if cross else "UpBlock2D"
        if len(up) != levels or up[levels - 1 - level] != want_up:
            problems.append(f"up_block_types {up} must mirror down_block_types {down}")
        if cross:
            attn.append(2**level)
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
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "cross_attention_dim": int(c["context_dim"]),
        "attention_head_dim": heads,
        "transformer_layers_per_block": int(c["transformer_depth"]),
        "use_linear_projection": bool(c["use_linear_proj"]),
        "num_class_embeds": int(c["num_classes"]) or None,
        "act_fn": "silu",
        "norm_num_groups": 32,
        "norm_eps": 1e-5,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "downsample_padding": 1,
    }


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
    n = len(channels)
    res = int(d["sample_size"]) if not isinstance(d["sample_size"], (list, tuple)) else int(d["sample_size"][0])
    attn = []
    for level in range(n):
        with_attn = down[level] == "AttnDownEncoderBlock2D"
        if down[level] not in ("AttnDownEncoderBlock2D", "DownEncoderBlock2D"):
            problems.append(f"down_block_types[{level}]={down[level]!r}")
        want_up = "AttnUpDecoderBlock2D" if with_attn else "UpDecoderBlock2D"
        if len(up) != n or up[n - 1 - level] != want_up:
            problems.append(f"up_block_types {up} must mirror down_block_types {down}")
        if with_attn:
            attn.append(res // 2**level)
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


# LDMBertConfig fields read into our config, by bert_config_from_diffusers.
_BERT_MAPPED = (
    "vocab_size",
    "max_position_embeddings",
    "encoder_layers",
    "encoder_ffn_dim",
    "encoder_attention_heads",
    "head_dim",
    "d_model",
)
# Fields whose only implemented value is given (the CompVis BERTEmbedder that LDMBert reproduces).
_BERT_FIXED = {"activation_function": "gelu", "scale_embedding": False, "pruned_heads": {}}
# Fields that leave the encoder's output unchanged at inference, with the reason.
_BERT_INERT = {
    "dropout": "training only: the converted encoder runs without dropout",
    "attention_dropout": "training only",
    "activation_dropout": "training only",
    "encoder_layerdrop": "training only (skips whole layers at random while training)",
    "classifier_dropout": "no classifier head",
    "init_std": "initialisation only",
    "use_cache": "decoder key/value caching; the encoder has no cache",
    "num_hidden_layers": "a copy of encoder_layers that LDMBertConfig writes; the model builds encoder_layers layers",
    "pad_token_id": "the padding row of the embedding table: initialisation and gradients only, loaded as is",
} | HF_GENERIC_INERT


def bert_field_table() -> dict[str, str]:
    """Every LDMBertConfig field latentdiff knows -> 'mapped' | 'fixed' | 'inert'; any other field is refused."""
    return field_table(_BERT_FIXED, _BERT_MAPPED, _BERT_INERT)


def bert_config_from_diffusers(d: Mapping) -> dict:
    """LDMBertConfig config.json -> our text_encoder config (kind 'bert')."""
    problems = field_problems(d, _BERT_FIXED, bert_field_table())
    width, ffn = int(d["d_model"]), int(d["encoder_ffn_dim"])
    if ffn % width:
        problems.append(f"encoder_ffn_dim {ffn} is not a multiple of d_model {width}")
    if problems:
        raise ConversionError("unsupported LDMBert config: " + "; ".join(problems))
    return dict(
        kind="bert",
        vocab_size=int(d["vocab_size"]),
        max_length=int(d["max_position_embeddings"]),
        width=width,
        depth=int(d["encoder_layers"]),
        num_heads=int(d["encoder_attention_heads"]),
        head_dim=int(d["head_dim"]),
        mlp_ratio=ffn // width,
        num_classes=0,
        dtype="float32",
        remat=False,
        attention_impl="xla",
    )


def diffusers_bert_config(text: Mapping) -> dict:
    """Our text_encoder config (kind 'bert') -> LDMBertConfig config.json."""
    return {
        "architectures": ["LDMBertModel"],
        "model_type": "ldmbert",
        "vocab_size": int(text["vocab_size"]),
        "max_position_embeddings": int(text["max_length"]),
        "encoder_layers": int(text["depth"]),
        "encoder_ffn_dim": int(text["width"]) * int(text["mlp_ratio"]),
        "encoder_attention_heads": int(text["num_heads"]),
        "head_dim": int(text["head_dim"]),
        "d_model": int(text["width"]),
        "activation_function": "gelu",
        "scale_embedding": False,
        "pad_token_id": 0,
        "torch_dtype": "float32",
    }


_BETA_SCHEDULES = {"scaled_linear": "linear", "linear": "linear_plain", "squaredcos_cap_v2": "cosine"}
_PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}


def diffusion_from_scheduler(d: Mapping) -> dict:
    """A diffusers scheduler config (DDIM / PNDM / LMS ...) -> config.diffusion's schedule fields.

    Only the training schedule is read; sampling options (timestep_spacing, steps_offset ...) are the sampler's."""
    if d.get("trained_betas") is not None:
        raise ConversionError("scheduler has explicit trained_betas; latentdiff schedules are linear/scaled/cosine")
    if d.get("rescale_betas_zero_snr", False):
        raise ConversionError("scheduler rescale_betas_zero_snr=True is not implemented")
    schedule = d.get("beta_schedule", "linear")
    prediction = d.get("prediction_type", "epsilon")
    if schedule not in _BETA_SCHEDULES or prediction not in _PREDICTIONS:
        raise ConversionError(
            f"scheduler beta_schedule={schedule!r} / prediction_type={prediction!r}; supported: "
            f"{sorted(_BETA_SCHEDULES)} / {sorted(_PREDICTIONS)}"
        )
    return schedule_fields(
        _BETA_SCHEDULES[schedule],
        int(d.get("num_train_timesteps", 1000)),
        float(d.get("beta_start", 0.0001)),
        float(d.get("beta_end", 0.02)),
        _PREDICTIONS[prediction],
    )


def diffusers_scheduler_config(diffusion: Mapping) -> dict:
    """config.diffusion -> DDIMScheduler config.json configured as latentdiff's DDIM (DESIGN.md §4)."""
    schedule = {v: k for k, v in _BETA_SCHEDULES.items()}
    schedule["scaled_linear"] = "scaled_linear"
    prediction = {v: k for k, v in _PREDICTIONS.items()}
    return {
        "_class_name": "DDIMScheduler",
        "num_train_timesteps": int(diffusion["timesteps"]),
        "beta_start": float(diffusion["linear_start"]),
        "beta_end": float(diffusion["linear_end"]),
        "beta_schedule": schedule[diffusion["schedule"]],
        "prediction_type": prediction[diffusion["parameterization"]],
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "timestep_spacing": "leading",
    }


# ------------------------------------------------------------------------------------------- diffusers directories


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
    from latentdiff.convert.common import import_torch, to_numpy_state_dict

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


def component_state_dict(directory: str, variant: str = "") -> dict[str, np.ndarray]:
    """The weights of one diffusers/transformers component directory (single or sharded, safetensors or .bin)."""
    stems = ("diffusion_pytorch_model", "model", "pytorch_model")
    suffix = f".{variant}" if variant else ""
    for stem in stems:
        for ext in (".safetensors", ".bin"):
            single = os.path.join(directory, f"{stem}{suffix}{ext}")
            if os.path.isfile(single):
                return load_state_dict(single)
            index = f"{single}.index.json"
            if os.path.isfile(index):
                shards = sorted(set(read_json(index)["weight_map"].values()))
                out: dict[str, np.ndarray] = {}
                for shard in shards:
                    out.update(load_state_dict(os.path.join(directory, shard)))
                return out
    files = sorted(os.listdir(directory)) if os.path.isdir(directory) else []
    hint = " (pass --variant for files like model.fp16.safetensors)" if any(".fp16." in f for f in files) else ""
    raise FileNotFoundError(f"no weight file in {directory!r}{hint}; found {files}")


def read_pipeline(src: str) -> tuple[str, dict]:
    """(pipeline class name, model_index.json) of a diffusers pipeline directory we can convert."""
    if not os.path.isfile(os.path.join(src, "model_index.json")):
        raise FileNotFoundError(f"{src!r} is not a diffusers pipeline directory (no model_index.json)")
    index = read_json(os.path.join(src, "model_index.json"))
    name = index.get("_class_name")
    if name not in PIPELINES:
        raise ConversionError(f"{src!r} is a {name!r}; supported pipelines: {sorted(PIPELINES)}")
    return name, index


def convert_diffusers_pipeline(
    src: str, workdir: str, *, scale_factor: float = 0.0, variant: str = "", overwrite: bool = False
) -> ml_collections.ConfigDict:
    """A diffusers LDMTextToImagePipeline / StableDiffusionPipeline directory -> a converted workdir; returns config.

    scale_factor 0 = the vae config's `scaling_factor` (diffusers' default 0.18215 where the file has none)."""
    from latentdiff.convert import from_diffusers
    from latentdiff.convert.diffusers_clip import clip_config
    from latentdiff.data.tokenizer import load_tokenizer

    check_target(workdir, overwrite)
    name, _ = read_pipeline(src)
    parts = PIPELINES[name]
    vae_dir, text_dir = os.path.join(src, parts["vae"]), os.path.join(src, parts["text"])
    vae_json = read_json(os.path.join(vae_dir, "config.json"))
    vae_class = vae_json.get("_class_name")
    if vae_class not in ("AutoencoderKL", "VQModel"):
        raise ConversionError(f"{parts['vae']} is a {vae_class!r}; AutoencoderKL or VQModel expected")
    fs_cfg = ml_collections.ConfigDict(
        vae_config_from_diffusers(vae_json, "kl" if vae_class == "AutoencoderKL" else "vq")
    )
    unet_json = read_json(os.path.join(src, "unet", "config.json"))
    unet_cfg = unet_config_from_diffusers(unet_json)
    text_json = read_json(os.path.join(text_dir, "config.json"))
    text_cfg = bert_config_from_diffusers(text_json) if name == "LDMTextToImagePipeline" else clip_config(text_json)
    diffusion = diffusion_from_scheduler(read_json(os.path.join(src, "scheduler", "scheduler_config.json")))

    _, fs_vars = from_diffusers(parts["vae"], component_state_dict(vae_dir, variant), fs_cfg)
    _, unet_vars = from_diffusers("unet", component_state_dict(os.path.join(src, "unet"), variant), unet_cfg)
    _, text_vars = from_diffusers(parts["text"], component_state_dict(text_dir, variant), text_cfg)

    tok_dir = os.path.join(src, "tokenizer")
    if name == "LDMTextToImagePipeline":
        length = LDM_TOKEN_LENGTH
    else:
        length = int(read_json(os.path.join(tok_dir, "tokenizer_config.json"))["model_max_length"])
    if length != text_cfg["max_length"]:
        raise ConversionError(
            f"the pipeline tokenizes to {length} tokens but the text encoder has {text_cfg['max_length']} positions"
        )
    tokenizer = load_tokenizer(os.path.abspath(tok_dir), length)
    if tokenizer.vocab_size > text_cfg["vocab_size"]:
        raise ConversionError(f"tokenizer has {tokenizer.vocab_size} ids, the text encoder {text_cfg['vocab_size']}")

    if scale_factor <= 0:
        scale_factor = float(vae_json.get("scaling_factor", DIFFUSERS_DEFAULT_SCALING))
    f = 2 ** (len(fs_cfg.ch_mult) - 1)
    sample = unet_json["sample_size"]
    sample = int(sample[0] if isinstance(sample, (list, tuple)) else sample)
    config = stage2_config(
        unet=unet_cfg,
        text_encoder=text_cfg,
        tokenizer=tokenizer_block(tokenizer, os.path.abspath(tok_dir)),
        diffusion=diffusion,
        scale_factor=scale_factor,
        resolution=sample * f,
        sampling=sampling_block(TEXT_PROMPTS, 7.5 if name == "StableDiffusionPipeline" else 5.0),
    )
    params = {"unet": unet_vars["params"], "cond": text_vars["params"]}
    write_workdir(
        workdir,
        config=config,
        fs_config=fs_cfg,
        fs_variables=fs_vars,
        ema_params=params,
        params=None,
        tokenizer=tokenizer,
        source=f"diffusers:{os.path.abspath(src)}",
        step=0,
        overwrite=overwrite,
    )
    return config


def _save_component(directory: str, config: Mapping, state_dict: Mapping[str, np.ndarray], weights: str) -> None:
    arrays = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in state_dict.items()}
    params_io.write_safetensors(os.path.join(directory, weights), arrays, {"format": "pt"})
    config_utils.atomic_write_text(os.path.join(directory, "config.json"), json.dumps(dict(config), indent=2))


def export_diffusers(workdir: str, out: str, *, use_ema: bool = True, overwrite: bool = False) -> str:
    """A text-to-image workdir (converted or trained) -> a diffusers pipeline directory; returns the pipeline class.

    kind 'bert' -> LDMTextToImagePipeline (vqvae, bert, ...), kind 'clip' -> StableDiffusionPipeline (no safety
    checker). Weights are float32 safetensors; the scheduler is DDIMScheduler configured as latentdiff's DDIM. The
    LDMBert output projection `to_logits` (unused for conditioning) is not written; diffusers reports it missing.
    """
    from latentdiff.convert import to_diffusers
    from latentdiff.convert.diffusers_clip import hf_clip_config
    from latentdiff.convert.diffusers_vae import diffusers_config
    from latentdiff.pipeline import Pipeline

    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise UserError(f"{out!r} is not empty; pass --overwrite or choose a new directory")
    pipe = Pipeline.from_workdir(workdir, use_ema=use_ema)
    config = pipe.config
    kind = config.text_encoder.kind
    if kind not in ("bert", "clip"):
        raise ConversionError(f"export needs a text model (text_encoder.kind 'bert' or 'clip'), got {kind!r}")
    if kind == "bert" and config.text_encoder.max_length < LDM_TOKEN_LENGTH:
        # Refused rather than written: the pipeline would load and then fail at its first prompt (IndexError), and
        # widening the position table would change what the model computes (prompts padded to 77, no mask).
        raise ConversionError(
            f"diffusers' LDMTextToImagePipeline pads every prompt to {LDM_TOKEN_LENGTH} tokens, but this text encoder "
            f"has {config.text_encoder.max_length} positions, so diffusers could not run the export; export a model "
            f"trained with --config.text_encoder.max_length={LDM_TOKEN_LENGTH} "
            f"--config.tokenizer.max_length={LDM_TOKEN_LENGTH}, and use latentdiff's sample.py for this one"
        )
    name = "LDMTextToImagePipeline" if kind == "bert" else "StableDiffusionPipeline"
    parts = PIPELINES[name]
    params = jax.device_get(pipe.params)
    fs_cfg = pipe.fs.config
    os.makedirs(out, exist_ok=True)
    latent = pipe.latent_shape[0]
    _save_component(
        os.path.join(out, "unet"),
        diffusers_unet_config(config.unet, latent),
        to_diffusers("unet", params["unet"], config.unet),
        "diffusion_pytorch_model.safetensors",
    )
    vae_json = {
        "_class_name": "AutoencoderKL" if fs_cfg.kind == "kl" else "VQModel",
        **diffusers_config(fs_cfg),
        "scaling_factor": float(pipe.scale_factor),
    }
    vae_json = {k: list(v) if isinstance(v, tuple) else v for k, v in vae_json.items()}
    fs_params = jax.device_get(pipe.fs.variables)["params"]
    _save_component(
        os.path.join(out, parts["vae"]),
        vae_json,
        to_diffusers(parts["vae"], fs_params, fs_cfg),
        "diffusion_pytorch_model.safetensors",
    )
    hf = pipe.tokenizer.hf
    if kind == "bert":
        text_json = diffusers_bert_config(config.text_encoder)
    else:
        text_json = hf_clip_config(
            config.text_encoder,
            bos_token_id=hf.bos_token_id,
            eos_token_id=hf.eos_token_id,
            pad_token_id=hf.pad_token_id,
        )
    _save_component(
        os.path.join(out, parts["text"]),
        text_json,
        to_diffusers(parts["text"], params["cond"], config.text_encoder),
        "model.safetensors",
    )
    pipe.tokenizer.save(os.path.join(out, "tokenizer"))
    os.makedirs(os.path.join(out, "scheduler"), exist_ok=True)
    config_utils.atomic_write_text(
        os.path.join(out, "scheduler", "scheduler_config.json"),
        json.dumps(diffusers_scheduler_config(config.diffusion), indent=2),
    )
    tok_class = type(hf).__name__
    index: dict[str, Any] = {
        "_class_name": name,
        "unet": ["diffusers", "UNet2DConditionModel"],
        parts["vae"]: ["diffusers", vae_json["_class_name"]],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "tokenizer": ["transformers", tok_class],
    }
    if kind == "bert":
        index["bert"] = ["latent_diffusion", "LDMBertModel"]
    else:
        index.update(
            text_encoder=["transformers", "CLIPTextModel"],
            safety_checker=[None, None],
            feature_extractor=[None, None],
            requires_safety_checker=False,
        )
    config_utils.atomic_write_text(os.path.join(out, "model_index.json"), json.dumps(index, indent=2))
    return name
