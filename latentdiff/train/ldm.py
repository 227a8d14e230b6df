"""Stage 2: the latent diffusion model ε_θ(z_t, t, τ_θ(y)) trained with L_LDM (DESIGN.md §1, §4).

Per step: frozen stage-1 encoder -> z = scale_factor · E(x) (or, with config.first_stage.latents, a posterior
sample from precomputed moments written by `latentdiff encode`, read memory-mapped); caption dropout
(p_uncond, the empty caption / null class) for classifier-free guidance; t ~ U{0..T-1}; z_t = q_sample(z, t, ε);
loss = ‖target − UNet(z_t, t, τ_θ(y))‖² (ε-, v- or x0-target; optional min-SNR-γ). UNet and τ_θ are trained
together with AdamW (warmup, clipping) and an EMA of their params is kept in the state. The latent scale factor is
config.first_stage.scale_factor, or (0) the precomputed latents' meta.json value / 1/std of the first batch's
latents, and is stored in the state (so the checkpoint carries it).

Concat conditioning (config.conditioning.concat, latentdiff/conditioning.py): 'inpaint' builds [masked-image latent,
mask] from the batch images and random masks drawn from the step rng, 'sr' the bicubic ↓sr_factor image of the batch;
the UNet sees concat([z_t, condition], channels). text_encoder.kind 'none' = no τ_θ (context None, no dropout).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from latentdiff import conditioning, config_utils, generation, parallel
from latentdiff.diffusion import losses as diffusion_losses
from latentdiff.diffusion.schedules import make_schedule, q_sample
from latentdiff.errors import UserError
from latentdiff.first_stage import FirstStage
from latentdiff.imaging import to_uint8
from latentdiff.nn.autoencoder import DiagonalGaussian
from latentdiff.nn.text_encoder import build_text_encoder, init_tokens
from latentdiff.nn.unet import build_unet, validate_context
from latentdiff.train import finetune, ldm_eval, loop, optim, step_parts
from latentdiff.train.ldm_setup import (
    check_latents_meta,
    first_batch_scale_factor,
    null_condition,
    prepare_first_stage,
    prepare_tokenizer,
)

log = logging.getLogger("latentdiff")


@flax.struct.dataclass
class LDMState:
    step: jax.Array
    params: Any  # {'unet': ..., 'cond': ...}
    opt_state: Any
    ema_params: Any
    scale_factor: jax.Array
    nonfinite_count: jax.Array
    nonfinite_streak: jax.Array


def schedule_from_config(diffusion: ml_collections.ConfigDict) -> Any:
    return make_schedule(diffusion.schedule, diffusion.timesteps, diffusion.linear_start, diffusion.linear_end)


def check_config(config: ml_collections.ConfigDict) -> None:
    """Config-time checks that would otherwise fail deep inside a trace."""
    finetune.check_freeze(config)
    validate_context(config.unet, config.text_encoder)
    first_stage_dtype = config.first_stage.dtype
    if first_stage_dtype not in ("", "float32", "bfloat16"):
        raise UserError(
            f"first_stage.dtype must be '', 'float32' or 'bfloat16', got {first_stage_dtype!r} "
            "('' keeps the stage-1 model's own dtype)"
        )
    if config.text_encoder.kind not in ("bert", "class", "none"):
        raise UserError(f"text_encoder.kind must be 'bert', 'class' or 'none', got {config.text_encoder.kind!r}")
    if config.text_encoder.kind == "bert" and config.tokenizer.max_length != config.text_encoder.max_length:
        raise UserError(
            f"tokenizer.max_length ({config.tokenizer.max_length}) must equal text_encoder.max_length "
            f"({config.text_encoder.max_length})"
        )
    concat = conditioning.concat_kind(config)
    latent_channels = config.unet.out_channels
    need = latent_channels + conditioning.concat_channels(concat, latent_channels)
    if config.unet.in_channels != need:
        raise UserError(
            f"unet.in_channels={config.unet.in_channels} but conditioning.concat={concat!r} feeds {latent_channels} "
            f"latent (= unet.out_channels) + {need - latent_channels} concat channels; "
            f"set --config.unet.in_channels={need}"
        )
    if concat != "none" and config.first_stage.latents:
        raise UserError(
            f"concat conditioning ({concat!r}) needs images; unset first_stage.latents "
            "(--config.first_stage.latents='')"
        )
    if concat == "sr":
        factor = config.conditioning.sr_factor
        if factor < 1 or config.data.resolution % factor:
            raise UserError(f"conditioning.sr_factor={factor} must be >= 1 and divide data.resolution")


class LDMTask:
    """Pure init/step functions of stage 2 for a given config, null condition and latent shape."""

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        first_stage: FirstStage,
        null_cond: np.ndarray,
        scale_factor: float,
    ) -> None:
        check_config(config)
        self.config = config
        self.first_stage = first_stage
        self.unet = build_unet(config.unet)
        self.cond_encoder = build_text_encoder(config.text_encoder)
        self.schedule = schedule_from_config(config.diffusion)
        self.tx = optim.make_optimizer(config.optim, config.num_train_steps)
        self.null_cond = jnp.asarray(null_cond)
        self.initial_scale_factor = float(scale_factor)
        self.latent_shape = first_stage.latent_shape(config.data.resolution)
        self.concat = conditioning.concat_kind(config)
        if self.latent_shape[-1] != config.unet.out_channels:
            raise UserError(
                f"unet.out_channels ({config.unet.out_channels}) must equal the stage-1 latent channels "
                f"({self.latent_shape[-1]})"
            )

    @property
    def cond_key(self) -> str | None:
        """The batch field τ_θ reads: 'label' (kind 'class'), None ('none'), else 'tokens'."""
        kind = self.config.text_encoder.kind
        return "label" if kind == "class" else None if kind == "none" else "tokens"

    @property
    def source_key(self) -> str:
        """The batch field z0 comes from: 'image' (encoded on the fly), 'moments' (KL) or 'latents' (VQ)."""
        if not self.config.first_stage.latents:
            return "image"
        return "moments" if self.first_stage.config.kind == "kl" else "latents"

    @property
    def batch_keys(self) -> tuple[str, ...]:
        return (self.source_key,) + ((self.cond_key,) if self.cond_key else ())

    def init_state(self, rng: jax.Array) -> LDMState:
        k_unet, k_cond = jax.random.split(rng)
        cond = init_tokens(self.config.text_encoder, 1)
        cond_params = self.cond_encoder.init(k_cond, cond).get("params", {})  # kind 'none' has no params
        context = self.cond_encoder.apply({"params": cond_params}, cond)
        x = jnp.zeros((1, *self.latent_shape[:2], self.config.unet.in_channels), jnp.float32)
        unet_params = self.unet.init(k_unet, x, jnp.zeros((1,), jnp.int32), context, None, False)["params"]
        params = {"unet": unet_params, "cond": cond_params}
        return LDMState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=self.tx.init(params),
            ema_params=jax.tree.map(jnp.copy, params),
            scale_factor=jnp.asarray(self.initial_scale_factor, jnp.float32),
            nonfinite_count=jnp.zeros((), jnp.int32),
            nonfinite_streak=jnp.zeros((), jnp.int32),
        )

    def latents(
        self, first_stage_variables: dict, images: jax.Array, rng: jax.Array, scale_factor: jax.Array
    ) -> jax.Array:
        """Frozen first stage: images [B,H,W,3] -> scaled latents [B,h,w,c] (no gradient)."""
        z = self.first_stage.encode(first_stage_variables, images, rng, self.config.first_stage.sample_posterior)
        return jax.lax.stop_gradient(z) * scale_factor

    def z0(self, batch: dict, rng: jax.Array, first_stage_variables: dict, scale_factor: jax.Array) -> jax.Array:
        """Scaled latents [B,h,w,c] of a batch: encoded images, or a posterior sample (mode without
        sample_posterior) of precomputed moments [B,h,w,2c] with the same rng use as on-the-fly encoding, or
        precomputed VQ latents."""
        if self.source_key == "image":
            return self.latents(first_stage_variables, batch["image"], rng, scale_factor)
        if self.source_key == "moments":
            posterior = DiagonalGaussian.from_moments(batch["moments"])
            z = posterior.sample(rng) if self.config.first_stage.sample_posterior else posterior.mode()
        else:
            z = batch["latents"].astype(jnp.float32)
        return jax.lax.stop_gradient(z) * scale_factor

    def concat_input(
        self, batch: dict, rng: jax.Array, first_stage_variables: dict, scale_factor: jax.Array
    ) -> jax.Array:
        """The concat condition [B,h,w,k] of a batch (inpaint: random masks from rng; sr: the batch's 'low_res' if
        present, else the bicubic ↓sr_factor of its images)."""
        images = batch["image"]
        common_args = dict(
            first_stage=self.first_stage, first_stage_variables=first_stage_variables, scale_factor=scale_factor
        )
        if self.concat == "inpaint":
            b, h, w, _ = images.shape
            mask = conditioning.random_masks(rng, b, h, w)
            return conditioning.make_concat(
                "inpaint", **common_args, latent_hw=self.latent_shape[:2], image=images, mask=mask
            )
        low_res = batch.get("low_res")  # a batch field, not a config default: precomputed inputs when given
        if low_res is None:
            low_res = conditioning.low_res_from_image(images, self.config.conditioning.sr_factor)
        return conditioning.make_concat("sr", **common_args, latent_hw=self.latent_shape[:2], low_res=low_res)

    def grads(
        self, params: dict, batch: dict, rng: jax.Array, first_stage_variables: dict, scale_factor: jax.Array
    ) -> tuple:
        """Gradient of L_LDM on one (micro-)batch -> (grads, metrics)."""
        diffusion = self.config.diffusion
        k_enc, k_t, k_noise, k_drop, k_dropout = jax.random.split(rng, 5)
        z0 = self.z0(batch, k_enc, first_stage_variables, scale_factor)
        if self.cond_key is None:
            cond = jnp.zeros((z0.shape[0],), jnp.int32)  # dummy labels of kind 'none' (no context, no dropout)
        else:
            cond = diffusion_losses.drop_condition(k_drop, batch[self.cond_key], self.null_cond, diffusion.p_uncond)
        t = diffusion_losses.sample_timesteps(k_t, z0.shape[0], self.schedule.num_timesteps)
        noise = jax.random.normal(k_noise, z0.shape, jnp.float32)
        z_t = q_sample(self.schedule, z0, t, noise)
        if self.concat != "none":
            k_concat = jax.random.fold_in(rng, 5)  # not a split: the other keys stay those of unconditioned runs
            z_in = jnp.concatenate(
                [z_t, self.concat_input(batch, k_concat, first_stage_variables, scale_factor)], axis=-1
            )
        else:
            z_in = z_t
        gamma = diffusion.min_snr_gamma if diffusion.min_snr_gamma > 0 else None

        def loss_fn(p: dict) -> tuple[jax.Array, jax.Array]:
            context = self.cond_encoder.apply({"params": p["cond"]}, cond)
            out = self.unet.apply({"params": p["unet"]}, z_in, t, context, None, True, rngs={"dropout": k_dropout})
            loss, per_example = diffusion_losses.diffusion_loss(
                self.schedule, diffusion.parameterization, out, z0, noise, t, gamma
            )
            return loss, per_example

        (loss, per_example), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        sums, counts = diffusion_losses.loss_per_timestep_bucket(
            per_example, t, self.schedule.num_timesteps, diffusion.loss_buckets
        )
        metrics = {"loss": loss, "bucket_sums": sums, "bucket_counts": counts, "latent_std": jnp.std(z0)}
        return grads, metrics

    def train_step(
        self, state: LDMState, batch: dict, rng: jax.Array, first_stage_variables: dict
    ) -> tuple[LDMState, dict]:
        grads, metrics = step_parts.accumulate_gradients(
            lambda p, b, r: self.grads(p, b, r, first_stage_variables, state.scale_factor),
            state.params,
            batch,
            rng,
            self.config.grad_accum_steps,
        )
        if self.config.freeze:  # fine-tuning with frozen parts: no gradient (nor clipping share, nor Adam moments)
            grads = finetune.zero_frozen(self.config, grads)
        grad_norm = step_parts.global_norm(grads)
        finite = step_parts.all_finite(metrics["loss"], grad_norm)
        decay = step_parts.ema_decay(state.step, self.config.ema.decay, self.config.ema.warmup)
        params, opt_state, ema_params = self.tx.apply(
            grads, state.opt_state, state.params, grad_norm, finite, state.ema_params, decay
        )
        if self.config.freeze:  # ... and their values restored (weight decay would still move them)
            params = finetune.keep_frozen(self.config, state.params, params)
            ema_params = finetune.keep_frozen(self.config, state.ema_params, ema_params)
        count, streak = step_parts.count_skips(finite, state.nonfinite_count, state.nonfinite_streak)
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            opt_state=opt_state,
            ema_params=ema_params,
            nonfinite_count=count,
            nonfinite_streak=streak,
        )
        bucket_means = metrics["bucket_sums"] / jnp.maximum(metrics["bucket_counts"], 1.0)
        buckets = self.config.diffusion.loss_buckets
        scalars = {f"loss_t{i * self.schedule.num_timesteps // buckets:04d}": bucket_means[i] for i in range(buckets)}
        scalars |= {
            "loss": metrics["loss"],
            "grad_norm": grad_norm,
            "ema_decay": decay,
            "latent_std": metrics["latent_std"],
            "update_skipped": 1.0 - finite.astype(jnp.float32),
            "lr": self.tx.learning_rate(state.opt_state.count),
        }
        return new_state, loop.scalar_metrics(**scalars)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> LDMState:
    """Trains stage 2; writes checkpoints, metrics, sample grids to `workdir` (resumes if it holds a checkpoint)."""
    from latentdiff.data import input_pipeline
    from latentdiff.data import latents as latent_data

    parallel.init_distributed(
        config.distributed.coordinator,
        config.distributed.num_processes,
        config.distributed.process_id,
        timeout_s=config.distributed.timeout_s,
    )
    check_config(config)
    config_utils.require(config, "evaluation.num_images")
    ldm_eval.check_evaluation_config(config)
    mesh = parallel.make_mesh(dict(config.mesh))
    base_scale_factor = finetune.adopt_base_files(config, workdir) if config.init_from else 0.0
    first_stage = prepare_first_stage(config, workdir)  # as trained (sampling and evaluation use it so)
    latents = config.first_stage.latents
    meta = latent_data.read_meta(latents) if latents else None
    if meta is not None:
        check_latents_meta(meta, first_stage, config)
    if config.text_encoder.kind == "bert":
        captions = latent_data.open_arrays(latents)[2] if latents else None
        tokenizer = prepare_tokenizer(config, workdir, captions)
    else:
        tokenizer = None
    null_cond = null_condition(config, tokenizer)
    global_batch = config.batch_size * config.grad_accum_steps

    def make_iter() -> Any:
        if latents:
            return latent_data.LatentIterator(
                latents,
                global_batch_size=global_batch,
                process_index=jax.process_index(),
                process_count=jax.process_count(),
                seed=config.seed,
                shuffle=True,
                tokenizer=tokenizer,
            )
        return input_pipeline.make_dataset(
            config.data,
            split=config.data.train_split,
            tokenizer=tokenizer,
            global_batch_size=global_batch,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            seed=config.seed,
            train=True,
        )

    scale_factor = config.first_stage.scale_factor
    if scale_factor <= 0 and base_scale_factor > 0:
        scale_factor = base_scale_factor
        log.info("latent scale factor of init_from %s: %.5f", config.init_from, scale_factor)
    elif scale_factor <= 0 and meta is not None:
        scale_factor = float(meta["scale_factor"])
        log.info("latent scale factor from %s/meta.json: %.5f", latents, scale_factor)
    elif scale_factor <= 0:
        scale_factor = first_batch_scale_factor(
            first_stage, next(iter(make_iter())), mesh, config.first_stage.sample_posterior, config.seed
        )
        log.info("latent scale factor from the first batch: %.5f", scale_factor)
    # first_stage.dtype: the frozen model's compute dtype in the train step's encoding and the preview grids.
    task = LDMTask(config, first_stage.with_compute_dtype(config.first_stage.dtype), null_cond, scale_factor)
    first_stage_variables = jax.device_put(first_stage.variables, parallel.replicated(mesh))
    write_images = make_image_writer(config, task, tokenizer, first_stage_variables, mesh)
    evaluate = ldm_eval.make_evaluation(config, workdir, task, first_stage, tokenizer, scale_factor)
    loop_task = loop.Task(
        init_state=task.init_state,
        step_for=lambda step: task.train_step,
        batch_keys=task.batch_keys,
        constants=first_stage_variables,
        write_images=write_images,
        evaluate=evaluate,
        start_state=(lambda s, shardings: finetune.start_from_base(config, s, shardings)) if config.init_from else None,
    )
    started = time.perf_counter()
    state = loop.run(config, workdir, loop_task, make_iter, mesh)
    if evaluate is not None and evaluate.runs and jax.process_index() == 0:
        wall = time.perf_counter() - started
        share = f"{evaluate.seconds:.1f} s, {100 * evaluate.seconds / wall:.1f}% of this run's {wall:.1f} s"
        print(f"evaluation during training: {evaluate.runs} runs, {share}", file=sys.stderr, flush=True)
    return state


def make_image_writer(
    config: ml_collections.ConfigDict,
    task: LDMTask,
    tokenizer: Any,
    first_stage_variables: dict,
    mesh: jax.sharding.Mesh,
) -> Any:
    """Periodic sample grids (EMA params, the config's sampler and prompts/classes) -> workdir/images/*.png.

    None (no grids) for concat-conditioned models: their samples need concat inputs, which generation.make_generate
    does not take.
    """
    if task.concat != "none":
        log.info("no sample grids during training for conditioning.concat=%r", task.concat)
        return None
    s = config.sampling
    generate = jax.jit(
        generation.make_generate(
            unet=task.unet,
            cond_encoder=task.cond_encoder,
            first_stage=task.first_stage,
            schedule=task.schedule,
            parameterization=config.diffusion.parameterization,
            sampler=s.sampler,
            num_steps=s.steps,
        )
    )
    if config.text_encoder.kind == "class":
        labels = [int(p) for p in s.prompts]
        cond = np.asarray(labels, np.int32)
        captions = [f"class {c}" for c in labels]
    elif config.text_encoder.kind == "none":
        cond = np.zeros((len(s.prompts),), np.int32)
        captions = ["" for _ in s.prompts]
    else:
        captions = list(s.prompts)
        cond = tokenizer.encode(captions)
    uncond = task.null_cond[None]
    x_T = generation.initial_noise(config.seed, jnp.arange(len(captions)), task.latent_shape)

    def write(state: LDMState, step: int, out_dir: str) -> None:
        images = generate(
            state.ema_params,
            first_stage_variables,
            state.scale_factor,
            jnp.asarray(cond),
            uncond,
            jnp.float32(s.guidance),
            jnp.float32(s.eta),
            x_T,
            jax.random.key(config.seed),
        )
        images = loop.fetch(images)
        if jax.process_index() == 0:
            from latentdiff.imaging import grid, save_png

            save_png(grid(to_uint8(images), captions, columns=8, scale=2), os.path.join(out_dir, f"{step:07d}.png"))

    return write
