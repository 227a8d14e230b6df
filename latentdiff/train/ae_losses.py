"""Pure pieces of the stage-1 autoencoder loss (LDM App. G; CompVis LPIPSWithDiscriminator / VQLPIPSWithDiscriminator).

Generator side:  nll + kl_weight * kl + d_weight * disc_factor * generator_adv_loss  (KL-f)
                 nll + codebook_weight * vq_loss + d_weight * disc_factor * generator_adv_loss  (VQ-f)
Discriminator:   disc_factor * hinge_d_loss(D(x), D(x_rec))
No flax modules here: every function maps arrays to arrays, so the train step composes them freely.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util


def reconstruction_nll(
    x: jax.Array, x_rec: jax.Array, perceptual: jax.Array, perceptual_weight: float, logvar: jax.Array
) -> jax.Array:
    """Scalar sum(nll) / B with rec = |x - x_rec| + perceptual_weight * lpips, nll = rec / exp(logvar) + logvar.

    x, x_rec: [B,H,W,C]; perceptual: [B] per-example LPIPS (broadcast over pixels, as CompVis' [B,1,1,1]);
    logvar: scalar learned log-variance (CompVis initialises it to 0).
    """
    x = x.astype(jnp.float32)
    x_rec = x_rec.astype(jnp.float32)
    per_example = jnp.reshape(perceptual.astype(jnp.float32), (-1,) + (1,) * (x.ndim - 1))
    rec = jnp.abs(x - x_rec) + perceptual_weight * per_example
    nll = rec / jnp.exp(logvar) + logvar
    return jnp.sum(nll) / x.shape[0]


def kl_loss(posterior_kl: jax.Array) -> jax.Array:
    """posterior_kl: [B] KL summed over latent dims -> scalar sum / B."""
    return jnp.sum(posterior_kl) / posterior_kl.shape[0]


def generator_adv_loss(logits_fake: jax.Array) -> jax.Array:
    """-mean D(x_rec) over all patch logits."""
    return -jnp.mean(logits_fake.astype(jnp.float32))


def hinge_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
    """0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x_rec)))."""
    real = jnp.mean(jax.nn.relu(1.0 - logits_real.astype(jnp.float32)))
    fake = jnp.mean(jax.nn.relu(1.0 + logits_fake.astype(jnp.float32)))
    return 0.5 * (real + fake)


def vanilla_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
    """0.5 * (mean softplus(-D(x)) + mean softplus(D(x_rec))) (non-saturating BCE)."""
    real = jnp.mean(jax.nn.softplus(-logits_real.astype(jnp.float32)))
    fake = jnp.mean(jax.nn.softplus(logits_fake.astype(jnp.float32)))
    return 0.5 * (real + fake)


def adaptive_weight(nll_grad: jax.Array, g_grad: jax.Array, disc_weight: float) -> jax.Array:
    """clip(||nll_grad|| / (||g_grad|| + 1e-4), 0, 1e4) * disc_weight, gradient-stopped (CompVis
    calculate_adaptive_weight). The gradients are taken w.r.t. the decoder's last conv kernel."""
    ratio = jnp.linalg.norm(jnp.ravel(nll_grad)) / (jnp.linalg.norm(jnp.ravel(g_grad)) + 1e-4)
    return jax.lax.stop_gradient(jnp.clip(ratio, 0.0, 1e4) * disc_weight)


def weighted_generator_grads(
    losses: Callable[[Any], tuple[tuple[jax.Array, jax.Array], Any]],
    params: dict,
    last_layer: tuple[str, ...],
    disc_weight: float,
    factor: jax.Array,
) -> tuple[Any, jax.Array, jax.Array, jax.Array, Any]:
    """∇(main + λ·factor·g) with the adaptive λ = adaptive_weight(∂main/∂W, ∂g/∂W) at the last layer W.

    losses(params) -> ((main, g), aux). Returns (grads, λ, main, g, aux). The two gradients λ needs are taken at W
    only (backward through the loss heads and the last layer, not the whole autoencoder), and the full gradient is
    one pullback of the weighted cotangent (1, λ·factor): pullbacks are linear, so this equals ∇main + λ·factor·∇g
    with one backward through the autoencoder instead of two.
    """
    (main, g_loss), pullback, aux = jax.vjp(losses, params, has_aux=True)
    flat = traverse_util.flatten_dict(params, keep_empty_nodes=True)
    at_last = lambda w: losses(traverse_util.unflatten_dict({**flat, last_layer: w}))[0]
    _, last_pullback = jax.vjp(at_last, flat[last_layer])
    one, zero = jnp.ones_like(main), jnp.zeros_like(main)
    (main_at_last,) = last_pullback((one, zero))
    (g_at_last,) = last_pullback((zero, one))
    weight = adaptive_weight(main_at_last, g_at_last, disc_weight)
    (grads,) = pullback((one, (weight * factor).astype(g_loss.dtype) * jnp.ones_like(g_loss)))
    return grads, weight, main, g_loss, aux


def disc_factor(step: jax.Array | int, disc_start: int, factor: float) -> jax.Array:
    """`factor` once step >= disc_start, else 0 (CompVis adopt_weight)."""
    return jnp.where(jnp.asarray(step) >= disc_start, jnp.float32(factor), jnp.float32(0.0))
