"""Pieces both stages' train steps share: EMA decay, the non-finite guard, gradient accumulation, dtypes (the
optimizer, with the EMA and the guard fused into its update, is latentdiff.train.optim)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from latentdiff.errors import UserError


def ema_decay(step: jax.Array, decay: float, warmup: bool) -> jax.Array:
    """EMA decay at `step`; with warmup min(decay, (1 + step) / (10 + step)) as in the LDM code."""
    step = jnp.asarray(step, jnp.float32)
    if warmup:
        return jnp.minimum(decay, (1.0 + step) / (10.0 + step))
    return jnp.asarray(decay, jnp.float32)


def all_finite(loss: jax.Array, grad_norm: jax.Array) -> jax.Array:
    """True when the loss and the global gradient norm are finite (any inf/nan gradient makes the norm non-finite).

    Uses the norm the step logs anyway: per-leaf finiteness reductions cost XLA:CPU tens of seconds of compile time
    for models with hundreds of leaves, and raveling the tree would all-gather FSDP-sharded gradients.
    """
    return jnp.logical_and(jnp.all(jnp.isfinite(loss)), jnp.isfinite(grad_norm))


def select_tree(pred: jax.Array, on_true: Any, on_false: Any) -> Any:
    """Elementwise choice between two pytrees of the same structure by one scalar predicate (keeps shardings)."""
    return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


def global_norm(tree: Any) -> jax.Array:
    return optax.tree.norm(tree)


def split_micro_batches(batch: dict[str, jax.Array], num_micro: int) -> dict[str, jax.Array]:
    """[A*b, ...] -> [A, b, ...] for gradient accumulation (A = num_micro), strided: micro-batch j holds rows
    j, A + j, 2A + j, ...

    The global batch is sharded over the devices in contiguous blocks; with the strided split every micro-batch takes
    an equal share of each device's block, so it stays evenly sharded and nothing moves between devices (a
    contiguous split would put micro-batch 0 on the first devices only). Needs b divisible by the batch shards.
    """

    def split(x: jax.Array) -> jax.Array:
        if x.shape[0] % num_micro:
            raise UserError(f"batch of {x.shape[0]} does not split into {num_micro} micro-batches")
        return jnp.swapaxes(x.reshape(x.shape[0] // num_micro, num_micro, *x.shape[1:]), 0, 1)

    return jax.tree.map(split, batch)


def accumulate_gradients(
    grad_fn: Callable[[Any, dict, jax.Array], tuple[Any, dict]],
    params: Any,
    batch: dict[str, jax.Array],
    rng: jax.Array,
    num_micro: int,
) -> tuple[Any, dict]:
    """Mean of grad_fn over micro-batches, scanned (memory of one micro-batch). grad_fn -> (grads, metrics)."""
    if num_micro == 1:
        return grad_fn(params, batch, rng)
    micro = split_micro_batches(batch, num_micro)
    rngs = jax.random.split(rng, num_micro)

    def body(grads_sum: Any, inputs: tuple[dict, jax.Array]) -> tuple[Any, dict]:
        grads, metrics = grad_fn(params, inputs[0], inputs[1])
        return jax.tree.map(jnp.add, grads_sum, grads), metrics

    # Gradients have the params' structure and dtypes; per-micro-batch metrics come out stacked (no extra trace of
    # grad_fn just to learn their shapes).
    zeros = jax.tree.map(jnp.zeros_like, params)
    grads, metrics = jax.lax.scan(body, zeros, (micro, rngs))
    return jax.tree.map(lambda g: g / num_micro, grads), jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics)


def count_skips(finite: jax.Array, nonfinite_count: jax.Array, nonfinite_streak: jax.Array) -> tuple:
    """(total, consecutive) skipped updates after a step whose update was `finite` (bool [])."""
    skipped = jnp.logical_not(finite).astype(jnp.int32)
    return nonfinite_count + skipped, jnp.where(finite, 0, nonfinite_streak + 1)


def compute_dtype(name: str) -> jnp.dtype:
    """'float32' | 'bfloat16' | 'float16' -> dtype, with a clear error otherwise."""
    table = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
    if name not in table:
        raise UserError(f"dtype {name!r} is not one of {sorted(table)}")
    return table[name]
