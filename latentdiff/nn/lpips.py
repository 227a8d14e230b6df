"""LPIPS perceptual distance (Zhang et al. 2018, v0.1) on a VGG16 trunk, NHWC, as a frozen Flax module.

d(x0, x1) = sum_l mean_hw( w_l · (n(f_l(s(x0))) − n(f_l(s(x1))))² ) with s the fixed ScalingLayer, f_l the VGG16
`features` activations at relu1_2, relu2_2, relu3_3, relu4_3, relu5_3, n(f) = f / (‖f‖_channels + 1e-10) and w_l the
non-negative 1×1 "lin" weights (no bias; the original's dropout is off at eval). Matches
`lpips.LPIPS(net='vgg', version='0.1', spatial=False)` on inputs in [-1, 1].

Params layout (the pytree under 'params'):
  {'vgg': {'conv1_1': {'kernel': [3,3,3,64], 'bias': [64]}, 'conv1_2': ..., ..., 'conv5_3': ...},
   'lin': {'lin0': {'kernel': [64, 1]}, 'lin1': [128, 1], 'lin2': [256, 1], 'lin3': [512, 1], 'lin4': [512, 1]}}
The weights are frozen: they are loaded (latentdiff.convert.lpips_weights), never trained; `lpips_distance` stops
their gradient, while gradients with respect to the images flow (the generator loss needs them).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from latentdiff.errors import UserError

# ScalingLayer of lpips v0.1: x -> (x - shift) / scale, per RGB channel.
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
# VGG16 `features` convs per stage (output channels); a 2x2 max-pool separates stages. Tap = last relu of a stage.
VGG16_STAGES: tuple[tuple[int, ...], ...] = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
TAP_NAMES = ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3")
EPS = 1e-10


def conv_names() -> list[str]:
    """['conv1_1', 'conv1_2', 'conv2_1', ..., 'conv5_3']: the 13 VGG16 conv names, in `features` order."""
    return [f"conv{s + 1}_{i + 1}" for s, chans in enumerate(VGG16_STAGES) for i in range(len(chans))]


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2×2 max-pool, stride 2, odd edges dropped (torch MaxPool2d(2, 2)): [B, H, W, C] -> [B, H//2, W//2, C].

    Written as a max over a [B, H/2, 2, W/2, 2, C] view rather than `nn.max_pool`: the reduce-window's gradient
    (select-and-scatter) is slow on XLA:CPU, the view's is a mask. Ties split the gradient where select-and-scatter
    gives it to one input; behind a ReLU the only ties in practice are zeros, whose ReLU gradient is 0 either way.
    """
    b, h, w, c = x.shape
    x = x[:, : h // 2 * 2, : w // 2 * 2]
    return jnp.max(x.reshape(b, h // 2, 2, w // 2, 2, c), axis=(2, 4))


class VGG16Features(nn.Module):
    """VGG16 `features` up to relu5_3: [B, H, W, 3] -> 5 activations [B, H/2^k, W/2^k, C_k], k = 0..4."""

    dtype: Any  # compute dtype (jnp.float32 or jnp.bfloat16); params stay float32

    @nn.compact
    def __call__(self, x: jax.Array) -> list[jax.Array]:
        taps = []
        for s, chans in enumerate(VGG16_STAGES):
            if s > 0:
                x = max_pool_2x2(x)
            for i, c in enumerate(chans):
                conv = nn.Conv(c, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype, name=f"conv{s + 1}_{i + 1}")
                x = nn.relu(conv(x))
            taps.append(x)
        return taps


class LinHeads(nn.Module):
    """The five 1×1 "lin" layers (C_k -> 1, no bias): list of [B, h, w, C_k] -> list of [B, h, w, 1]."""

    dtype: Any

    @nn.compact
    def __call__(self, diffs: list[jax.Array]) -> list[jax.Array]:
        return [nn.Dense(1, use_bias=False, dtype=self.dtype, name=f"lin{k}")(d) for k, d in enumerate(diffs)]


def unit_normalize(f: jax.Array) -> jax.Array:
    """f / (sqrt(sum_c f²) + 1e-10) over the channel axis: [..., C] -> [..., C]."""
    return f / (jnp.sqrt(jnp.sum(f * f, axis=-1, keepdims=True)) + EPS)


def check_image_pair(x0: jax.Array, x1: jax.Array) -> None:
    """Raises ValueError unless x0 and x1 are both [B, H, W, 3] with equal shapes (H, W >= 16)."""
    if x0.shape != x1.shape or x0.ndim != 4 or x0.shape[-1] != 3:
        raise UserError(f"LPIPS expects two NHWC RGB batches of equal shape [B, H, W, 3]; got {x0.shape}, {x1.shape}")
    if min(x0.shape[1:3]) < 16:
        raise UserError(f"LPIPS needs H, W >= 16 (VGG16 pools 4 times); got {x0.shape}")


class LPIPS(nn.Module):
    """LPIPS-VGG distance: two [B, H, W, 3] batches in [-1, 1] -> [B] distances (float32, or float64 under x64).

    `dtype` is the compute dtype of the convolutions (bf16 on accelerators); the scaling, normalisation, squared
    difference, lin layers and averages run in promote_types(dtype, float32).
    """

    dtype: Any

    @nn.compact
    def __call__(self, x0: jax.Array, x1: jax.Array) -> jax.Array:
        check_image_pair(x0, x1)
        acc = jnp.promote_types(self.dtype, jnp.float32)
        shift = jnp.asarray(SHIFT, acc)
        scale = jnp.asarray(SCALE, acc)
        b = x0.shape[0]
        # One trunk pass over both batches: [2B, H, W, 3].
        x = (jnp.concatenate([x0, x1], axis=0).astype(acc) - shift) / scale
        taps = VGG16Features(dtype=self.dtype, name="vgg")(x.astype(self.dtype))
        diffs = []
        for f in taps:
            f = unit_normalize(f.astype(acc))
            diffs.append(jnp.square(f[:b] - f[b:]))
        per_layer = LinHeads(dtype=acc, name="lin")(diffs)
        return sum(jnp.mean(r, axis=(1, 2, 3)) for r in per_layer)


def lpips_distance(params: Any, x0: jax.Array, x1: jax.Array, *, dtype: Any) -> jax.Array:
    """LPIPS with frozen weights: `params` (the {'vgg', 'lin'} tree) get no gradient; x0, x1 do. Returns [B]."""
    return LPIPS(dtype=dtype).apply({"params": jax.lax.stop_gradient(params)}, x0, x1)


def abstract_lpips_params() -> Any:
    """The {'vgg', 'lin'} params tree as ShapeDtypeStructs (jax.eval_shape; no compute)."""
    x = jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32)
    return jax.eval_shape(lambda a, b: LPIPS(dtype=jnp.float32).init(jax.random.key(0), a, b), x, x)["params"]
