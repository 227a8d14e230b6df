"""Denoising training objective (L_LDM of Rombach et al. 2022, eq. 2, in any parameterisation), min-SNR-γ weighting,
timestep sampling, per-timestep-bucket logging and caption dropout for classifier-free guidance. All pure functions.

Typical use inside a train step (model output computed by the caller on x_t = q_sample(schedule, x0, t, noise)):
    t = sample_timesteps(rng_t, B, schedule.num_timesteps); noise = jax.random.normal(rng_n, x0.shape)
    cond = drop_condition(rng_d, cond, null_cond, p_uncond)
    out = apply(params, q_sample(schedule, x0, t, noise), t, cond)
    loss, per_example = diffusion_loss(schedule, 'eps', out, x0, noise, t, min_snr_gamma=None)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from latentdiff.diffusion.schedules import Schedule, broadcast_to_x, check_parameterization, snr
from latentdiff.errors import UserError


def training_targets(
    schedule: Schedule, parameterization: str, x0: jax.Array, noise: jax.Array, t: jax.Array
) -> jax.Array:
    """Regression target [B, ...]: ε for 'eps', x0 for 'x0', v = √ᾱ·ε − √(1−ᾱ)·x0 for 'v'."""
    check_parameterization(parameterization)
    if parameterization == "eps":
        return noise
    if parameterization == "x0":
        return x0
    a = broadcast_to_x(schedule.sqrt_alphas_cumprod[t], x0)
    s = broadcast_to_x(schedule.sqrt_one_minus_alphas_cumprod[t], x0)
    return a * noise - s * x0


def min_snr_weights(schedule: Schedule, parameterization: str, t: jax.Array, gamma: float) -> jax.Array:
    """Min-SNR-γ loss weights [B] (Hang et al. 2023), expressed for the parameterisation's own MSE:

    'eps': min(snr, γ)/snr;  'v': min(snr, γ)/(snr + 1);  'x0': min(snr, γ).
    """
    check_parameterization(parameterization)
    if not gamma > 0:
        raise UserError(f"min_snr_gamma must be > 0 (or None to disable), got {gamma!r}")
    r = snr(schedule, t)
    clipped = jnp.minimum(r, gamma)
    if parameterization == "eps":
        return clipped / r
    if parameterization == "v":
        return clipped / (r + 1.0)
    return clipped


def diffusion_loss(
    schedule: Schedule,
    parameterization: str,
    model_out: jax.Array,
    x0: jax.Array,
    noise: jax.Array,
    t: jax.Array,
    min_snr_gamma: float | None,
) -> tuple[jax.Array, jax.Array]:
    """Mean squared error between model_out and the target, optionally min-SNR-γ weighted.

    model_out, x0, noise: [B, ...]; t: [B] int. Returns (loss scalar = mean of per_example, per_example [B] = weighted
    mean over the non-batch dims). Computed in float32 whatever the model's dtype. For 'eps' with
    min_snr_gamma=None this is L_LDM = E‖ε − ε_θ(z_t, t)‖² (per element mean).
    """
    if model_out.shape != x0.shape or noise.shape != x0.shape:
        raise UserError(f"model_out {model_out.shape}, x0 {x0.shape} and noise {noise.shape} must have equal shapes")
    if t.shape != x0.shape[:1]:
        raise UserError(f"t must have shape [B]={x0.shape[:1]}, got {t.shape}")
    target = training_targets(schedule, parameterization, x0.astype(jnp.float32), noise.astype(jnp.float32), t)
    err = jnp.square(model_out.astype(jnp.float32) - target)
    per_example = jnp.mean(err.reshape(err.shape[0], -1), axis=1)
    if min_snr_gamma is not None:
        per_example = per_example * min_snr_weights(schedule, parameterization, t, min_snr_gamma)
    return jnp.mean(per_example), per_example


def sample_timesteps(rng: jax.Array, batch: int, num_timesteps: int) -> jax.Array:
    """Uniform integer timesteps in [0, T), shape [batch], int32."""
    return jax.random.randint(rng, (batch,), 0, num_timesteps, dtype=jnp.int32)


def loss_per_timestep_bucket(
    per_example: jax.Array, t: jax.Array, num_timesteps: int, num_buckets: int
) -> tuple[jax.Array, jax.Array]:
    """Sums and counts of per-example losses in num_buckets equal-width timestep buckets.

    Bucket of t is t·num_buckets // T. Returns (sums [num_buckets] float32, counts [num_buckets] float32); the mean
    per bucket is sums / max(counts, 1). Sums and counts (not means) so they can be accumulated across steps/hosts.
    """
    if num_buckets < 1 or num_buckets > num_timesteps:
        raise UserError(f"num_buckets must be in [1, T={num_timesteps}], got {num_buckets}")
    bucket = (t.astype(jnp.int32) * num_buckets) // num_timesteps
    onehot = jax.nn.one_hot(bucket, num_buckets, dtype=jnp.float32)  # [B, K]
    return onehot.T @ per_example.astype(jnp.float32), jnp.sum(onehot, axis=0)


def drop_condition(rng: jax.Array, cond: Any, null_cond: Any, p_uncond: float) -> Any:
    """Replaces each row of cond by the null condition with probability p_uncond (caption dropout for CFG training).

    cond: pytree of [B, ...] arrays (e.g. tokens [B, L] or labels [B]). null_cond: same structure, each leaf
    broadcastable to the cond leaf (e.g. [L], [1, L] or [B, L]; a scalar for labels). One Bernoulli draw per row is
    shared by all leaves, so a row is dropped as a whole.
    """
    if not 0.0 <= p_uncond <= 1.0:
        raise UserError(f"p_uncond must be in [0, 1], got {p_uncond!r}")
    leaves = jax.tree_util.tree_leaves(cond)
    if not leaves:
        raise UserError("cond has no array leaves")
    batch = leaves[0].shape[0]
    if any(leaf.ndim == 0 or leaf.shape[0] != batch for leaf in leaves):
        raise UserError(f"every cond leaf must be [B, ...] with one B; got shapes {[leaf.shape for leaf in leaves]}")
    if jax.tree_util.tree_structure(cond) != jax.tree_util.tree_structure(null_cond):
        raise UserError("null_cond must have the same pytree structure as cond")
    drop = jax.random.uniform(rng, (batch,)) < p_uncond

    def replace(c: jax.Array, n: jax.Array) -> jax.Array:
        n = jnp.asarray(n, dtype=c.dtype)
        try:
            n = jnp.broadcast_to(n, c.shape)
        except ValueError as e:
            raise UserError(f"null_cond leaf of shape {n.shape} does not broadcast to cond leaf {c.shape}") from e
        return jnp.where(broadcast_to_x(drop, c), n, c)

    return jax.tree_util.tree_map(replace, cond, null_cond)
