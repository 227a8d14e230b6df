"""Text/class-to-image generation as one jitted function: noise -> sampler (one lax.scan) -> decode.

`make_generate` closes over modules and static choices (sampler, steps, shapes) and returns a pure function of
arrays, jitted once: compile time does not depend on the number of steps, and the same compiled function serves
every prompt batch of the same shape. Classifier-free guidance batches the conditional and unconditional inputs into
one denoiser call per step (latentdiff.diffusion.guidance).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from latentdiff import first_stage
from latentdiff.diffusion import guidance, samplers
from latentdiff.diffusion.schedules import Schedule

SAMPLERS = ("ddim", "dpmpp2m")


def check_sampling_args(sampler: str, steps: int, num_timesteps: int, guidance_scale: float, eta: float) -> None:
    """One-line errors for impossible sampling settings."""
    if sampler not in SAMPLERS:
        raise ValueError(f"--sampler {sampler!r} is not one of {SAMPLERS}")
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"--steps must be between 1 and the model's {num_timesteps} training timesteps, got {steps}")
    if guidance_scale < 0:
        raise ValueError(f"--guidance must be >= 0 (1 = no guidance), got {guidance_scale}")
    if not 0 <= eta <= 1:
        raise ValueError(f"--eta must be in [0, 1], got {eta}")


def denoiser(unet: Any) -> Callable[[dict, jax.Array, jax.Array, jax.Array], jax.Array]:
    """(params {'unet','cond'}, x_t [B,h,w,c], t [B], context [B,L,D]) -> model output."""

    def apply(params: dict, x: jax.Array, t: jax.Array, context: jax.Array) -> jax.Array:
        return unet.apply({"params": params["unet"]}, x, t, context, None, False)

    return apply


def initial_noise(seed: int, indices: jax.Array, latent_shape: tuple[int, int, int]) -> jax.Array:
    """x_T [N,h,w,c]: sample i's noise depends only on (seed, indices[i]), not on how prompts are batched."""
    base = jax.random.key(seed)
    return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(base, i), latent_shape, jnp.float32))(indices)


def make_generate(
    *,
    unet: Any,
    cond_encoder: Any,
    fs: first_stage.FirstStage,
    schedule: Schedule,
    parameterization: str,
    sampler: str,
    num_steps: int,
) -> Callable[..., jax.Array]:
    """Returns generate(params, fs_variables, scale_factor, cond [B,...], uncond [1 or B,...], guidance_scale, eta,
    x_T [B,h,w,c], rng) -> images [B,H,W,3] in [-1, 1] (float32). Jit it (or call it inside a jitted function).
    x_T is the initial latent noise (see `initial_noise`); rng drives the sampler's own noise (eta > 0)."""
    apply = denoiser(unet)

    def generate(
        params: dict,
        fs_variables: dict,
        scale_factor: jax.Array,
        cond: jax.Array,
        uncond: jax.Array,
        guidance_scale: jax.Array,
        eta: jax.Array,
        x_T: jax.Array,
        rng_sampler: jax.Array,
    ) -> jax.Array:
        # τ_θ runs once per batch, not once per step: the contexts are constant along the trajectory.
        context = cond_encoder.apply({"params": params["cond"]}, cond)
        null_context = cond_encoder.apply({"params": params["cond"]}, uncond)
        model_fn = guidance.cfg_model_fn(lambda x, t, c: apply(params, x, t, c), context, null_context, guidance_scale)
        if sampler == "ddim":
            z = samplers.ddim_sample(model_fn, schedule, x_T, num_steps, eta, rng_sampler, parameterization)
        else:
            z = samplers.dpmpp_2m_sample(model_fn, schedule, x_T, num_steps, rng_sampler, parameterization)
        return first_stage.decode(fs, fs_variables, z / scale_factor)

    return generate
