"""Stage-2 training that starts from another stage-2 workdir (config.init_from): full fine-tuning of our own models
or of models converted from diffusers / CompVis / SD v1 (`latentdiff convert`).

On the first run the base's weights (params and EMA of its latest checkpoint, or a converted workdir's params/) start
the run, with a fresh optimizer; its frozen first stage, tokenizer and latent scale factor are copied into the new
workdir, so the fine-tuned model samples exactly as the base did. The config must describe the base's model (UNet,
text encoder, noise schedule, parameterization, concat conditioning): a mismatch is one line naming the fields.
A resumed run reads nothing of the base any more (the workdir holds all of it). config.freeze lists parts kept
fixed ('cond': the text encoder, 'unet'): their gradients are zeroed before the optimizer (so they take no part in
clipping or the Adam moments) and their values restored after it (no weight decay reaches them); their EMA is their
value.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from latentdiff import config_utils, parallel
from latentdiff import workdir as workdir_lib
from latentdiff.errors import UserError

CHECKED_SECTIONS = ("unet", "text_encoder", "diffusion", "conditioning")
# diffusion fields that shape training only, not the model: they may differ from the base's
TRAINING_ONLY = ("p_uncond", "min_snr_gamma", "loss_buckets")
PARTS = ("unet", "cond")


def check_freeze(config: ml_collections.ConfigDict) -> None:
    """One line unless config.freeze names some, not all, of the model's parts."""
    unknown = [part for part in config.freeze if part not in PARTS]
    if unknown or len(set(config.freeze)) == len(PARTS):
        raise UserError(f"freeze={tuple(config.freeze)!r}: list some of {PARTS} (not all: then nothing trains)")


def base_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config of config.init_from, checked to be a stage-2 model equal to the one `config` describes."""
    base = config.init_from
    if not os.path.isdir(base):
        raise UserError(f"init_from={base!r} is not a directory; pass a stage-2 workdir (trained or converted)")
    saved = config_utils.load_workdir_config(base)
    if saved.stage != "ldm":
        raise UserError(f"init_from={base!r} is a {saved.stage!r} workdir; fine-tuning starts from a stage-2 workdir")
    new = json.loads(config_utils.to_json(config))
    old = json.loads(config_utils.to_json(saved))
    changes = []
    for section in CHECKED_SECTIONS:
        for field, (was, now) in workdir_lib.config_changes(old.get(section, {}), new.get(section, {})).items():
            name = field.split(".")[-1]
            if None in (was, now):  # a field one side's version does not have (added later): not a different model
                continue
            if name not in workdir_lib.IMPLEMENTATION_FIELDS and not (section == "diffusion" and name in TRAINING_ONLY):
                changes.append(f"{section}.{field} = {was!r} there, {now!r} here")
    if changes:
        more = f" (and {len(changes) - 1} more)" if len(changes) > 1 else ""
        raise UserError(
            f"init_from={base!r} holds another model: {changes[0]}{more}; use a config of the base's model "
            "(e.g. its config.json's values)"
        )
    return saved


def check_paths(config: ml_collections.ConfigDict, workdir: str) -> None:
    """init_from must be another workdir than the run's own."""
    if os.path.abspath(config.init_from) == os.path.abspath(workdir):
        raise UserError(f"init_from={config.init_from!r} is the run's own --workdir; fine-tune into another workdir")


def adopt_base_files(config: ml_collections.ConfigDict, workdir: str) -> float:
    """The latent scale factor the run must use (the base's: the fine-tuned model sees latents scaled as the base
    did). First run: copies the base's first_stage/ and tokenizer/ into the new workdir (process 0; every process
    waits for it). A resumed run (the workdir has checkpoints) reads its own checkpoint: the base is not read."""
    if workdir_lib.has_checkpoints(workdir):
        return workdir_lib.stage2_scale_factor(workdir)
    base = config.init_from
    if jax.process_index() == 0:
        for name in ("first_stage", "tokenizer"):
            source, target = os.path.join(base, name), os.path.join(workdir, name)
            if os.path.isdir(source) and not os.path.isdir(target):
                staging = target + ".copying"
                shutil.rmtree(staging, ignore_errors=True)
                shutil.copytree(source, staging)
                os.replace(staging, target)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("latentdiff: fine-tuning base files copied")
    return workdir_lib.stage2_scale_factor(base)


def initial_weights(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """{'params', 'ema_params', 'scale_factor', 'step'} (host arrays) of config.init_from (checked against the
    config): a trained workdir's newest checkpoint, or a converted workdir's params (EMA = params)."""
    saved = base_config(config)
    if workdir_lib.has_checkpoints(config.init_from):
        return workdir_lib.restore_stage2_params(config.init_from, saved)
    loaded = workdir_lib.load_converted_params(config.init_from, saved, use_ema=True)
    return {"params": loaded["params"], "ema_params": loaded["params"]} | {
        k: loaded[k] for k in ("scale_factor", "step")
    }


def start_from_base(config: ml_collections.ConfigDict, state: Any, shardings: Any) -> Any:
    """A freshly initialised state with the base's params and EMA in place (laid out as `shardings` says, on every
    process); a frozen part's EMA is its live value (the run trains against it, and samples with it)."""
    weights = initial_weights(config)
    ema_host = keep_frozen(config, weights["ema_params"], weights["params"])
    params = jax.tree.map(parallel.put_global, weights["params"], shardings.params)
    ema = jax.tree.map(parallel.put_global, ema_host, shardings.ema_params)
    return state.replace(params=params, ema_params=ema)


def keep_frozen(config: ml_collections.ConfigDict, old: dict, new: dict) -> dict:
    """`new` params with the frozen parts (config.freeze) taken from `old`."""
    return {part: old[part] if part in config.freeze else value for part, value in new.items()}


def zero_frozen(config: ml_collections.ConfigDict, grads: dict) -> dict:
    """Gradients with the frozen parts (config.freeze) zeroed."""
    return {part: jax.tree.map(jnp.zeros_like, g) if part in config.freeze else g for part, g in grads.items()}
