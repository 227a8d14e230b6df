"""Text/class-to-image generation and image modification as one jitted function: noise (or a noised input latent)
-> sampler (one lax.scan, with the inpainting blend and concat conditioning inside the step) -> decode.

`make_generate` closes over modules and static choices (sampler, steps, shapes) and returns a pure function of
arrays, jitted once: compile time does not depend on the number of steps, and the same compiled function serves
every prompt batch of the same shape. Classifier-free guidance batches the conditional and unconditional inputs into
one denoiser call per step (latentdiff.diffusion.guidance).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from latentdiff import conditioning
from latentdiff.diffusion import guidance, samplers
from latentdiff.diffusion.schedules import Schedule, q_sample
from latentdiff.errors import UserError
from latentdiff.first_stage import FirstStage

SAMPLERS = ("ddim", "dpmpp2m")
DPMPP_SPACING = "linspace"  # DPM-Solver++ timesteps (samplers.dpmpp_timesteps)


def check_sampling_args(sampler: str, steps: int, num_timesteps: int, guidance_scale: float, eta: float) -> None:
    """One-line errors for impossible sampling settings."""
    if sampler not in SAMPLERS:
        raise UserError(f"--sampler {sampler!r} is not one of {SAMPLERS}")
    if not 1 <= steps <= num_timesteps:
        raise UserError(f"--steps must be between 1 and the model's {num_timesteps} training timesteps, got {steps}")
    if not (math.isfinite(guidance_scale) and guidance_scale >= 0):
        raise UserError(f"--guidance must be a finite number >= 0 (1 = no guidance), got {guidance_scale}")
    if not 0 <= eta <= 1:
        raise UserError(f"--eta must be in [0, 1], got {eta}")


def denoiser(unet: Any) -> Callable[[dict, jax.Array, jax.Array, jax.Array], jax.Array]:
    """(params {'unet','cond'}, x_t [B,h,w,c], t [B], context [B,L,D]) -> model output."""

    def apply(params: dict, x: jax.Array, t: jax.Array, context: jax.Array) -> jax.Array:
        return unet.apply({"params": params["unet"]}, x, t, context, None, False)

    return apply


def params_for_compute(params: Any, dtype: Any) -> Any:
    """Casts the floating leaves of ndim >= 2 (conv/dense kernels, embedding tables) to the module's compute dtype.

    flax modules with dtype=bfloat16 cast each kernel at every call; inside the sampler's scan that is a pass over all
    weights per step (872M parameters: ~5 GB of memory traffic a step at paper scale) unless XLA hoists it. Cast once
    here instead: the same values reach every dot and convolution, so outputs are bit-identical. Vectors (biases, norm
    scales) keep their dtype. A float32 dtype returns params unchanged.
    """
    dtype = jnp.dtype(dtype)
    if dtype == jnp.float32:
        return params

    def cast(leaf: jax.Array) -> jax.Array:
        return leaf.astype(dtype) if leaf.ndim >= 2 and jnp.issubdtype(leaf.dtype, jnp.floating) else leaf

    return jax.tree.map(cast, params)


def initial_noise(seed: int, indices: jax.Array, latent_shape: tuple[int, int, int]) -> jax.Array:
    """x_T [N,h,w,c]: sample i's noise depends only on (seed, indices[i]), not on how prompts are batched."""
    base = jax.random.key(seed)
    return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(base, i), latent_shape, jnp.float32))(indices)


def sampler_keys(seed: int, indices: jax.Array) -> jax.Array:
    """Per-sample keys [N] for the sampler's own noise (DDIM η > 0, the mask blend's re-noising): sample i's depend
    only on (seed, indices[i]), like `initial_noise`, and differ from the key its x_T is drawn with."""
    base = jax.random.key(seed)
    return jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(base, i), 1))(indices)


def start_for_strength(sampler: str, schedule: Schedule, num_steps: int, strength: float) -> tuple[int, int]:
    """(start_step, t_start) of img2img at `strength` in (0, 1] for sampler's step sequence: the last
    n = clip(round(strength·S), 1, S) steps are run, from the latent noised to t_start."""
    if sampler == "ddim":
        return samplers.img2img_start(schedule, num_steps, strength)
    return samplers.dpmpp_img2img_start(schedule, num_steps, strength, DPMPP_SPACING)


def latent_mask(mask: jax.Array, factor: int) -> jax.Array:
    """Pixel mask [B, H, W, 1] (1 = repaint) -> latent mask [B, H/f, W/f, 1]: the maximum over each f×f cell, so a
    latent cell is regenerated when any of its pixels is to be repainted (the kept latents cover only kept pixels)."""
    b, h, w, c = mask.shape
    if h % factor or w % factor:
        raise UserError(f"mask size {h}x{w} is not a multiple of the autoencoder's downsampling factor {factor}")
    return mask.reshape(b, h // factor, factor, w // factor, factor, c).max(axis=(2, 4))


def make_generate(
    *,
    unet: Any,
    cond_encoder: Any,
    first_stage: FirstStage,
    schedule: Schedule,
    parameterization: str,
    sampler: str,
    num_steps: int,
    start_step: int = 0,
    blend: bool = False,
    concat: str = "none",
    return_latents: bool = False,
) -> Callable[..., Any]:
    """Returns generate(params, first_stage_variables, scale_factor, cond [B,...], uncond [1 or B,...], guidance_scale,
    eta, x_T [B,h,w,c], rng_sampler, inputs=None) -> images [B,H,W,3] in [-1, 1] (float32), or with return_latents
    (images, z [B,h,w,c]) where z is the final (scaled) latent. Jit it (or call it inside a jitted function).

    x_T is the initial latent noise (see `initial_noise`); rng_sampler (one key, or per-sample keys [B], see
    `sampler_keys`) drives the sampler's own noise (eta > 0, the mask blend). The static options add image
    modification, all inside the same scan:
      start_step > 0 (img2img / SDEdit; see `start_for_strength`): z0 = E(inputs['image']).mode·scale_factor is
        noised with x_T to the timestep of step start_step (q_sample) and the sampler runs from there. start_step 0
        starts from x_T itself (text-to-image), whatever the image.
      blend (inpainting with any model, RePaint-style): inputs['mask'] [B,H,W,1] (1 = repaint) is reduced to the
        latent grid by `latent_mask`; after every step the kept latents are replaced by z0 noised to the step's level,
        and after the last step by z0 itself.
      concat 'inpaint' | 'sr' (config.conditioning.concat of models trained with concat conditioning): the condition
        [B,h,w,k] = conditioning.make_concat(concat, ...) is built once per batch from inputs (image + mask, or
        low_res) and concatenated to z_t at every step, the same for both guidance branches.
    """
    conditioning.check_kind(concat)
    apply = denoiser(unet)
    ts_desc = (
        samplers.ddim_timesteps(schedule.num_timesteps, num_steps)[::-1]
        if sampler == "ddim"
        else samplers.dpmpp_timesteps(schedule, num_steps, DPMPP_SPACING)
    )
    if not 0 <= start_step < len(ts_desc):
        raise UserError(f"start_step must be in [0, {len(ts_desc)}), got {start_step}")
    t_start = int(ts_desc[start_step])
    needs_z0 = bool(start_step) or blend

    def generate(
        params: dict,
        first_stage_variables: dict,
        scale_factor: jax.Array,
        cond: jax.Array,
        uncond: jax.Array,
        guidance_scale: jax.Array,
        eta: jax.Array,
        x_T: jax.Array,
        rng_sampler: jax.Array,
        inputs: dict | None = None,
    ) -> Any:
        inputs = inputs or {}
        # τ_θ runs once per batch, not once per step: the contexts are constant along the trajectory.
        context = cond_encoder.apply({"params": params["cond"]}, cond)
        null_context = cond_encoder.apply({"params": params["cond"]}, uncond)
        # No τ_θ (text_encoder.kind 'none', context None): nothing to guide, one UNet call per step (scale 1).
        scale = 1 if context is None else guidance_scale
        # Kernels cast to the UNet's compute dtype once per batch, not once per step.
        params = {**params, "unet": params_for_compute(params["unet"], unet.dtype)}
        if concat == "none":
            model_fn = guidance.cfg_model_fn(lambda x, t, c: apply(params, x, t, c), context, null_context, scale)
        else:
            extra = conditioning.make_concat(
                concat,
                first_stage=first_stage,
                first_stage_variables=first_stage_variables,
                scale_factor=scale_factor,
                latent_hw=tuple(x_T.shape[1:3]),
                image=inputs.get("image"),
                mask=inputs.get("mask"),
                low_res=inputs.get("low_res"),
            )
            # The same concat for the conditional and the unconditional branch: only the context differs.
            model_fn = guidance.cfg_model_fn(
                lambda x, t, c: apply(params, jnp.concatenate([x, c[1].astype(x.dtype)], axis=-1), t, c[0]),
                (context, extra),
                (null_context, extra),
                scale,
            )
        z0 = keep = None
        if needs_z0:
            z0 = first_stage.encode(first_stage_variables, inputs["image"], None, False) * scale_factor
            z0 = z0.astype(x_T.dtype)
        x = x_T
        if start_step:
            x = q_sample(schedule, z0, jnp.full((x_T.shape[0],), t_start, jnp.int32), x_T)
        if blend:
            keep = 1.0 - latent_mask(inputs["mask"].astype(jnp.float32), first_stage.downsample_factor)
        modify = dict(start_step=start_step, x0_known=z0 if blend else None, mask=keep)
        if sampler == "ddim":
            z = samplers.ddim_sample(model_fn, schedule, x, num_steps, eta, rng_sampler, parameterization, **modify)
        else:
            spacing = DPMPP_SPACING
            z = samplers.dpmpp_2m_sample(
                model_fn, schedule, x, num_steps, rng_sampler, parameterization, timestep_spacing=spacing, **modify
            )
        images = first_stage.decode(first_stage_variables, z / scale_factor)
        return (images, z) if return_latents else images

    return generate
