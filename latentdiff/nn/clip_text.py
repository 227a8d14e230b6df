"""The frozen CLIP text transformer Stable Diffusion v1 conditions on (Radford et al. 2021; HF `CLIPTextModel`).

tokens [B, L] -> last hidden state [B, L, width] (after the final LayerNorm), as SD v1 uses it (no pooling, no
projection, no layer skipping). Structure:
  token embedding + learned absolute positions; `depth` pre-norm blocks:
    x + out(MHA(LN1(x))) with a *causal* mask (token i attends to tokens <= i) and biases on q, k, v and out;
    x + fc2(quick_gelu(fc1(LN2(x)))), quick_gelu(x) = x·σ(1.702·x);
  final LayerNorm. LayerNorm eps 1e-5. No padding mask (SD passes none; padding comes after the end token and the
  causal mask keeps it from affecting earlier positions).

Param names (latentdiff/convert/diffusers_clip.py): token_emb, pos_emb, block_{i}/{norm1, attn/{to_q, to_k, to_v,
to_out}, norm2, fc1, fc2}, final_norm.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from latentdiff.errors import UserError
from latentdiff.nn.attention import layer_norm

Dtype = Any


def quick_gelu(x: jax.Array) -> jax.Array:
    """x·σ(1.702·x), OpenAI CLIP's GELU approximation (HF 'quick_gelu')."""
    return x * jax.nn.sigmoid(1.702 * x)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with biased q/k/v/out projections. [B, L, C] -> [B, L, C]."""

    num_heads: int
    head_dim: int
    dtype: Dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, c = x.shape
        inner = self.num_heads * self.head_dim
        dense = lambda f, name: nn.Dense(f, dtype=self.dtype, param_dtype=jnp.float32, name=name)
        split = lambda t: t.reshape(b, n, self.num_heads, self.head_dim)
        q, k, v = (split(dense(inner, name)(x)) for name in ("to_q", "to_k", "to_v"))
        out = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
        return dense(c, "to_out")(out.reshape(b, n, inner))


class CLIPBlock(nn.Module):
    """Pre-norm CLIP encoder layer. [B, L, C] -> [B, L, C]."""

    num_heads: int
    head_dim: int
    mlp_ratio: int
    dtype: Dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        dense = lambda f, name: nn.Dense(f, dtype=self.dtype, param_dtype=jnp.float32, name=name)
        x = x + CausalSelfAttention(self.num_heads, self.head_dim, self.dtype, name="attn")(layer_norm(x, "norm1"))
        h = quick_gelu(dense(c * self.mlp_ratio, "fc1")(layer_norm(x, "norm2")))
        return x + dense(c, "fc2")(h)


RematCLIPBlock = nn.remat(CLIPBlock)


class CLIPTextEncoder(nn.Module):
    """tokens [B, L] int (L <= max_length) -> embeddings [B, L, width] float32."""

    vocab_size: int
    max_length: int
    width: int
    depth: int
    num_heads: int
    head_dim: int
    mlp_ratio: int
    dtype: Dtype
    remat: bool

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        if tokens.ndim != 2 or tokens.shape[1] > self.max_length:
            raise UserError(f"tokens must be [B, L] with L <= max_length={self.max_length}, got {tokens.shape}")
        if not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise UserError(f"tokens must be integer ids, got dtype {tokens.dtype}")
        emb_init = nn.initializers.normal(stddev=0.02)
        embed = lambda n, name: nn.Embed(n, self.width, embedding_init=emb_init, param_dtype=jnp.float32, name=name)
        x = embed(self.vocab_size, "token_emb")(tokens) + embed(self.max_length, "pos_emb")(jnp.arange(tokens.shape[1]))
        x = x.astype(self.dtype)
        block_cls = RematCLIPBlock if self.remat else CLIPBlock
        for i in range(self.depth):
            x = block_cls(self.num_heads, self.head_dim, self.mlp_ratio, self.dtype, name=f"block_{i}")(x)
        return layer_norm(x.astype(jnp.float32), "final_norm")
