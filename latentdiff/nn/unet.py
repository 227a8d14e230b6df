"""The LDM denoiser ε_θ(z_t, t, τ_θ(y)): the openaimodel UNet with spatial transformers (Rombach et al. 2022, §3.3).

NHWC throughout. Structure as in CompVis ldm/modules/diffusionmodules/openaimodel.py (= diffusers
UNet2DConditionModel with CrossAttnDownBlock2D/DownBlock2D/UNetMidBlock2DCrossAttn/CrossAttnUpBlock2D/UpBlock2D):

  t -> sinusoidal embedding (cos first, max period 1e4) -> Dense(4·mc) -> SiLU -> Dense(4·mc)  [+ label embedding]
  conv_in; per level l (channels mc·channel_mult[l], downsampling factor ds = 2**l):
    num_res_blocks × (ResBlock [+ SpatialTransformer if ds in attention_resolutions]), then a stride-2 conv
    (except at the last level); middle: ResBlock, SpatialTransformer, ResBlock;
  up levels in reverse: num_res_blocks+1 × (concat skip, ResBlock [+ SpatialTransformer]), nearest ×2 + conv
    (except at level 0); GroupNorm, SiLU, conv_out.

Param names (used by latentdiff/convert/diffusers_unet.py): time_embed_0/1, label_emb, conv_in,
down_{l}_res_{j}, down_{l}_attn_{j}, down_{l}_down, mid_res_0, mid_attn, mid_res_1, up_{l}_res_{j}, up_{l}_attn_{j},
up_{l}_up, out_norm, conv_out, where l is the channel_mult index also on the way up.
ResBlock GroupNorms use eps 1e-5 (openaimodel GroupNorm32, diffusers norm_eps), the transformer's GroupNorm 1e-6.
As in the original, the last conv of every ResBlock, proj_out of every transformer and conv_out start at zero.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from latentdiff.errors import UserError
from latentdiff.nn.attention import ATTENTION_IMPLS, SpatialTransformer
from latentdiff.nn.norms import GroupNorm

Dtype = Any

UNET_FIELDS = (
    "in_channels",
    "out_channels",
    "model_channels",
    "channel_mult",
    "num_res_blocks",
    "attention_resolutions",
    "num_heads",
    "num_head_channels",
    "transformer_depth",
    "context_dim",
    "num_classes",
    "dropout",
    "use_linear_proj",
    "dtype",
    "remat",
    "attention_impl",
)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding [cos(t·f), sin(t·f)], f_i = max_period^(-i/half). t [B] (int or float) -> [B, dim] f32.

    Equals CompVis `timestep_embedding` and diffusers `Timesteps(dim, flip_sin_to_cos=True, freq_shift=0)`.
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def _conv(features: int, kernel: int, dtype: Dtype, name: str, stride: int = 1, zero: bool = False) -> nn.Conv:
    """A conv with PyTorch-style symmetric padding kernel // 2."""
    pad = kernel // 2
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=nn.initializers.zeros if zero else nn.initializers.lecun_normal(),
        name=name,
    )


def _group_norm(x: jax.Array, name: str, activation: str) -> jax.Array:
    """GroupNorm(32, eps 1e-5) [+ SiLU when activation='silu'] in float32, cast back to x.dtype, with the closed-form
    backward of latentdiff/nn/norms.py (params 'scale'/'bias' as flax GroupNorm). [B, H, W, C] -> [B, H, W, C]."""
    norm = GroupNorm(
        num_groups=32, epsilon=1e-5, dtype=jnp.float32, param_dtype=jnp.float32, activation=activation, name=name
    )
    return norm(x).astype(x.dtype)


class ResBlock(nn.Module):
    """norm-SiLU-conv3x3, + Dense(SiLU(emb)), norm-SiLU-dropout-conv3x3, + (1x1 conv) skip. [B,H,W,Cin] -> [B,H,W,C]."""

    out_channels: int
    dropout: float
    dtype: Dtype

    @nn.compact
    def __call__(self, x: jax.Array, emb: jax.Array, train: bool) -> jax.Array:
        h = _conv(self.out_channels, 3, self.dtype, "conv1")(_group_norm(x, "norm1", "silu"))
        e = nn.Dense(self.out_channels, dtype=self.dtype, param_dtype=jnp.float32, name="time_proj")(nn.silu(emb))
        h = h + e[:, None, None, :]
        h = _group_norm(h, "norm2", "silu")
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = _conv(self.out_channels, 3, self.dtype, "conv2", zero=True)(h)
        if x.shape[-1] != self.out_channels:
            x = _conv(self.out_channels, 1, self.dtype, "skip")(x)
        return x + h


RematResBlock = nn.remat(ResBlock, static_argnums=(3,))  # argnum 3 = `train` (flax counts self as 0)


def heads_for(channels: int, num_heads: int, num_head_channels: int) -> tuple[int, int]:
    """(heads, head_dim) of a transformer with `channels` channels (openaimodel rule, legacy=True)."""
    if num_head_channels == -1:
        return num_heads, channels // num_heads
    return channels // num_head_channels, num_head_channels


class UNet(nn.Module):
    """ε_θ(x, t, context, y). x [B, H, W, in_channels], t [B], context [B, L, context_dim] | None, y [B] | None
    -> [B, H, W, out_channels] float32. H and W must be divisible by 2**(len(channel_mult) - 1).

    Concat conditioning: in_channels > out_channels, the caller concatenates the condition to x.
    Class conditioning (num_classes > 0): a label embedding is added to the time embedding.
    context_dim 0: no cross-attention (the transformers' second attention attends to the image tokens).
    """

    in_channels: int
    out_channels: int
    model_channels: int
    channel_mult: tuple[int, ...]
    num_res_blocks: int
    attention_resolutions: tuple[int, ...]
    num_heads: int
    num_head_channels: int
    transformer_depth: int
    context_dim: int
    num_classes: int
    dropout: float
    use_linear_proj: bool
    dtype: Dtype
    remat: bool
    attention_impl: str

    def _check_inputs(self, x: jax.Array, t: jax.Array, context: jax.Array | None, y: jax.Array | None) -> None:
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            raise UserError(f"UNet input must be [B, H, W, {self.in_channels}] (in_channels), got {x.shape}")
        factor = 2 ** (len(self.channel_mult) - 1)
        if x.shape[1] % factor or x.shape[2] % factor:
            raise UserError(
                f"UNet input spatial size {x.shape[1:3]} must be divisible by {factor} = 2**(len(channel_mult)-1)"
            )
        if t.shape != (x.shape[0],):
            raise UserError(f"timesteps must have shape [B] = ({x.shape[0]},), got {t.shape}")
        if self.context_dim > 0:
            if context is None:
                raise UserError(f"this UNet has context_dim={self.context_dim}: pass context [B, L, context_dim]")
            if context.ndim != 3 or context.shape[0] != x.shape[0] or context.shape[-1] != self.context_dim:
                raise UserError(
                    f"context must be [B={x.shape[0]}, L, context_dim={self.context_dim}], got {context.shape}; "
                    "the text encoder width must equal the UNet's context_dim"
                )
        elif context is not None:
            raise UserError("this UNet has context_dim=0 (no cross-attention) but a context was passed")
        if self.num_classes > 0 and (y is None or y.shape != (x.shape[0],)):
            raise UserError(f"this UNet has num_classes={self.num_classes}: pass integer labels y of shape [B]")
        if self.num_classes == 0 and y is not None:
            raise UserError("this UNet has num_classes=0 but class labels y were passed")

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        t: jax.Array,
        context: jax.Array | None = None,
        y: jax.Array | None = None,
        train: bool = False,
    ) -> jax.Array:
        t = jnp.asarray(t)
        if t.ndim == 0:
            t = jnp.broadcast_to(t, (x.shape[0],))
        self._check_inputs(x, t, context, y)
        mc, dt = self.model_channels, self.dtype
        dense = lambda n, name: nn.Dense(n, dtype=dt, param_dtype=jnp.float32, name=name)
        emb = dense(4 * mc, "time_embed_0")(timestep_embedding(t, mc))
        emb = dense(4 * mc, "time_embed_1")(nn.silu(emb))
        if self.num_classes > 0:
            emb = emb + nn.Embed(self.num_classes, 4 * mc, dtype=dt, param_dtype=jnp.float32, name="label_emb")(y)

        res_cls = RematResBlock if self.remat else ResBlock

        def res(h: jax.Array, ch: int, name: str) -> jax.Array:
            return res_cls(ch, self.dropout, dt, name=name)(h, emb, train)

        def transformer(h: jax.Array, name: str) -> jax.Array:
            heads, head_dim = heads_for(h.shape[-1], self.num_heads, self.num_head_channels)
            st = SpatialTransformer(
                heads, head_dim, self.transformer_depth, dt, self.attention_impl, self.remat, name=name
            )
            return st(h, context)

        h = _conv(mc, 3, dt, "conv_in")(x.astype(dt))
        skips = [h]
        levels = len(self.channel_mult)
        for level, mult in enumerate(self.channel_mult):
            attn = 2**level in self.attention_resolutions
            for j in range(self.num_res_blocks):
                h = res(h, mult * mc, f"down_{level}_res_{j}")
                if attn:
                    h = transformer(h, f"down_{level}_attn_{j}")
                skips.append(h)
            if level != levels - 1:
                h = _conv(h.shape[-1], 3, dt, f"down_{level}_down", stride=2)(h)
                skips.append(h)

        h = res(h, h.shape[-1], "mid_res_0")
        h = transformer(h, "mid_attn")
        h = res(h, h.shape[-1], "mid_res_1")

        for level in reversed(range(levels)):
            attn = 2**level in self.attention_resolutions
            for j in range(self.num_res_blocks + 1):
                h = jnp.concatenate([h, skips.pop()], axis=-1)
                h = res(h, self.channel_mult[level] * mc, f"up_{level}_res_{j}")
                if attn:
                    h = transformer(h, f"up_{level}_attn_{j}")
            if level != 0:
                h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)
                h = _conv(h.shape[-1], 3, dt, f"up_{level}_up")(h)

        h = _group_norm(h, "out_norm", "silu")
        return _conv(self.out_channels, 3, dt, "conv_out", zero=True)(h).astype(jnp.float32)


def check_fields(cfg: Mapping, fields: tuple[str, ...], what: str) -> dict:
    """cfg (ConfigDict or dict) -> plain dict; ValueError naming missing or unknown fields."""
    got = dict(cfg.items())
    missing = [f for f in fields if f not in got]
    unknown = sorted(set(got) - set(fields))
    if missing or unknown:
        raise UserError(f"{what} config: missing fields {missing}, unknown fields {unknown}; expected exactly {fields}")
    return got


def _check_unet_config(c: dict) -> None:
    mc, mults = c["model_channels"], tuple(c["channel_mult"])
    if c["dtype"] not in DTYPES:
        raise UserError(f"unet.dtype must be one of {tuple(DTYPES)}, got {c['dtype']!r}")
    if c["attention_impl"] not in ATTENTION_IMPLS:
        raise UserError(f"unet.attention_impl must be one of {ATTENTION_IMPLS}, got {c['attention_impl']!r}")
    if c["attention_impl"] == "cudnn" and c["dtype"] != "bfloat16":
        raise UserError("unet.attention_impl='cudnn' needs unet.dtype='bfloat16' (cuDNN flash attention is bf16/fp16)")
    bad = [mc * m for m in mults if (mc * m) % 32]
    if bad:
        raise UserError(f"unet channels {bad} (model_channels × channel_mult) must be multiples of 32 (GroupNorm(32))")
    if (c["num_heads"] == -1) == (c["num_head_channels"] == -1):
        raise UserError(
            "set exactly one of unet.num_heads / unet.num_head_channels and the other to -1, got "
            f"num_heads={c['num_heads']}, num_head_channels={c['num_head_channels']}"
        )
    for m in mults:
        ch = mc * m
        div = c["num_heads"] if c["num_head_channels"] == -1 else c["num_head_channels"]
        if div <= 0 or ch % div:
            raise UserError(
                f"unet channels {ch} not divisible by num_heads={c['num_heads']} / "
                f"num_head_channels={c['num_head_channels']}"
            )
    if c["context_dim"] < 0 or c["num_classes"] < 0:
        raise UserError("unet.context_dim and unet.num_classes must be >= 0 (0 = off)")
    if c["in_channels"] < 1 or c["out_channels"] < 1 or c["num_res_blocks"] < 1 or c["transformer_depth"] < 1:
        raise UserError("unet.in_channels, out_channels, num_res_blocks and transformer_depth must be >= 1")


def build_unet(cfg: Mapping) -> UNet:
    """UNet from a config with exactly the fields UNET_FIELDS (dtype as 'float32' | 'bfloat16')."""
    c = check_fields(cfg, UNET_FIELDS, "unet")
    _check_unet_config(c)
    return UNet(
        in_channels=int(c["in_channels"]),
        out_channels=int(c["out_channels"]),
        model_channels=int(c["model_channels"]),
        channel_mult=tuple(int(m) for m in c["channel_mult"]),
        num_res_blocks=int(c["num_res_blocks"]),
        attention_resolutions=tuple(int(r) for r in c["attention_resolutions"]),
        num_heads=int(c["num_heads"]),
        num_head_channels=int(c["num_head_channels"]),
        transformer_depth=int(c["transformer_depth"]),
        context_dim=int(c["context_dim"]),
        num_classes=int(c["num_classes"]),
        dropout=float(c["dropout"]),
        use_linear_proj=bool(c["use_linear_proj"]),
        dtype=DTYPES[c["dtype"]],
        remat=bool(c["remat"]),
        attention_impl=str(c["attention_impl"]),
    )


def init_inputs(cfg: Mapping, batch: int, size: int, context_len: int) -> dict[str, jax.Array]:
    """Dummy inputs for `UNet.init` / `jax.eval_shape`: {'x', 't', 'context', 'y'} shaped for this config."""
    c = check_fields(cfg, UNET_FIELDS, "unet")
    return {
        "x": jnp.zeros((batch, size, size, c["in_channels"]), jnp.float32),
        "t": jnp.zeros((batch,), jnp.int32),
        "context": jnp.zeros((batch, context_len, c["context_dim"]), jnp.float32) if c["context_dim"] else None,
        "y": jnp.zeros((batch,), jnp.int32) if c["num_classes"] else None,
    }


def validate_context(unet_cfg: Mapping, text_cfg: Mapping | None) -> None:
    """ValueError unless the conditioning encoder's output width equals unet.context_dim.

    text_cfg None means no conditioning encoder (then unet.context_dim must be 0).
    """
    context_dim = int(unet_cfg["context_dim"])
    if text_cfg is None:
        if context_dim:
            raise UserError(
                f"unet.context_dim={context_dim} but there is no text encoder (text_encoder config is None); "
                "set unet.context_dim=0 or configure a text encoder with width == unet.context_dim"
            )
        return
    width = int(text_cfg["width"])
    if context_dim != width:
        raise UserError(
            f"unet.context_dim={context_dim} != text_encoder.width={width}: cross-attention keys come from the "
            "text encoder output, set both to the same value"
        )
