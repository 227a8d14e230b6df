"""GroupNorm (Wu & He 2018) with a closed-form backward pass, optionally fused with SiLU.

Same function and parameters ('scale', 'bias') as `flax.linen.GroupNorm` with its defaults (biased variance from
E[x²] − E[x]², statistics in float32), so checkpoints and converters do not change. The difference is the gradient:
autodiff of the forward emits many small reductions and broadcasts, which XLA:CPU runs slowly; here the backward is
written out (per group of N = H·W·C/G values, x̂ = (x − μ)·r, r = 1/√(σ² + ε), z = γ·x̂ + β, y = act(z)):

    dz = dy · act'(z),   dβ = Σ_{b,h,w} dz,   dγ = Σ_{b,h,w} dz·x̂,
    dx = r · (g − mean_group(g) − x̂ · mean_group(g·x̂)),   g = dz·γ.

Only x and the per-group (μ, r) are kept for the backward pass; x̂ and z are recomputed there.
Layout NHWC ([B, H, W, C] or any [B, ..., C]); groups split the channel axis.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from latentdiff.errors import UserError

Dtype = Any

ACTIVATIONS = ("none", "silu")


def _channel_coefficients(x: jax.Array, num_groups: int, epsilon: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """x [B, ..., C] -> (x as float32 [B, L, C], per-channel group mean [B, 1, C], rstd [B, 1, C]).

    Statistics are taken as per-channel sums over L (one pass over x), then summed over each group's channels: XLA:CPU
    runs that far faster than one reduction over the (L, C/G) axes of a [B, L, G, C/G] view.
    """
    b, c = x.shape[0], x.shape[-1]
    xf = x.astype(jnp.float32).reshape(b, -1, c)
    n = xf.shape[1] * (c // num_groups)
    s1 = _group_sum(jnp.sum(xf, axis=1), num_groups) / n
    s2 = _group_sum(jnp.sum(jnp.square(xf), axis=1), num_groups) / n
    rstd = jax.lax.rsqrt(jnp.maximum(s2 - jnp.square(s1), 0.0) + epsilon)
    return xf, s1[:, None, :], rstd[:, None, :]


def _group_sum(v: jax.Array, num_groups: int) -> jax.Array:
    """[B, C] -> [B, C]: each channel gets the sum over the channels of its group."""
    b, c = v.shape
    sums = jnp.sum(v.reshape(b, num_groups, c // num_groups), axis=-1, keepdims=True)
    return jnp.broadcast_to(sums, (b, num_groups, c // num_groups)).reshape(b, c)


def _activate(z: jax.Array, activation: str) -> jax.Array:
    return z * jax.nn.sigmoid(z) if activation == "silu" else z


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def group_norm(
    x: jax.Array, scale: jax.Array, bias: jax.Array, num_groups: int, epsilon: float, activation: str
) -> jax.Array:
    """act(GroupNorm(x)·scale + bias). x [B, ..., C] (any float dtype), scale/bias [C] -> float32 [B, ..., C]."""
    return _group_norm_fwd(x, scale, bias, num_groups, epsilon, activation)[0]


def _group_norm_fwd(
    x: jax.Array, scale: jax.Array, bias: jax.Array, num_groups: int, epsilon: float, activation: str
) -> tuple[jax.Array, tuple]:
    xf, mean, rstd = _channel_coefficients(x, num_groups, epsilon)
    a = rstd * scale  # z = x·a + (bias − mean·a): one multiply-add per element
    z = xf * a + (bias - mean * a)
    return _activate(z, activation).reshape(x.shape), (x, scale, bias, mean, rstd)


def _group_norm_bwd(num_groups: int, epsilon: float, activation: str, res: tuple, dy: jax.Array) -> tuple:
    x, scale, bias, mean, rstd = res
    xf = x.astype(jnp.float32).reshape(x.shape[0], -1, x.shape[-1])
    xhat = (xf - mean) * rstd
    dz = dy.astype(jnp.float32).reshape(xf.shape)
    if activation == "silu":
        z = xhat * scale + bias
        s = jax.nn.sigmoid(z)
        dz = dz * (s * (1.0 + z * (1.0 - s)))
        # Materialise dz once: otherwise XLA fuses the sigmoid into each of its three consumers (2 sums, dx).
        dz = jax.lax.optimization_barrier(dz)
    s1 = jnp.sum(dz, axis=1)  # [B, C]: one pass over (x, dy) gives every statistic the gradient needs
    s2 = jnp.sum(dz * xhat, axis=1)
    n = xf.shape[1] * (x.shape[-1] // num_groups)
    mean_g = _group_sum(s1 * scale, num_groups)[:, None, :] / n
    mean_gx = _group_sum(s2 * scale, num_groups)[:, None, :] / n
    dx = rstd * (dz * scale - mean_g - xhat * mean_gx)
    dscale, dbias = jnp.sum(s2, axis=0), jnp.sum(s1, axis=0)
    return dx.reshape(x.shape).astype(x.dtype), dscale.astype(scale.dtype), dbias.astype(bias.dtype)


group_norm.defvjp(_group_norm_fwd, _group_norm_bwd)


class GroupNorm(nn.Module):
    """GroupNorm over the last axis with learned per-channel scale/bias, optionally followed by SiLU.

    [B, ..., C] -> [B, ..., C] in `dtype`; statistics and the affine map in float32. Params 'scale' (ones) and
    'bias' (zeros) of shape [C] in `param_dtype`, as flax.linen.GroupNorm.
    """

    num_groups: int
    epsilon: float
    dtype: Dtype
    param_dtype: Dtype
    activation: str

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        if c % self.num_groups:
            raise UserError(f"GroupNorm: {c} channels are not divisible by num_groups={self.num_groups}")
        if self.activation not in ACTIVATIONS:
            raise UserError(f"GroupNorm activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
        y = group_norm(
            x, scale.astype(jnp.float32), bias.astype(jnp.float32), self.num_groups, self.epsilon, self.activation
        )
        return y.astype(self.dtype)
