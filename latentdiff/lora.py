"""Low-rank adapters (LoRA, Hu et al. 2021) over a stage-2 model's dense kernels, as pure functions of param trees.

An adapter of rank r on a kernel W [..., in, out] (leading axes: stacked layers) holds A [..., in, r] and
B [..., r, out]; the adapted kernel is W + s · A @ B with s = alpha / r · lora_scale. A starts uniform in
±1/sqrt(in) (peft's default), B at zero, so an untrained adapter leaves the model unchanged. The adapters are a tree
of the same nesting as the params they adapt ({'unet': {..., 'to_q': {'lora_a', 'lora_b'}}, 'cond': {...}}), so
they shard, checkpoint and save like params; `merge` builds the adapted params (sampling: Pipeline.apply_lora; it
is a pure function, so a train step can call it under jit with the base frozen).

Targets name the modules whose 'kernel' is adapted, by the end of their path: 'to_q' matches every query
projection, 'attn2/to_k' only the cross-attention keys, 'ff/proj' the UNet feed-forward's first layer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

from latentdiff.errors import UserError

# Target presets (config.lora.targets may list these names or module path ends).
ATTENTION = ("to_q", "to_k", "to_v", "to_out")
FEED_FORWARD = ("ff/proj", "ff/out", "fc1", "fc2")
PROJECTIONS = ("proj_in", "proj_out")
PRESETS = {"attention": ATTENTION, "feed_forward": FEED_FORWARD, "projections": PROJECTIONS}
A_NAME, B_NAME = "lora_a", "lora_b"


def expand_targets(targets: Sequence[str]) -> tuple[str, ...]:
    """Preset names ('attention', 'feed_forward', 'projections') replaced by their module names."""
    out: list[str] = []
    for target in targets:
        out.extend(PRESETS.get(target, (target,)))
    return tuple(dict.fromkeys(out))


def _matches(module_path: tuple[str, ...], target: str) -> bool:
    parts = tuple(target.strip("/").split("/"))
    return len(module_path) >= len(parts) and module_path[-len(parts) :] == parts


def adapted_paths(params: Mapping, targets: Sequence[str], where: str) -> list[tuple[str, ...]]:
    """Paths (without 'kernel') of the dense modules in `params` (concrete or abstract; kernels [in, out], or
    [layers, in, out] when stacked) whose kernel an adapter targets. Every target (a preset: one of its modules) must
    match at least one: one line naming those that match none."""
    flat = traverse_util.flatten_dict(dict(params))
    modules = [path[:-1] for path, leaf in flat.items() if path[-1] == "kernel" and len(leaf.shape) in (2, 3)]
    unmatched = [t for t in targets if not any(_matches(m, e) for m in modules for e in expand_targets([t]))]
    targets = expand_targets(targets)
    if unmatched:
        raise UserError(
            f"LoRA targets {', '.join(unmatched)} match no dense layer of {where}; use module names such as "
            f"{', '.join(ATTENTION + FEED_FORWARD + PROJECTIONS)} or the presets {', '.join(PRESETS)}"
        )
    return sorted(m for m in modules if any(_matches(m, t) for t in targets))


def check_rank(rank: int, alpha: float) -> None:
    """One line unless rank is a positive integer and alpha positive."""
    if not isinstance(rank, int) or rank <= 0:
        raise UserError(f"lora.rank must be a positive integer, got {rank!r}")
    if not alpha > 0:
        raise UserError(f"lora.alpha must be positive, got {alpha!r}")


def init_adapters(rng: jax.Array, params: Mapping, paths: Sequence[tuple[str, ...]], rank: int) -> dict:
    """Adapters for the kernels at `paths` of `params` (shapes only are read): A ~ U(±1/sqrt(in)), B = 0, float32."""
    check_rank(rank, 1.0)
    flat = traverse_util.flatten_dict(dict(params))
    out = {}
    for index, path in enumerate(paths):
        shape = flat[(*path, "kernel")].shape
        *lead, fan_in, fan_out = shape
        if rank > min(fan_in, fan_out):
            raise UserError(f"lora.rank {rank} exceeds the smaller side of {'/'.join(path)} ({fan_in} x {fan_out})")
        bound = 1.0 / jnp.sqrt(fan_in)
        a = jax.random.uniform(jax.random.fold_in(rng, index), (*lead, fan_in, rank), jnp.float32, -bound, bound)
        out[(*path, A_NAME)] = a
        out[(*path, B_NAME)] = jnp.zeros((*lead, rank, fan_out), jnp.float32)
    return traverse_util.unflatten_dict(out)


def delta(a: jax.Array, b: jax.Array) -> jax.Array:
    """A @ B over the last two axes: [..., in, r] x [..., r, out] -> [..., in, out] (float32)."""
    return jnp.einsum("...ir,...ro->...io", a.astype(jnp.float32), b.astype(jnp.float32))


def merge(params: Mapping, adapters: Mapping, scale: float | jax.Array, keep_dtype: bool = False) -> dict:
    """params with every adapted kernel replaced by W + scale · A @ B, computed in float32 and kept so (training:
    a bf16 base must not round the update away) or cast back to the kernel's dtype (keep_dtype: sampling, where
    the merged model must keep the base's argument signature). Other leaves are returned as they are."""
    flat = traverse_util.flatten_dict(dict(params))
    for path, pair in adapter_pairs(adapters).items():
        key = (*path, "kernel")
        if key not in flat:
            raise UserError(f"the LoRA adapters adapt {'/'.join(path)}, which the model does not have")
        kernel = flat[key]
        update = delta(pair[A_NAME], pair[B_NAME])
        if update.shape != kernel.shape:
            raise UserError(f"LoRA adapter of {'/'.join(path)} is {update.shape}, its kernel {kernel.shape}")
        merged = kernel.astype(jnp.float32) + scale * update
        flat[key] = merged.astype(kernel.dtype) if keep_dtype else merged
    return traverse_util.unflatten_dict(flat)


def adapter_pairs(adapters: Mapping) -> dict[tuple[str, ...], dict[str, Any]]:
    """{module path: {'lora_a': A, 'lora_b': B}} of an adapter tree (one line when a pair is incomplete)."""
    flat = traverse_util.flatten_dict(dict(adapters))
    pairs: dict[tuple[str, ...], dict[str, Any]] = {}
    for path, leaf in flat.items():
        if path[-1] not in (A_NAME, B_NAME):
            raise UserError(f"unexpected leaf {'/'.join(path)} in LoRA adapters (expected {A_NAME} / {B_NAME})")
        pairs.setdefault(path[:-1], {})[path[-1]] = leaf
    for path, pair in pairs.items():
        if set(pair) != {A_NAME, B_NAME}:
            raise UserError(f"LoRA adapter of {'/'.join(path)} lacks {({A_NAME, B_NAME} - set(pair)).pop()}")
    return pairs


def rank_of(adapters: Mapping) -> int:
    """The rank r shared by all adapters (one line when they disagree or there are none)."""
    ranks = {int(pair[A_NAME].shape[-1]) for pair in adapter_pairs(adapters).values()}
    if len(ranks) != 1:
        raise UserError(f"LoRA adapters have ranks {sorted(ranks)}; expected one rank")
    return ranks.pop()


def num_params(adapters: Mapping) -> int:
    """Number of adapter parameters."""
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(adapters))
