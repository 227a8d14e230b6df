"""Inception-v3, the "FID variant" (TF graph inception-2015-12-05 as ported by pytorch-fid / torch-fidelity), NHWC.

Differences from torchvision's Inception3, all reproduced here:
  * the average pools inside Mixed_5b..5d (A), Mixed_6b..6e (C) and Mixed_7b (E) exclude the zero padding from the
    mean (TF semantics, torch `count_include_pad=False`);
  * the pool branch of the last block Mixed_7c is a 3x3 stride-1 *max* pool (an artefact of the TF graph);
  * BatchNorm eps 1e-3 (inference only: running statistics), 1008 classes, no auxiliary head, no dropout.

Input: [B, 299, 299, 3] already preprocessed to the network's range ((x − 128) / 128 for uint8 x; see
latentdiff.metrics for the resize + normalisation modes). Output: dict with
  'pool'            [B, 2048]  global average of Mixed_7c (the FID features),
  'logits'          [B, 1008]  fc(pool) with bias            (only when num_classes is set),
  'logits_unbiased' [B, 1008]  pool @ fc.kernel, no bias      (what torch-fidelity's Inception Score uses).
The four pytorch-fid feature blocks are sown into the 'intermediates' collection as 'block0'..'block3'
([B,73,73,64], [B,35,35,192], [B,17,17,768], [B,8,8,2048] at 299 px).

Params layout (torchvision names, under 'params'): every conv is a BasicConv2d
  {NAME: {'conv': {'kernel': [kh, kw, I, O]}, 'bn': {'scale': [O], 'bias': [O], 'mean': [O], 'var': [O]}}}
with NAME in Conv2d_1a_3x3 ... Conv2d_4a_3x3 and Mixed_5b/branch1x1 ... Mixed_7c/branch_pool; plus
'fc': {'kernel': [2048, 1008], 'bias': [1008]}. The BN running statistics live in 'params' (the network is frozen:
it is only ever loaded, never trained), so one pytree holds everything.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from latentdiff.errors import UserError

BN_EPS = 1e-3
FEATURE_DIM = 2048
NUM_CLASSES = 1008
INPUT_SIZE = 299

Pad = tuple[tuple[int, int], tuple[int, int]]


def _pad(ph: int, pw: int) -> Pad:
    return ((ph, ph), (pw, pw))


NO_PAD: Pad = _pad(0, 0)


class FrozenBatchNorm(nn.Module):
    """Inference BatchNorm with running statistics as params: [..., C] -> [..., C] (computed in float32)."""

    eps: float

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        mean = self.param("mean", nn.initializers.zeros, (c,), jnp.float32)
        var = self.param("var", nn.initializers.ones, (c,), jnp.float32)
        mul = scale * jax.lax.rsqrt(var + self.eps)
        return (x.astype(jnp.float32) - mean) * mul + bias


class BasicConv2d(nn.Module):
    """conv (no bias) -> BN(eps 1e-3) -> ReLU: [B, H, W, I] -> [B, H', W', features]."""

    features: int
    kernel: tuple[int, int]
    strides: int
    padding: Pad
    dtype: Any
    precision: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = nn.Conv(
            self.features,
            self.kernel,
            strides=(self.strides, self.strides),
            padding=self.padding,
            use_bias=False,
            dtype=self.dtype,
            precision=self.precision,
            name="conv",
        )
        y = FrozenBatchNorm(BN_EPS, name="bn")(conv(x))
        return nn.relu(y).astype(self.dtype)


def avg_pool_3x3_exclude_pad(x: jax.Array) -> jax.Array:
    """3x3 stride-1 average pool, padding 1, padded zeros not counted (TF / count_include_pad=False)."""
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=_pad(1, 1), count_include_pad=False)


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    """3x3 stride-2 max pool, no padding: [B, H, W, C] -> [B, (H-3)//2+1, (W-3)//2+1, C]."""
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class _Block(nn.Module):
    """Common fields of the mixed blocks; `conv(name, features, kernel, strides, padding)` builds a BasicConv2d."""

    dtype: Any
    precision: Any

    def conv(self, name: str, features: int, kernel: tuple[int, int], strides: int = 1, padding: Pad = NO_PAD):
        return BasicConv2d(features, kernel, strides, padding, self.dtype, self.precision, name=name)


class InceptionA(_Block):
    """Mixed_5b/5c/5d: [B, 35, 35, C] -> [B, 35, 35, 224 + pool_features]."""

    pool_features: int = 0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b1 = self.conv("branch1x1", 64, (1, 1))(x)
        b5 = self.conv("branch5x5_1", 48, (1, 1))(x)
        b5 = self.conv("branch5x5_2", 64, (5, 5), padding=_pad(2, 2))(b5)
        b3 = self.conv("branch3x3dbl_1", 64, (1, 1))(x)
        b3 = self.conv("branch3x3dbl_2", 96, (3, 3), padding=_pad(1, 1))(b3)
        b3 = self.conv("branch3x3dbl_3", 96, (3, 3), padding=_pad(1, 1))(b3)
        bp = self.conv("branch_pool", self.pool_features, (1, 1))(avg_pool_3x3_exclude_pad(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(_Block):
    """Mixed_6a (grid reduction): [B, 35, 35, 288] -> [B, 17, 17, 768]."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = self.conv("branch3x3", 384, (3, 3), strides=2)(x)
        bd = self.conv("branch3x3dbl_1", 64, (1, 1))(x)
        bd = self.conv("branch3x3dbl_2", 96, (3, 3), padding=_pad(1, 1))(bd)
        bd = self.conv("branch3x3dbl_3", 96, (3, 3), strides=2)(bd)
        return jnp.concatenate([b3, bd, max_pool_3x3_s2(x)], axis=-1)


class InceptionC(_Block):
    """Mixed_6b..6e (factorised 7x7): [B, 17, 17, 768] -> [B, 17, 17, 768]."""

    channels_7x7: int = 0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c7 = self.channels_7x7
        b1 = self.conv("branch1x1", 192, (1, 1))(x)
        b7 = self.conv("branch7x7_1", c7, (1, 1))(x)
        b7 = self.conv("branch7x7_2", c7, (1, 7), padding=_pad(0, 3))(b7)
        b7 = self.conv("branch7x7_3", 192, (7, 1), padding=_pad(3, 0))(b7)
        bd = self.conv("branch7x7dbl_1", c7, (1, 1))(x)
        bd = self.conv("branch7x7dbl_2", c7, (7, 1), padding=_pad(3, 0))(bd)
        bd = self.conv("branch7x7dbl_3", c7, (1, 7), padding=_pad(0, 3))(bd)
        bd = self.conv("branch7x7dbl_4", c7, (7, 1), padding=_pad(3, 0))(bd)
        bd = self.conv("branch7x7dbl_5", 192, (1, 7), padding=_pad(0, 3))(bd)
        bp = self.conv("branch_pool", 192, (1, 1))(avg_pool_3x3_exclude_pad(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(_Block):
    """Mixed_7a (grid reduction): [B, 17, 17, 768] -> [B, 8, 8, 1280]."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = self.conv("branch3x3_1", 192, (1, 1))(x)
        b3 = self.conv("branch3x3_2", 320, (3, 3), strides=2)(b3)
        b7 = self.conv("branch7x7x3_1", 192, (1, 1))(x)
        b7 = self.conv("branch7x7x3_2", 192, (1, 7), padding=_pad(0, 3))(b7)
        b7 = self.conv("branch7x7x3_3", 192, (7, 1), padding=_pad(3, 0))(b7)
        b7 = self.conv("branch7x7x3_4", 192, (3, 3), strides=2)(b7)
        return jnp.concatenate([b3, b7, max_pool_3x3_s2(x)], axis=-1)


class InceptionE(_Block):
    """Mixed_7b / 7c (expanded filter bank): [B, 8, 8, C] -> [B, 8, 8, 2048].

    `max_pool_branch`: the FID graph's Mixed_7c pools with a 3x3 stride-1 max pool (padding 1); Mixed_7b uses the
    padding-excluding average pool.
    """

    max_pool_branch: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b1 = self.conv("branch1x1", 320, (1, 1))(x)
        b3 = self.conv("branch3x3_1", 384, (1, 1))(x)
        b3a = self.conv("branch3x3_2a", 384, (1, 3), padding=_pad(0, 1))(b3)
        b3b = self.conv("branch3x3_2b", 384, (3, 1), padding=_pad(1, 0))(b3)
        bd = self.conv("branch3x3dbl_1", 448, (1, 1))(x)
        bd = self.conv("branch3x3dbl_2", 384, (3, 3), padding=_pad(1, 1))(bd)
        bda = self.conv("branch3x3dbl_3a", 384, (1, 3), padding=_pad(0, 1))(bd)
        bdb = self.conv("branch3x3dbl_3b", 384, (3, 1), padding=_pad(1, 0))(bd)
        if self.max_pool_branch:
            pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=_pad(1, 1))
        else:
            pooled = avg_pool_3x3_exclude_pad(x)
        bp = self.conv("branch_pool", 192, (1, 1))(pooled)
        return jnp.concatenate([b1, b3a, b3b, bda, bdb, bp], axis=-1)


class Classifier(nn.Module):
    """The fc layer, split as torch-fidelity uses it: [B, 2048] -> (pool @ kernel [B, N], bias [N])."""

    num_classes: int
    precision: Any

    @nn.compact
    def __call__(self, pool: jax.Array) -> tuple[jax.Array, jax.Array]:
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (pool.shape[-1], self.num_classes), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.num_classes,), jnp.float32)
        return jnp.dot(pool, kernel, precision=self.precision), bias


class InceptionV3(nn.Module):
    """FID Inception-v3: [B, H, W, 3] preprocessed images (299 x 299 for FID) -> dict(pool, logits, logits_unbiased).

    Fields:
      num_classes: 1008 to build the fc layer (logits, needed for IS), None for a features-only net (e.g. weights
        from the fid-helper TorchScript file, which has no fc).
      dtype: compute dtype of the convolutions (jnp.float32, or jnp.bfloat16 for speed); BN runs in float32, params
        stay float32, outputs are float32.
      precision: jax.lax.Precision for convs and the fc (None = backend default; on TPU pass 'highest' for
        float32-exact features).
    """

    num_classes: int | None
    dtype: Any
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
        if x.ndim != 4 or x.shape[-1] != 3:
            raise UserError(f"InceptionV3 expects NHWC RGB images [B, H, W, 3]; got shape {x.shape}")
        if min(x.shape[1:3]) < 75:
            raise UserError(f"InceptionV3 needs H, W >= 75 (FID uses 299); got {x.shape}")
        d, p = self.dtype, self.precision
        x = x.astype(d)
        x = BasicConv2d(32, (3, 3), 2, _pad(0, 0), d, p, name="Conv2d_1a_3x3")(x)
        x = BasicConv2d(32, (3, 3), 1, _pad(0, 0), d, p, name="Conv2d_2a_3x3")(x)
        x = BasicConv2d(64, (3, 3), 1, _pad(1, 1), d, p, name="Conv2d_2b_3x3")(x)
        x = max_pool_3x3_s2(x)
        self.sow("intermediates", "block0", x)
        x = BasicConv2d(80, (1, 1), 1, _pad(0, 0), d, p, name="Conv2d_3b_1x1")(x)
        x = BasicConv2d(192, (3, 3), 1, _pad(0, 0), d, p, name="Conv2d_4a_3x3")(x)
        x = max_pool_3x3_s2(x)
        self.sow("intermediates", "block1", x)
        x = InceptionA(d, p, pool_features=32, name="Mixed_5b")(x)
        x = InceptionA(d, p, pool_features=64, name="Mixed_5c")(x)
        x = InceptionA(d, p, pool_features=64, name="Mixed_5d")(x)
        x = InceptionB(d, p, name="Mixed_6a")(x)
        x = InceptionC(d, p, channels_7x7=128, name="Mixed_6b")(x)
        x = InceptionC(d, p, channels_7x7=160, name="Mixed_6c")(x)
        x = InceptionC(d, p, channels_7x7=160, name="Mixed_6d")(x)
        x = InceptionC(d, p, channels_7x7=192, name="Mixed_6e")(x)
        self.sow("intermediates", "block2", x)
        x = InceptionD(d, p, name="Mixed_7a")(x)
        x = InceptionE(d, p, max_pool_branch=False, name="Mixed_7b")(x)
        x = InceptionE(d, p, max_pool_branch=True, name="Mixed_7c")(x)
        self.sow("intermediates", "block3", x)
        pool = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        out = {"pool": pool}
        if self.num_classes is not None:
            unbiased, bias = Classifier(self.num_classes, self.precision, name="fc")(pool)
            out["logits_unbiased"] = unbiased
            out["logits"] = unbiased + bias
        return out


@functools.cache
def abstract_params(num_classes: int | None) -> dict:
    """The params pytree as ShapeDtypeStructs (no compute, cached): what the weight converters check against."""
    model = InceptionV3(num_classes=num_classes, dtype=jnp.float32)
    x = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), x)["params"]
