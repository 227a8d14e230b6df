"""Converted models as latentdiff workdirs: the config and files every converter (diffusers pipelines, CompVis
checkpoints) writes.

A *converted* stage-2 workdir is what `sample.py --workdir` and `Pipeline.from_workdir` load, without checkpoints/:

    config.json                  a full stage-2 config (the fields of configs/ldm_txt2img_kl8.py), stage 'ldm'
    tokenizer/                   Hugging Face tokenizer files (text models)
    first_stage/                 autoencoder.json + params.safetensors (latentdiff.first_stage export)
    params/ema.safetensors       {'unet': ..., 'cond': ...} the weights to sample with (EMA where the source has it);
                                 metadata: scale_factor, step, source
    params/params.safetensors    the non-EMA weights, only when the source holds both (CompVis `model_ema.*`)

The format is latentdiff.workdir's (its reader); diffusers pipeline directories <-> workdirs are
latentdiff/convert/diffusers_pipeline.py.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from typing import Any

import ml_collections

from latentdiff import config_blocks, config_utils, params_io
from latentdiff import workdir as workdir_lib
from latentdiff.convert.key_tables import ConversionError
from latentdiff.errors import UserError
from latentdiff.first_stage import save_first_stage_export

PARAMS_DIR, EMA_FILE, LIVE_FILE, FORMAT = (  # the format is latentdiff.workdir's; conversion writes it
    workdir_lib.PARAMS_DIR,
    workdir_lib.EMA_FILE,
    workdir_lib.LIVE_FILE,
    workdir_lib.CONVERTED_FORMAT,
)


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
    from latentdiff.data.input_pipeline import default_data_config

    config = config_blocks.run_block(batch_size=8, num_train_steps=0, seed=0)
    config.stage = "ldm"
    config.init_from = ""  # a stage-2 workdir to fine-tune (latentdiff/train/finetune.py)
    config.freeze = ()  # parts kept fixed when fine-tuning: "cond" (text encoder) and/or "unet"
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
    config.evaluation = (
        config_blocks.no_evaluation_block()
    )  # fine-tuning runs set their own (latentdiff/train/ldm_eval.py)
    config.image_every = 5_000
    config.checkpoint_every = 5_000
    return config


def sampling_block(prompts: tuple, guidance: float) -> dict:
    return dict(sampler="ddim", steps=50, eta=0.0, guidance=float(guidance), prompts=tuple(prompts))


TEXT_PROMPTS = config_blocks.PAPER_TEXT_PROMPTS  # sample-grid prompts of converted text-to-image models


def tokenizer_block(tokenizer: Any, name_or_path: str) -> dict:
    if tokenizer is None:
        return dict(name_or_path="", vocab_size=0, max_length=0)
    return dict(name_or_path=str(name_or_path), vocab_size=int(tokenizer.vocab_size), max_length=tokenizer.max_length)


def write_workdir(
    workdir: str,
    *,
    config: ml_collections.ConfigDict,
    first_stage_config: ml_collections.ConfigDict,
    first_stage_variables: Mapping,
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
    save_first_stage_export(
        first_stage_config, dict(first_stage_variables), os.path.join(workdir, "first_stage"), {"source": source}
    )
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
