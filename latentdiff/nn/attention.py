"""Attention modules of the LDM denoiser and text encoder (Rombach et al. 2022, §3.3; CompVis ldm/modules/attention.py).

Layout: tokens [B, L, C], images NHWC [B, H, W, C]. Heads go through `jax.nn.dot_product_attention` in the
[B, L, N, H] layout, so `attention_impl='cudnn'` selects cuDNN flash attention on GPU (bf16/fp16 only; for the
sequence lengths it supports, see `kernel_for`) and `'xla'` the portable path. `'pallas_tpu'` runs JAX's Pallas TPU
flash-attention kernel (`jax.experimental.pallas.ops.tpu.flash_attention`, forward and backward never materialise
the [T, S] logits in HBM) for every sequence length: lengths that are not multiples of its 128-wide tiles are padded
and the padding masked by segment ids. All three compute the logits and the softmax in float32.

Param names mirror the PyTorch modules (to_q/to_k/to_v/to_out, norm1..3, ff/proj, ff/out, proj_in/proj_out) so the
converters in latentdiff/convert/ are plain tables. Mixed precision: `dtype` is the compute dtype, params stay
float32, normalisation runs in float32.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from latentdiff.errors import UserError

Dtype = Any

ATTENTION_IMPLS = ("xla", "cudnn", "pallas_tpu")
# cuDNN's fused attention rejects some sequence lengths in its backward pass (measured on an H100, JAX 0.10: the
# UNet's cross-attention, Q 1024 / KV 77, fails with "Unsupported sequence length"). Shapes whose query and key
# lengths are both multiples of this run on cuDNN; the rest (text tokens, 4x4 feature maps) take the XLA path, which
# computes the same function.
CUDNN_SEQ_MULTIPLE = 64
# The Pallas TPU flash-attention kernel tiles both sequence axes by this many tokens (its default block sizes); the
# key axis must be a multiple of the tile, the query axis is padded to one here as well.
PALLAS_TILE = 128


def kernel_for(implementation: str, query_len: int, key_len: int) -> str:
    """The jax.nn.dot_product_attention implementation used for these sequence lengths ('xla' or 'cudnn')."""
    if implementation == "cudnn" and query_len % CUDNN_SEQ_MULTIPLE == 0 and key_len % CUDNN_SEQ_MULTIPLE == 0:
        return "cudnn"
    return "xla"


def attention(q: jax.Array, k: jax.Array, v: jax.Array, implementation: str) -> jax.Array:
    """softmax(q·kᵀ/√H)·v per head. q [B, T, N, H], k/v [B, S, N, H] -> [B, T, N, H] (softmax in float32)."""
    if implementation not in ATTENTION_IMPLS:
        raise UserError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {implementation!r}")
    if implementation == "cudnn" and q.dtype not in (jnp.bfloat16, jnp.float16):
        raise UserError(
            f"attention_impl='cudnn' needs bfloat16/float16 activations, got {q.dtype}; set dtype='bfloat16'"
        )
    if implementation == "cudnn" and jax.default_backend() != "gpu":
        raise UserError(
            f"attention_impl='cudnn' needs a CUDA GPU, the JAX backend is {jax.default_backend()!r}; use 'xla'"
        )
    if implementation == "pallas_tpu":
        return pallas_tpu_attention(q, k, v)
    return jax.nn.dot_product_attention(q, k, v, implementation=kernel_for(implementation, q.shape[1], k.shape[1]))


def _pad_axis1(x: jax.Array, multiple: int) -> jax.Array:
    pad = -x.shape[1] % multiple
    return jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)) if pad else x


def pallas_tpu_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """softmax(q·kᵀ/√H)·v by the Pallas TPU flash-attention kernel. q [B, T, N, H], k/v [B, S, N, H] -> [B, T, N, H].

    Compiles for TPU (the pre-flight compiles it for Cloud TPU topologies on a CPU host); on other backends only
    inside `jax.experimental.pallas.tpu.force_tpu_interpret_mode()` (the tests). XLA cannot partition a Mosaic
    kernel, so under a mesh context (`parallel.under_mesh`, which the train step and the sampler enter) the kernel
    runs in a `shard_map` over the batch axes ('data', 'fsdp'), each device on its share of the batch; a batch the
    axes cannot split (the sampler's single null condition) goes through XLA's attention instead. T and S are padded
    to multiples of PALLAS_TILE; padded keys get segment id 0 and every query 1, so no query attends to padding
    (padded query rows are computed and dropped). The kernel keeps the softmax in float32 whatever the input dtype.
    """
    mesh = jax.sharding.get_abstract_mesh()
    batch_axes = tuple(a for a in ("data", "fsdp") if not mesh.empty and a in mesh.axis_names and mesh.shape[a] > 1)
    shards = math.prod(mesh.shape[a] for a in batch_axes)
    if shards > 1 and q.shape[0] % shards == 0:
        # A Mosaic kernel is not partitioned by XLA: run it per device on its share of the batch.
        spec = P(batch_axes)
        kernel = jax.shard_map(_pallas_flash, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)
        return kernel(q, k, v)
    if shards > 1:  # a batch the mesh cannot split (e.g. the single null condition): the same maths through XLA
        return jax.nn.dot_product_attention(q, k, v, implementation="xla")
    return _pallas_flash(q, k, v)


def _pallas_flash(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """The Pallas flash-attention call on one device's arrays (see pallas_tpu_attention)."""
    from jax.experimental.pallas.ops.tpu import flash_attention as pallas_flash

    b, t, _, h = q.shape
    s = k.shape[1]
    qp, kp, vp = (_pad_axis1(x, PALLAS_TILE).transpose(0, 2, 1, 3) for x in (q, k, v))  # [B, N, L, H]
    segments = None
    if qp.shape[2] != t or kp.shape[2] != s:
        q_ids = jnp.ones((qp.shape[2],), jnp.int32)  # padded queries see the real keys too: no empty softmax rows
        kv_ids = (jnp.arange(kp.shape[2]) < s).astype(jnp.int32)
        segments = pallas_flash.SegmentIds(
            q=jnp.broadcast_to(q_ids, (b, qp.shape[2])), kv=jnp.broadcast_to(kv_ids, (b, kp.shape[2]))
        )
    out = pallas_flash.flash_attention(qp, kp, vp, segment_ids=segments, sm_scale=float(h) ** -0.5)
    return out.transpose(0, 2, 1, 3)[:, :t]


def _dense(features: int, dtype: Dtype, name: str, use_bias: bool = True) -> nn.Dense:
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, name=name)


def layer_norm(x: jax.Array, name: str) -> jax.Array:
    """LayerNorm (eps 1e-5, PyTorch default) computed in float32, cast back to x.dtype. [..., C] -> [..., C]."""
    return nn.LayerNorm(epsilon=1e-5, dtype=jnp.float32, param_dtype=jnp.float32, name=name)(x).astype(x.dtype)


class CrossAttention(nn.Module):
    """Multi-head attention of x to context (self-attention when context is None). [B, T, C] -> [B, T, C].

    q/k/v projections have no bias, the output projection has one (CompVis CrossAttention, diffusers Attention,
    LDMBertAttention all agree).
    """

    num_heads: int
    head_dim: int
    dtype: Dtype
    attention_impl: str

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        context = x if context is None else context
        inner = self.num_heads * self.head_dim
        b, t, c = x.shape
        s = context.shape[1]
        q = _dense(inner, self.dtype, "to_q", use_bias=False)(x).reshape(b, t, self.num_heads, self.head_dim)
        k = _dense(inner, self.dtype, "to_k", use_bias=False)(context).reshape(b, s, self.num_heads, self.head_dim)
        v = _dense(inner, self.dtype, "to_v", use_bias=False)(context).reshape(b, s, self.num_heads, self.head_dim)
        out = attention(q, k, v, self.attention_impl).reshape(b, t, inner)
        return _dense(c, self.dtype, "to_out")(out)


class GEGLUFeedForward(nn.Module):
    """GEGLU feed-forward (Shazeer 2020): proj to 2·mult·C, a·gelu(g), back to C. [B, T, C] -> [B, T, C].

    The first half of `proj`'s output is the value, the second the gate (as torch.chunk in CompVis/diffusers);
    gelu is exact (erf).
    """

    mult: int
    dtype: Dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        inner = c * self.mult
        a, gate = jnp.split(_dense(2 * inner, self.dtype, "proj")(x), 2, axis=-1)
        return _dense(c, self.dtype, "out")(a * nn.gelu(gate, approximate=False))


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention to context, GEGLU FF ×4, each residual. [B, T, C] -> [B, T, C].

    With context None the second attention attends to x itself (CompVis `default(context, x)`).
    """

    num_heads: int
    head_dim: int
    dtype: Dtype
    attention_impl: str

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None) -> jax.Array:
        attn = lambda name: CrossAttention(self.num_heads, self.head_dim, self.dtype, self.attention_impl, name=name)
        x = x + attn("attn1")(layer_norm(x, "norm1"))
        x = x + attn("attn2")(layer_norm(x, "norm2"), context)
        return x + GEGLUFeedForward(mult=4, dtype=self.dtype, name="ff")(layer_norm(x, "norm3"))


RematBasicTransformerBlock = nn.remat(BasicTransformerBlock)


class SpatialTransformer(nn.Module):
    """GroupNorm(32, eps 1e-6), proj_in, `depth` transformer blocks over the H·W tokens, proj_out, residual.

    [B, H, W, C], context [B, L, D] or None -> [B, H, W, C]. proj_in/proj_out are per-pixel linear maps: the 1x1
    convs of CompVis and the Linear layers of `use_linear_proj` models are the same function here (the flag only
    changes the checkpoint layout, handled by the converters). proj_out starts at zero (CompVis zero_module).
    """

    num_heads: int
    head_dim: int
    depth: int
    dtype: Dtype
    attention_impl: str
    remat: bool

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None) -> jax.Array:
        b, h, w, c = x.shape
        inner = self.num_heads * self.head_dim
        y = nn.GroupNorm(num_groups=32, epsilon=1e-6, dtype=jnp.float32, param_dtype=jnp.float32, name="norm")(x)
        y = _dense(inner, self.dtype, "proj_in")(y.astype(self.dtype)).reshape(b, h * w, inner)
        block_cls = RematBasicTransformerBlock if self.remat else BasicTransformerBlock
        for d in range(self.depth):
            y = block_cls(self.num_heads, self.head_dim, self.dtype, self.attention_impl, name=f"block_{d}")(y, context)
        y = nn.Dense(c, dtype=self.dtype, param_dtype=jnp.float32, kernel_init=nn.initializers.zeros, name="proj_out")(
            y
        )
        return x + y.reshape(b, h, w, c)
