"""Vector quantiser of VQ-VAE / VQGAN (van den Oord et al. 2017; Esser et al. 2021), as used by LDM's VQ-f autoencoders.

Nearest codebook entry by Euclidean distance, straight-through gradients, and the loss

    loss = ||sg[z] - e||^2 + beta * ||z - sg[e]||^2        (codebook term + beta * commitment term; means)

which is the VQ-VAE paper's convention (`legacy_beta=False`). CompVis taming/LDM and diffusers default to the
"legacy" convention, which by an old bug puts beta on the *codebook* term instead:
``||sg[e] - z||^2 + beta * ||e - sg[z]||^2`` (`legacy_beta=True` reproduces it exactly).

With `use_ema` the codebook is not learned by gradients but by exponential moving averages of the assigned encoder
outputs (VQ-VAE-2, App. A.1): the codebook and its statistics live in the 'vq_stats' collection (not 'params') and are
updated when `update_ema` is True and 'vq_stats' is mutable; the loss is then only beta * commitment.
"""

from __future__ import annotations

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from latentdiff.errors import UserError

STATS = "vq_stats"


@flax.struct.dataclass
class QuantizerOutput:
    """quantized: [..., D] straight-through quantised latent (forward = codebook entry, gradient = identity to z);
    loss: scalar; indices: [...] int32 code ids; perplexity: scalar exp(entropy of code frequencies in the batch);
    usage: scalar fraction of the codebook used in the batch."""

    quantized: jax.Array
    loss: jax.Array
    indices: jax.Array
    perplexity: jax.Array
    usage: jax.Array


def nearest_code(z: jax.Array, codebook: jax.Array) -> jax.Array:
    """z [N, D], codebook [K, D] -> argmin_k ||z - e_k||^2 as int32 [N] (computed in float32)."""
    z = z.astype(jnp.float32)
    codebook = codebook.astype(jnp.float32)
    d = (
        jnp.sum(jnp.square(z), axis=1, keepdims=True)
        - 2.0 * z @ codebook.T
        + jnp.sum(jnp.square(codebook), axis=1)[None, :]
    )
    return jnp.argmin(d, axis=1).astype(jnp.int32)


def _codebook_init(n_embed: int):
    """diffusers / taming init: U(-1/K, 1/K)."""

    def init(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        return jax.random.uniform(key, shape, jnp.float32, -1.0 / n_embed, 1.0 / n_embed)

    return init


class VectorQuantizer(nn.Module):
    """z [..., D] -> QuantizerOutput. Codebook [n_embed, D] at params/embedding, or vq_stats/embedding with use_ema."""

    n_embed: int
    embed_dim: int
    beta: float
    legacy_beta: bool
    use_ema: bool
    ema_decay: float
    ema_eps: float

    def _codebook(self) -> jax.Array:
        init = _codebook_init(self.n_embed)
        shape = (self.n_embed, self.embed_dim)
        if not self.use_ema:
            return self.param("embedding", init, shape)
        embedding = self.variable(STATS, "embedding", lambda: init(self.make_rng("params"), shape))
        # cluster_size starts at 1 and embed_sum at the codebook so that embed_sum / cluster_size = codebook at step 0.
        self.variable(STATS, "cluster_size", lambda: jnp.ones((self.n_embed,), jnp.float32))
        self.variable(STATS, "embed_sum", lambda: embedding.value)
        return embedding.value

    def _ema_update(self, flat_z: jax.Array, indices: jax.Array, counts: jax.Array) -> None:
        cluster = self.get_variable(STATS, "cluster_size")
        embed_sum = self.get_variable(STATS, "embed_sum")
        d = self.ema_decay
        cluster = d * cluster + (1.0 - d) * counts
        embed_sum = d * embed_sum + (1.0 - d) * jax.ops.segment_sum(flat_z, indices, num_segments=self.n_embed)
        n = jnp.sum(cluster)
        smoothed = (cluster + self.ema_eps) / (n + self.n_embed * self.ema_eps) * n
        self.put_variable(STATS, "cluster_size", cluster)
        self.put_variable(STATS, "embed_sum", embed_sum)
        self.put_variable(STATS, "embedding", embed_sum / smoothed[:, None])

    @nn.compact
    def __call__(self, z: jax.Array, update_ema: bool) -> QuantizerOutput:
        if z.shape[-1] != self.embed_dim:
            raise UserError(f"quantizer expects last dim {self.embed_dim}, got shape {z.shape}")
        codebook = self._codebook()
        z = z.astype(jnp.float32)
        flat_z = z.reshape(-1, self.embed_dim)
        indices = nearest_code(flat_z, codebook)
        quant = jnp.take(codebook, indices, axis=0).reshape(z.shape)

        codebook_term = jnp.mean(jnp.square(jax.lax.stop_gradient(z) - quant))
        commit_term = jnp.mean(jnp.square(z - jax.lax.stop_gradient(quant)))
        if self.use_ema:
            loss = self.beta * commit_term
        elif self.legacy_beta:
            loss = commit_term + self.beta * codebook_term
        else:
            loss = codebook_term + self.beta * commit_term

        counts = jnp.bincount(indices, length=self.n_embed).astype(jnp.float32)
        probs = counts / flat_z.shape[0]
        perplexity = jnp.exp(-jnp.sum(probs * jnp.log(probs + 1e-10)))
        usage = jnp.mean((counts > 0).astype(jnp.float32))

        if self.use_ema and update_ema and self.is_mutable_collection(STATS) and not self.is_initializing():
            self._ema_update(jax.lax.stop_gradient(flat_z), indices, counts)

        straight_through = z + jax.lax.stop_gradient(quant - z)
        return QuantizerOutput(
            quantized=straight_through,
            loss=loss,
            indices=indices.reshape(z.shape[:-1]),
            perplexity=perplexity,
            usage=usage,
        )
