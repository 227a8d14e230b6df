"""PatchGAN discriminator of pix2pix (Isola et al. 2017) as used by taming-transformers / LDM stage-1 training.

conv4 s2 p1 (in -> ndf) + LeakyReLU(0.2); (n_layers - 1) x [conv4 s2 p1 (no bias) + BatchNorm + LeakyReLU(0.2)] with
ndf * min(2**n, 8) channels; conv4 s1 p1 (no bias) + BatchNorm + LeakyReLU(0.2); conv4 s1 p1 -> 1 logit per patch.
A 256x256 input with n_layers 3 gives a [B, 30, 30, 1] logit map (70x70 receptive field).

BatchNorm follows torch exactly (running stats in 'batch_stats', momentum 0.1 on the new value, eps 1e-5, the running
variance updated with the unbiased batch variance) so converted weights and training dynamics match taming.
Init as taming's `weights_init`: conv kernels N(0, 0.02), BatchNorm scale N(1, 0.02), biases 0.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from latentdiff.errors import UserError

Dtype = Any


def _normal(mean: float, std: float):
    def init(key: jax.Array, shape: tuple[int, ...], dtype: Dtype = jnp.float32) -> jax.Array:
        return mean + std * jax.random.normal(key, shape, dtype)

    return init


class TorchBatchNorm(nn.Module):
    """BatchNorm over [B,H,W,C] with torch.nn.BatchNorm2d semantics; statistics in float32.

    train: normalise with the biased batch variance, update running_var with the unbiased one (needs
    mutable=['batch_stats']); eval: normalise with the running statistics.
    """

    momentum: float  # torch convention: weight of the new batch statistic (0.1)
    epsilon: float
    dtype: Dtype

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", _normal(1.0, 0.02), (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        xf = x.astype(jnp.float32)
        if train:
            mean = jnp.mean(xf, axis=(0, 1, 2))
            var = jnp.mean(jnp.square(xf - mean), axis=(0, 1, 2))
            if not self.is_initializing():
                n = xf.size // c
                unbiased = var * (n / max(n - 1, 1))
                ra_mean.value = (1.0 - self.momentum) * ra_mean.value + self.momentum * mean
                ra_var.value = (1.0 - self.momentum) * ra_var.value + self.momentum * unbiased
        else:
            mean, var = ra_mean.value, ra_var.value
        y = (xf - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias
        return y.astype(self.dtype)


class NLayerDiscriminator(nn.Module):
    """Image [B,H,W,in_channels] -> patch logits [B,H',W',1] (float32).

    use_batchnorm False replaces BatchNorm by identity and gives those convs a bias (taming would use ActNorm).
    train=True uses batch statistics and, with mutable=['batch_stats'], updates the running ones.
    """

    in_channels: int
    ndf: int
    n_layers: int
    use_batchnorm: bool
    dtype: Dtype

    def _conv(self, features: int, stride: int, use_bias: bool, name: str) -> nn.Conv:
        return nn.Conv(
            features,
            (4, 4),
            strides=(stride, stride),
            padding=((1, 1), (1, 1)),
            use_bias=use_bias,
            kernel_init=_normal(0.0, 0.02),
            bias_init=nn.initializers.zeros,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            name=name,
        )

    def _norm_act(self, h: jax.Array, train: bool, name: str) -> jax.Array:
        if self.use_batchnorm:
            h = TorchBatchNorm(momentum=0.1, epsilon=1e-5, dtype=self.dtype, name=name)(h, train)
        return nn.leaky_relu(h, 0.2)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        if x.shape[-1] != self.in_channels:
            raise UserError(f"discriminator expects {self.in_channels} input channels, got shape {x.shape}")
        bias = not self.use_batchnorm
        h = nn.leaky_relu(self._conv(self.ndf, 2, True, "conv_0")(x.astype(self.dtype)), 0.2)
        for n in range(1, self.n_layers):
            h = self._conv(self.ndf * min(2**n, 8), 2, bias, f"conv_{n}")(h)
            h = self._norm_act(h, train, f"norm_{n}")
        n = self.n_layers
        h = self._conv(self.ndf * min(2**n, 8), 1, bias, f"conv_{n}")(h)
        h = self._norm_act(h, train, f"norm_{n}")
        return self._conv(1, 1, True, f"conv_{n + 1}")(h).astype(jnp.float32)
