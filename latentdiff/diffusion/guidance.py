"""Classifier-free guidance (Ho & Salimans 2021): ε̃ = ε_u + s·(ε_c − ε_u), one batched denoiser call per step."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from latentdiff.diffusion.schedules import broadcast_to_x
from latentdiff.errors import UserError

ApplyFn = Callable[[jax.Array, jax.Array, Any], jax.Array]


def cfg_model_fn(
    apply_fn: ApplyFn, cond: Any, uncond: Any, scale: float | jax.Array
) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """Wraps a conditional denoiser into a guided `model_fn(x [B, ...], t [B]) -> out [B, ...]` for the samplers.

    apply_fn(x [N, ...], t [N], cond) -> out [N, ...], where cond is a pytree of [N, ...] arrays (tokens [N, L],
    labels [N], ...). cond: that pytree for the B samples; uncond: same structure, each leaf broadcastable to the cond
    leaf (e.g. the empty caption's tokens [L] or [1, L]). Each step makes ONE call on the doubled batch
    concat([x, x]) with concat([cond, uncond]) and combines out = s·out_c + (1 − s)·out_u = out_u + s·(out_c − out_u).

    The combination is applied to the model output in its own parameterisation (ε, v or x0). At fixed (x_t, t) the
    three are affine in each other with the same x_t term for both halves (e.g. ε = √(1−ᾱ)·x_t + √ᾱ·v), so guiding
    v or x0 gives the same ε̃ as guiding ε. scale may be a Python number, a traced scalar, or a [B] array (per-sample
    scales). s = 1 returns the conditional output exactly (for a Python 1 the unconditional half is not computed).
    """
    if jax.tree_util.tree_structure(cond) != jax.tree_util.tree_structure(uncond):
        raise UserError("uncond must have the same pytree structure as cond")
    if isinstance(scale, (int, float)) and scale == 1:
        return lambda x, t: apply_fn(x, t, cond)

    def join(c: jax.Array, u: jax.Array) -> jax.Array:
        u = jnp.asarray(u, dtype=c.dtype)
        try:
            u = jnp.broadcast_to(u, c.shape)
        except ValueError as e:
            raise UserError(f"uncond leaf of shape {u.shape} does not broadcast to cond leaf {c.shape}") from e
        return jnp.concatenate([c, u], axis=0)

    both = jax.tree_util.tree_map(join, cond, uncond)

    def model_fn(x: jax.Array, t: jax.Array) -> jax.Array:
        out = apply_fn(jnp.concatenate([x, x], axis=0), jnp.concatenate([t, t], axis=0), both)
        out_c, out_u = jnp.split(out, 2, axis=0)
        s = broadcast_to_x(jnp.asarray(scale, dtype=out.dtype), out_c)
        return s * out_c + (1 - s) * out_u

    return model_fn
