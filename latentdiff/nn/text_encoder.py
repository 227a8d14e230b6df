"""Conditioning encoders τ_θ (Rombach et al. 2022, §3.3 and App. E.2).

`TextEncoder`: one transformer for both text towers, token embedding + learned absolute positions, `depth` pre-norm
blocks (LayerNorm -> multi-head self-attention, num_heads × head_dim; LayerNorm -> FF ×mlp_ratio), final LayerNorm.
The towers differ only in what `variant` (= config.text_encoder.kind) sets:
  'bert'  the paper's BERT-style τ_θ (CompVis BERTEmbedder = x-transformers TransformerWrapper + Encoder; diffusers
          LDMBertModel): no bias on q/k/v, bidirectional, exact GELU, any attention_impl. No attention mask (the
          original attends to padding tokens too); its `to_logits` projection is never used for conditioning and is
          not part of this model.
  'clip'  the frozen CLIP text transformer of Stable Diffusion v1 (Radford et al. 2021; HF `CLIPTextModel`, last
          hidden state: no pooling, projection or layer skipping): biases on q/k/v/out, a *causal* mask (token i
          attends to tokens <= i; SD passes no padding mask, and padding after the end token cannot reach earlier
          positions), quick_gelu(x) = x·σ(1.702·x); num_heads · head_dim = width.

`ClassEmbedder`: one learned vector per class plus a last "null" row for classifier-free guidance, as a
length-1 context [B, 1, width] (CompVis ClassEmbedder for cross-attention class conditioning).

`NoCondition` (kind 'none'): no τ_θ at all — unconditional models (e.g. the super-resolution LDM, conditioned only
through concatenated inputs). Takes dummy labels [B] and returns context None (use unet.context_dim = 0 and
text_encoder.width = 0); it has no params.

Param names (latentdiff/convert/diffusers_text.py, diffusers_clip.py): token_emb, pos_emb, block_{i}/{norm1,
attn/{to_q,to_k,to_v,to_out}, norm2, fc1, fc2}, final_norm; ClassEmbedder: embedding.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from latentdiff.errors import UserError
from latentdiff.nn.attention import ATTENTION_IMPLS, CrossAttention, layer_norm
from latentdiff.nn.unet import DTYPES, check_fields

Dtype = Any

TEXT_KINDS = ("bert", "clip", "class", "none")
TRANSFORMER_KINDS = ("bert", "clip")  # the kinds TextEncoder serves (its `variant`)

TEXT_FIELDS = (
    "kind",
    "vocab_size",
    "max_length",
    "width",
    "depth",
    "num_heads",
    "head_dim",
    "mlp_ratio",
    "num_classes",
    "dtype",
    "remat",
    "attention_impl",
)


def text_encoder_fields(cfg: Mapping) -> dict:
    """config.text_encoder as a plain dict with exactly TEXT_FIELDS (ValueError naming missing or unknown ones; older
    workdirs' configs are migrated when read: latentdiff.config_utils.ADDED_FIELDS)."""
    return check_fields(dict(cfg.items()), TEXT_FIELDS, "text_encoder")


def quick_gelu(x: jax.Array) -> jax.Array:
    """x·σ(1.702·x), OpenAI CLIP's GELU approximation (HF 'quick_gelu')."""
    return x * jax.nn.sigmoid(1.702 * x)


class CausalSelfAttention(nn.Module):
    """CLIP's multi-head causal self-attention with biased q/k/v/out projections. [B, L, C] -> [B, L, C]."""

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


class TextBlock(nn.Module):
    """Pre-norm transformer block of a `variant` ('bert' or 'clip': module docstring). [B, L, C] -> [B, L, C]."""

    variant: str
    num_heads: int
    head_dim: int
    mlp_ratio: int
    dtype: Dtype
    attention_impl: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        dense = lambda n, name: nn.Dense(n, dtype=self.dtype, param_dtype=jnp.float32, name=name)
        if self.variant == "clip":
            attn = CausalSelfAttention(self.num_heads, self.head_dim, self.dtype, name="attn")
            activation = quick_gelu
        else:
            attn = CrossAttention(self.num_heads, self.head_dim, self.dtype, self.attention_impl, name="attn")
            activation = lambda h: nn.gelu(h, approximate=False)
        x = x + attn(layer_norm(x, "norm1"))
        h = activation(dense(c * self.mlp_ratio, "fc1")(layer_norm(x, "norm2")))
        return x + dense(c, "fc2")(h)


RematTextBlock = nn.remat(TextBlock)


class TextEncoder(nn.Module):
    """tokens [B, L] int (L <= max_length) -> embeddings [B, L, width] float32; `variant` 'bert' or 'clip'."""

    variant: str
    vocab_size: int
    max_length: int
    width: int
    depth: int
    num_heads: int
    head_dim: int
    mlp_ratio: int
    dtype: Dtype
    remat: bool
    attention_impl: str = "xla"  # latentdiff/nn/attention.py ATTENTION_IMPLS

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        if tokens.ndim != 2 or tokens.shape[1] > self.max_length:
            raise UserError(f"tokens must be [B, L] with L <= max_length={self.max_length}, got {tokens.shape}")
        if not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise UserError(f"tokens must be integer ids, got dtype {tokens.dtype}")
        emb_init = nn.initializers.normal(stddev=0.02)
        embed = lambda n, name: nn.Embed(n, self.width, embedding_init=emb_init, param_dtype=jnp.float32, name=name)
        x = (
            embed(self.vocab_size, "token_emb")(tokens)
            + embed(self.max_length, "pos_emb")(jnp.arange(tokens.shape[1]))[None]
        )
        x = x.astype(self.dtype)
        if self.is_initializing() or self.depth == 1:
            block_cls = RematTextBlock if self.remat else TextBlock
            for i in range(self.depth):
                block = block_cls(
                    self.variant,
                    self.num_heads,
                    self.head_dim,
                    self.mlp_ratio,
                    self.dtype,
                    self.attention_impl,
                    name=f"block_{i}",
                )
                x = block(x)
        else:
            x = self._scan_blocks(x)
        return layer_norm(x.astype(jnp.float32), "final_norm")

    def _scan_blocks(self, x: jax.Array) -> jax.Array:
        """The `depth` identical blocks as one `lax.scan` over their stacked params (block_{i} stay separate in the
        param tree, so checkpoints and converters see the same names). One block in the program instead of `depth`:
        the paper's 32-layer encoder compiles that much faster (the TPU pre-flight, bench/RESULTS.md), with the
        same maths; each step is rematerialised in the backward pass when `remat`."""
        params = self.variables["params"]
        stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *[params[f"block_{i}"] for i in range(self.depth)])
        block = TextBlock(
            self.variant, self.num_heads, self.head_dim, self.mlp_ratio, self.dtype, self.attention_impl, parent=None
        )

        def step(h: jax.Array, block_params: dict) -> tuple[jax.Array, None]:
            return block.apply({"params": block_params}, h), None

        if self.remat:
            step = jax.checkpoint(step)
        return jax.lax.scan(step, x, stacked)[0]


class ClassEmbedder(nn.Module):
    """labels [B] int in [0, num_classes] (num_classes = the null class) -> context [B, 1, width] float32."""

    num_classes: int
    width: int

    @nn.compact
    def __call__(self, labels: jax.Array) -> jax.Array:
        if labels.ndim != 1 or not jnp.issubdtype(labels.dtype, jnp.integer):
            raise UserError(f"class labels must be integers of shape [B], got {labels.shape} {labels.dtype}")
        table = nn.Embed(self.num_classes + 1, self.width, param_dtype=jnp.float32, name="embedding")
        return table(labels)[:, None, :]


class NoCondition(nn.Module):
    """kind 'none': any input [B, ...] -> None (no context; the UNet must have context_dim 0). No params."""

    @nn.compact
    def __call__(self, labels: jax.Array) -> None:
        del labels
        return None


def build_text_encoder(cfg: Mapping) -> TextEncoder | ClassEmbedder | NoCondition:
    """TextEncoder (kinds 'bert' and 'clip'), ClassEmbedder ('class') or NoCondition ('none') from exactly
    TEXT_FIELDS."""
    c = text_encoder_fields(cfg)
    if c["attention_impl"] not in ATTENTION_IMPLS:
        raise UserError(f"text_encoder.attention_impl must be one of {ATTENTION_IMPLS}, got {c['attention_impl']!r}")
    if c["kind"] != "bert" and c["attention_impl"] != "xla":
        raise UserError(
            f"text_encoder.attention_impl={c['attention_impl']!r} applies to kind 'bert' only; use 'xla' for "
            f"kind {c['kind']!r}"
        )
    if c["kind"] == "none":
        if int(c["width"]) != 0:
            raise UserError("text_encoder.kind='none' needs text_encoder.width=0 (and unet.context_dim=0)")
        return NoCondition()
    if c["kind"] == "class":
        if c["num_classes"] < 1 or c["width"] < 1:
            raise UserError("text_encoder.kind='class' needs text_encoder.num_classes >= 1 and width >= 1")
        return ClassEmbedder(num_classes=int(c["num_classes"]), width=int(c["width"]))
    if c["kind"] not in TEXT_KINDS:
        raise UserError(
            f"text_encoder.kind must be 'bert' or 'class' (or 'none': no conditioning; 'clip': Stable Diffusion's "
            f"text model), got {c['kind']!r}"
        )
    if c["dtype"] not in DTYPES:
        raise UserError(f"text_encoder.dtype must be one of {tuple(DTYPES)}, got {c['dtype']!r}")
    for f in ("vocab_size", "max_length", "width", "depth", "num_heads", "head_dim", "mlp_ratio"):
        if int(c[f]) < 1:
            raise UserError(f"text_encoder.{f} must be >= 1, got {c[f]}")
    if c["kind"] == "clip" and int(c["num_heads"]) * int(c["head_dim"]) != int(c["width"]):
        raise UserError(
            f"text_encoder.kind='clip' needs num_heads * head_dim == width, got {c['num_heads']} * {c['head_dim']} "
            f"!= {c['width']}"
        )
    return TextEncoder(
        variant=str(c["kind"]),
        attention_impl=str(c["attention_impl"]),
        vocab_size=int(c["vocab_size"]),
        max_length=int(c["max_length"]),
        width=int(c["width"]),
        depth=int(c["depth"]),
        num_heads=int(c["num_heads"]),
        head_dim=int(c["head_dim"]),
        mlp_ratio=int(c["mlp_ratio"]),
        dtype=DTYPES[c["dtype"]],
        remat=bool(c["remat"]),
    )


def null_label(cfg: Mapping) -> int:
    """The unconditional label for classifier-free guidance of a kind='class' encoder (the extra last row)."""
    if cfg["kind"] != "class":
        raise UserError(
            f"null_label needs text_encoder.kind='class' (got {cfg['kind']!r}); for text use the empty caption"
        )
    return int(cfg["num_classes"])


def init_tokens(cfg: Mapping, batch: int) -> jax.Array:
    """Dummy input for init / jax.eval_shape: int tokens [B, max_length] (kind 'bert') or labels [B] (kind 'class',
    and the dummy labels of kind 'none')."""
    if cfg["kind"] in ("class", "none"):
        return jnp.zeros((batch,), jnp.int32)
    return jnp.zeros((batch, int(cfg["max_length"])), jnp.int32)
