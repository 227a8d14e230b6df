"""Stage-1 autoencoders of LDM (Rombach et al. 2022, §3 and App. G): the CompVis Encoder/Decoder, KL and VQ variants.

Layout NHWC throughout. Architecture as in the paper's code (ldm/modules/diffusionmodules/model.py):
GroupNorm(32, eps 1e-6) + swish, ResNet blocks, stride-2 3x3 VALID conv after (0,1,0,1) padding to downsample,
nearest x2 + 3x3 conv to upsample, one single-head self-attention between two ResNet blocks in the middle, and
attention blocks at every level whose spatial size is listed in `attn_resolutions`.

Param names mirror the CompVis checkpoint keys, so weight conversion is a plain table (convert/diffusers_vae.py):
`encoder/down_{i}_block_{j}/conv1/kernel`, `encoder/mid_attn_1/q/kernel`, `decoder/up_{i}_upsample/conv/kernel`,
`decoder/conv_out/kernel` ... where level i counts from the highest resolution (i = 0) as in CompVis.

Mixed precision: `dtype` is the compute dtype (bfloat16 for speed), params stay float32; normalisation statistics,
the attention softmax and the posterior are computed in float32.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections

from latentdiff.errors import UserError
from latentdiff.nn.norms import GroupNorm
from latentdiff.nn.quantizer import QuantizerOutput, VectorQuantizer

Dtype = Any

# Laplace smoothing of the EMA codebook's cluster sizes (VQ-VAE-2); not a config field (it never needs tuning).
EMA_EPS = 1e-5


def _conv(features: int, kernel: int, dtype: Dtype, name: str | None, stride: int = 1, padding: Any = None) -> nn.Conv:
    """A conv with explicit PyTorch-style symmetric padding (kernel // 2) unless `padding` is given."""
    pad = ((kernel // 2, kernel // 2),) * 2 if padding is None else padding
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=pad,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )


def _norm(dtype: Dtype, name: str, activation: str) -> GroupNorm:
    """GroupNorm(32, eps 1e-6), then `activation` ('silu' = swish, fused): latentdiff.nn.norms, whose statistics and
    closed-form backward XLA:CPU runs 1.2-4.5x faster than flax's GroupNorm + nn.swish at the 128-px levels (two
    channels per group); same params ('scale', 'bias'), so checkpoints and converters are unchanged."""
    return GroupNorm(
        num_groups=32, epsilon=1e-6, dtype=dtype, param_dtype=jnp.float32, activation=activation, name=name
    )


class ResnetBlock(nn.Module):
    """norm-swish-conv3x3, norm-swish-dropout-conv3x3, 1x1 shortcut when channels change. [B,H,W,Cin]->[B,H,W,C]."""

    out_channels: int
    dropout: float
    dtype: Dtype

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        h = _norm(self.dtype, "norm1", "silu")(x)
        h = _conv(self.out_channels, 3, self.dtype, "conv1")(h)
        h = _norm(self.dtype, "norm2", "silu")(h)
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = _conv(self.out_channels, 3, self.dtype, "conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = _conv(self.out_channels, 1, self.dtype, "nin_shortcut")(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions, channels as the head dim, residual. [B,H,W,C]->[B,H,W,C].

    q/k/v/proj_out are per-pixel linear maps (the 1x1 convs of CompVis, the Linear layers of diffusers).
    The logits and softmax are computed in float32.
    """

    dtype: Dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        dense = lambda name: nn.Dense(c, dtype=self.dtype, param_dtype=jnp.float32, name=name)
        y = _norm(self.dtype, "norm", "none")(x)
        q, k, v = (dense(n)(y).reshape(b, h * w, c) for n in ("q", "k", "v"))
        logits = jnp.einsum("bqc,bkc->bqk", q.astype(jnp.float32), k.astype(jnp.float32)) * (c**-0.5)
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bqk,bkc->bqc", weights, v).reshape(b, h, w, c)
        return x + dense("proj_out")(out)


class Downsample(nn.Module):
    """Pad (0,1) on H and W then a stride-2 3x3 VALID conv. [B,H,W,C]->[B,H/2,W/2,C]."""

    dtype: Dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return _conv(x.shape[-1], 3, self.dtype, "conv", stride=2, padding="VALID")(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv. [B,H,W,C]->[B,2H,2W,C]."""

    dtype: Dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return _conv(x.shape[-1], 3, self.dtype, "conv")(x)


def _check_resolution(resolution: int, num_levels: int) -> None:
    if resolution % 2 ** (num_levels - 1):
        raise UserError(
            f"resolution {resolution} is not divisible by 2**(len(ch_mult)-1) = {2 ** (num_levels - 1)}; "
            "pick a resolution that the encoder can halve at every level"
        )


def check_input(x: jax.Array, in_channels: int, num_levels: int) -> None:
    """Images must be [B, H, W, in_channels] with H and W divisible by f = 2**(num_levels-1) (checked at trace time)."""
    f = 2 ** (num_levels - 1)
    if x.ndim != 4 or x.shape[-1] != in_channels or x.shape[1] % f or x.shape[2] % f:
        raise UserError(
            f"autoencoder expects images [B, H, W, {in_channels}] with H and W divisible by {f}, got "
            f"{tuple(x.shape)}; resize/convert the images (NHWC, RGB) or set autoencoder.in_channels"
        )


class Encoder(nn.Module):
    """Image [B,H,W,in_ch] -> latent moments [B,H/f,W/f,(2 if double_z else 1)*z_channels], f = 2**(len(ch_mult)-1).

    `resolution` is the nominal input size used only to decide where attention goes (levels whose current size is in
    `attn_resolutions`), exactly as CompVis; inputs of another size run with the same layout.
    """

    ch: int
    ch_mult: Sequence[int]
    num_res_blocks: int
    attn_resolutions: Sequence[int]
    dropout: float
    resolution: int
    z_channels: int
    double_z: bool
    dtype: Dtype

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        _check_resolution(self.resolution, len(self.ch_mult))
        h = _conv(self.ch, 3, self.dtype, "conv_in")(x.astype(self.dtype))
        curr_res = self.resolution
        for i, mult in enumerate(self.ch_mult):
            for j in range(self.num_res_blocks):
                h = ResnetBlock(self.ch * mult, self.dropout, self.dtype, name=f"down_{i}_block_{j}")(h, train)
                if curr_res in self.attn_resolutions:
                    h = AttnBlock(self.dtype, name=f"down_{i}_attn_{j}")(h)
            if i != len(self.ch_mult) - 1:
                h = Downsample(self.dtype, name=f"down_{i}_downsample")(h)
                curr_res //= 2
        block_in = self.ch * self.ch_mult[-1]
        h = ResnetBlock(block_in, self.dropout, self.dtype, name="mid_block_1")(h, train)
        h = AttnBlock(self.dtype, name="mid_attn_1")(h)
        h = ResnetBlock(block_in, self.dropout, self.dtype, name="mid_block_2")(h, train)
        h = _norm(self.dtype, "norm_out", "silu")(h)
        out_ch = 2 * self.z_channels if self.double_z else self.z_channels
        return _conv(out_ch, 3, self.dtype, "conv_out")(h)


class Decoder(nn.Module):
    """Latent [B,h,w,z_channels] -> image [B,h*f,w*f,out_ch] (the last conv is `conv_out`, see last_layer_path)."""

    ch: int
    out_ch: int
    ch_mult: Sequence[int]
    num_res_blocks: int
    attn_resolutions: Sequence[int]
    dropout: float
    resolution: int
    dtype: Dtype

    @nn.compact
    def __call__(self, z: jax.Array, train: bool) -> jax.Array:
        _check_resolution(self.resolution, len(self.ch_mult))
        block_in = self.ch * self.ch_mult[-1]
        curr_res = self.resolution // 2 ** (len(self.ch_mult) - 1)
        h = _conv(block_in, 3, self.dtype, "conv_in")(z.astype(self.dtype))
        h = ResnetBlock(block_in, self.dropout, self.dtype, name="mid_block_1")(h, train)
        h = AttnBlock(self.dtype, name="mid_attn_1")(h)
        h = ResnetBlock(block_in, self.dropout, self.dtype, name="mid_block_2")(h, train)
        for i in reversed(range(len(self.ch_mult))):
            for j in range(self.num_res_blocks + 1):
                h = ResnetBlock(self.ch * self.ch_mult[i], self.dropout, self.dtype, name=f"up_{i}_block_{j}")(h, train)
                if curr_res in self.attn_resolutions:
                    h = AttnBlock(self.dtype, name=f"up_{i}_attn_{j}")(h)
            if i != 0:
                h = Upsample(self.dtype, name=f"up_{i}_upsample")(h)
                curr_res *= 2
        h = _norm(self.dtype, "norm_out", "silu")(h)
        return _conv(self.out_ch, 3, self.dtype, "conv_out")(h)


@flax.struct.dataclass
class DiagonalGaussian:
    """Posterior q(z|x) = N(mean, exp(logvar)) per latent element; a pytree, so it can leave `module.apply`.

    mean, logvar: [B, h, w, C] float32, logvar clamped to [-30, 20].
    """

    mean: jax.Array
    logvar: jax.Array

    @classmethod
    def from_moments(cls, moments: jax.Array) -> DiagonalGaussian:
        """moments [B,h,w,2C] (mean first, then log-variance, as CompVis/diffusers chunk them on channels)."""
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return cls(mean=mean, logvar=jnp.clip(logvar, -30.0, 20.0))

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    def sample(self, rng: jax.Array) -> jax.Array:
        """z = mean + std * eps, eps ~ N(0, I). [B,h,w,C]."""
        return self.mean + self.std * jax.random.normal(rng, self.mean.shape, self.mean.dtype)

    def mode(self) -> jax.Array:
        return self.mean

    def kl(self) -> jax.Array:
        """KL(q || N(0, I)) summed over latent dims: [B]."""
        terms = jnp.square(self.mean) + jnp.exp(self.logvar) - 1.0 - self.logvar
        return 0.5 * jnp.sum(terms, axis=tuple(range(1, self.mean.ndim)))


class _Body(nn.Module):
    """The body both autoencoders share (CompVis / diffusers layout): encoder -> quant_conv -> [regulariser] ->
    post_quant_conv -> decoder. A subclass calls `make_body` in its setup and adds its regulariser."""

    in_channels: int
    out_channels: int
    resolution: int
    ch: int
    ch_mult: Sequence[int]
    num_res_blocks: int
    attn_resolutions: Sequence[int]
    dropout: float
    z_channels: int
    embed_dim: int
    dtype: Dtype

    def make_body(self, double_z: bool, quant_channels: int) -> None:
        """Creates encoder, decoder, quant_conv (z_channels -> quant_channels, float32) and post_quant_conv."""
        common = dict(
            ch=self.ch,
            ch_mult=tuple(self.ch_mult),
            num_res_blocks=self.num_res_blocks,
            attn_resolutions=tuple(self.attn_resolutions),
            dropout=self.dropout,
            resolution=self.resolution,
            dtype=self.dtype,
        )
        self.encoder = Encoder(z_channels=self.z_channels, double_z=double_z, **common)
        self.decoder = Decoder(out_ch=self.out_channels, **common)
        self.quant_conv = _conv(quant_channels, 1, jnp.float32, None)
        self.post_quant_conv = _conv(self.z_channels, 1, self.dtype, None)

    def encoded(self, x: jax.Array, train: bool) -> jax.Array:
        """x [B,H,W,in_channels] in [-1, 1] -> quant_conv output [B,H/f,W/f,quant_channels] (float32)."""
        _check_resolution(self.resolution, len(self.ch_mult))  # the config first, then the input
        check_input(x, self.in_channels, len(self.ch_mult))
        return self.quant_conv(self.encoder(x, train).astype(jnp.float32))

    def decoded(self, z: jax.Array, train: bool) -> jax.Array:
        """A latent [B,h,w,embed_dim] (quantised for VQ) -> image [B,h*f,w*f,out_channels] (float32)."""
        return self.decoder(self.post_quant_conv(z), train).astype(jnp.float32)


class AutoencoderKL(_Body):
    """KL-regularised autoencoder (LDM-KL-f). Use `encode`/`decode` via `module.apply(..., method=...)`.

    encode: x [B,H,W,in] -> DiagonalGaussian over z [B,H/f,W/f,embed_dim]; decode: z -> x_rec [B,H,W,out_ch].
    Dropout (when > 0 and train) needs rngs={'dropout': key}.
    """

    def setup(self) -> None:
        self.make_body(double_z=True, quant_channels=2 * self.embed_dim)

    def encode(self, x: jax.Array, train: bool = False) -> DiagonalGaussian:
        """x [B,H,W,in_channels] in [-1, 1] -> posterior over [B,H/f,W/f,embed_dim] (float32)."""
        return DiagonalGaussian.from_moments(self.encoded(x, train))

    def decode(self, z: jax.Array, train: bool = False) -> jax.Array:
        """z [B,h,w,embed_dim] -> reconstruction [B,h*f,w*f,out_channels] (float32)."""
        return self.decoded(z, train)

    def __call__(
        self, x: jax.Array, rng: jax.Array | None, sample_posterior: bool, train: bool
    ) -> tuple[jax.Array, DiagonalGaussian]:
        """Returns (reconstruction [B,H,W,out], posterior). `rng` is used only when sample_posterior."""
        posterior = self.encode(x, train)
        if sample_posterior:
            if rng is None:
                raise UserError("sample_posterior=True needs an rng key")
            z = posterior.sample(rng)
        else:
            z = posterior.mode()
        return self.decode(z, train), posterior


class VQAutoencoder(_Body):
    """Vector-quantised autoencoder (LDM-VQ-f), laid out as diffusers' VQModel / CompVis VQModel:
    encoder -> quant_conv -> quantize -> post_quant_conv -> decoder.

    `encode` returns the *pre-quantisation* latent h [B,h,w,embed_dim] (what LDM diffuses); `decode(h)` quantises it
    and decodes (as diffusers VQModel.decode and CompVis decode_first_stage); `decode_code(quant)` skips quantisation.
    With ema_codebook the codebook and its EMA statistics live in the 'vq_stats' collection (see VectorQuantizer).
    """

    n_embed: int
    beta: float
    legacy_beta: bool
    ema_codebook: bool
    ema_decay: float
    ema_eps: float

    def setup(self) -> None:
        self.make_body(double_z=False, quant_channels=self.embed_dim)
        self.quantize = VectorQuantizer(
            n_embed=self.n_embed,
            embed_dim=self.embed_dim,
            beta=self.beta,
            legacy_beta=self.legacy_beta,
            use_ema=self.ema_codebook,
            ema_decay=self.ema_decay,
            ema_eps=self.ema_eps,
        )

    def encode(self, x: jax.Array, train: bool = False) -> jax.Array:
        """x [B,H,W,in] -> pre-quantisation latent h [B,H/f,W/f,embed_dim] (float32)."""
        return self.encoded(x, train)

    def quantize_latent(self, h: jax.Array, update_ema: bool = False) -> QuantizerOutput:
        """h [B,h,w,embed_dim] -> QuantizerOutput (straight-through quantised latent, loss, indices, usage...)."""
        return self.quantize(h, update_ema)

    def decode_code(self, quant: jax.Array, train: bool = False) -> jax.Array:
        """Already-quantised latent [B,h,w,embed_dim] -> image [B,H,W,out] (float32)."""
        return self.decoded(quant, train)

    def decode(self, h: jax.Array, train: bool = False) -> jax.Array:
        """Pre-quantisation latent h -> quantise (no EMA update) -> image [B,H,W,out] (float32)."""
        return self.decode_code(self.quantize(h, False).quantized, train)

    def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, QuantizerOutput]:
        """Returns (reconstruction [B,H,W,out], QuantizerOutput). With ema_codebook and train, pass
        mutable=['vq_stats'] to apply the EMA codebook update."""
        q = self.quantize(self.encode(x, train), train)
        return self.decode_code(q.quantized, train), q


_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _dtype(name: str) -> Dtype:
    if name not in _DTYPES:
        raise UserError(f"autoencoder dtype {name!r} is not one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def build_autoencoder(cfg: ml_collections.ConfigDict) -> nn.Module:
    """cfg fields: kind ('kl'|'vq'), in_channels, out_channels, resolution, ch, ch_mult, num_res_blocks,
    attn_resolutions, dropout, z_channels, double_z, embed_dim, n_embed, beta, ema_codebook, ema_decay, dtype.

    kind 'kl' requires double_z True (the encoder emits mean and log-variance) and ignores n_embed/beta/ema_*.
    kind 'vq' requires double_z False; its commitment loss is ||sg[z]-e||^2 + beta*||z-sg[e]||^2 (legacy_beta False).
    """
    common = dict(
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        resolution=cfg.resolution,
        ch=cfg.ch,
        ch_mult=tuple(cfg.ch_mult),
        num_res_blocks=cfg.num_res_blocks,
        attn_resolutions=tuple(cfg.attn_resolutions),
        dropout=cfg.dropout,
        z_channels=cfg.z_channels,
        embed_dim=cfg.embed_dim,
        dtype=_dtype(cfg.dtype),
    )
    if cfg.kind == "kl":
        if not cfg.double_z:
            raise UserError("autoencoder kind 'kl' needs double_z=True (the encoder outputs mean and log-variance)")
        return AutoencoderKL(**common)
    if cfg.kind == "vq":
        if cfg.double_z:
            raise UserError("autoencoder kind 'vq' needs double_z=False")
        return VQAutoencoder(
            **common,
            n_embed=cfg.n_embed,
            beta=cfg.beta,
            legacy_beta=False,
            ema_codebook=cfg.ema_codebook,
            ema_decay=cfg.ema_decay,
            ema_eps=EMA_EPS,
        )
    raise UserError(f"autoencoder kind must be 'kl' or 'vq', got {cfg.kind!r}")


def last_layer_path(kind: str) -> tuple[str, ...]:
    """Path inside variables['params'] of the decoder's last conv kernel [3,3,C,out] (adaptive GAN weight)."""
    if kind not in ("kl", "vq"):
        raise UserError(f"autoencoder kind must be 'kl' or 'vq', got {kind!r}")
    return ("decoder", "conv_out", "kernel")
