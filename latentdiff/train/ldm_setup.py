"""The wiring of a stage-2 run before its first step: the frozen first stage (copied into the workdir), the tokenizer
(saved into the workdir), the null condition for classifier-free guidance, the latent scale factor of the first batch,
and the check that precomputed latents match the first stage."""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from latentdiff import config_utils, parallel
from latentdiff.errors import UserError
from latentdiff.first_stage import FirstStage, load_first_stage_export, save_first_stage_export
from latentdiff.nn.text_encoder import null_label

log = logging.getLogger("latentdiff")


def prepare_first_stage(config: ml_collections.ConfigDict, workdir: str) -> FirstStage:
    """The frozen stage-1 model, copied into workdir/first_stage on the first run (so the workdir is self-contained)."""
    local = os.path.join(workdir, "first_stage")
    if os.path.isfile(os.path.join(local, "autoencoder.json")):
        return load_first_stage_export(local)
    config_utils.require(config, "first_stage.workdir")
    source = config.first_stage.workdir
    from latentdiff.workdir import read_first_stage

    first_stage, step = read_first_stage(source)  # the stage-1 workdir is only read
    if jax.process_index() == 0:
        save_first_stage_export(first_stage.config, first_stage.variables, local, {"step": str(step)})
    if first_stage.config.resolution != config.data.resolution:
        log.warning(
            "stage-1 resolution %d differs from data.resolution %d (fully convolutional, continuing)",
            first_stage.config.resolution,
            config.data.resolution,
        )
    return first_stage


def prepare_tokenizer(config: ml_collections.ConfigDict, workdir: str, captions: list[str] | None = None) -> Any:
    """The run's tokenizer, saved in workdir/tokenizer (first run: a named/local HF tokenizer, or WordPiece trained on
    the training captions — the offline default), so sampling later uses exactly the same vocabulary.

    captions: the training captions when they do not come from config.data (precomputed latents' captions.jsonl);
    the WordPiece vocabulary is then built from their first data.tokenizer_corpus_examples.
    """
    from latentdiff.data import tokenizer as tokenizer_lib
    from latentdiff.data.input_pipeline import make_tokenizer

    local = os.path.join(workdir, "tokenizer")
    save_dir = local if jax.process_index() == 0 or os.path.isdir(local) else ""
    if captions is None or (save_dir and tokenizer_lib.is_tokenizer_dir(save_dir)) or config.tokenizer.name_or_path:
        tok = make_tokenizer(config.tokenizer, config.data, save_dir=save_dir)
    else:
        corpus = captions[: config.data.tokenizer_corpus_examples]
        tok = tokenizer_lib.train_wordpiece(corpus, config.tokenizer.vocab_size, config.tokenizer.max_length)
        if save_dir:
            tok.save(save_dir)
    if tok.vocab_size > config.text_encoder.vocab_size:
        raise UserError(
            f"tokenizer has {tok.vocab_size} tokens but text_encoder.vocab_size is {config.text_encoder.vocab_size}; "
            f"set --config.text_encoder.vocab_size={tok.vocab_size}"
        )
    return tok


def null_condition(config: ml_collections.ConfigDict, tokenizer: Any) -> np.ndarray:
    """The unconditional input: tokens of the empty caption "" [L], the null class label (a scalar), or the dummy
    label 0 of kind 'none'."""
    if config.text_encoder.kind == "none":
        return np.zeros((), np.int32)
    if config.text_encoder.kind == "class":
        return np.asarray(null_label(config.text_encoder), np.int32)
    return np.asarray(tokenizer.encode([""])[0], np.int32)


def first_batch_scale_factor(
    first_stage: FirstStage, batch: dict, mesh: jax.sharding.Mesh, sample_posterior: bool, seed: int
) -> float:
    """1 / std of the first (global) batch's latents, as the LDM code does with scale_by_std."""
    images = parallel.host_to_global({"image": batch["image"]}, mesh)["image"]
    first_stage_variables = jax.device_put(first_stage.variables, parallel.replicated(mesh))
    z = jax.jit(lambda v, x, r: first_stage.encode(v, x, r, sample_posterior))(
        first_stage_variables, images, jax.random.key(seed)
    )
    return float(1.0 / jnp.std(z))


def check_latents_meta(meta: dict, first_stage: FirstStage, config: ml_collections.ConfigDict) -> None:
    """One-line ValueError unless precomputed latents (meta.json) come from a first stage like first_stage.workdir's
    (kind, embed_dim and latent shape at data.resolution)."""
    expected, latents = list(first_stage.latent_shape(config.data.resolution)), config.first_stage.latents
    got = (meta["kind"], int(meta["embed_dim"]), list(meta["latent_shape"]))
    if got != (first_stage.config.kind, int(first_stage.config.embed_dim), expected):
        raise UserError(
            f"first_stage.latents={latents!r} holds {got[0]} latents {got[2]} (embed_dim {got[1]}) but "
            f"first_stage.workdir gives {first_stage.config.kind} latents {expected} "
            f"(embed_dim {first_stage.config.embed_dim}) at "
            f"data.resolution={config.data.resolution}; re-encode with latentdiff encode --workdir "
            f"{config.first_stage.workdir} --out DIR"
        )
    if config.text_encoder.kind == "class" and not os.path.isfile(os.path.join(latents, "labels.npy")):
        raise UserError(
            f"text_encoder.kind='class' needs labels, but {latents!r} has no labels.npy; re-encode with "
            "latentdiff encode (it writes labels.npy for labelled datasets)"
        )
