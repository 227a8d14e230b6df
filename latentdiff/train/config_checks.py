"""Numbers in a training config, checked before anything runs or is written: every float is finite, and every field
with a meaningful range is in it. One table, one walk; the error names the field, its value, the range and the fix.

A field missing from a config (an older or another stage's config) is not checked; its absence is the config's own
error later.
"""

from __future__ import annotations

import math
from typing import Any

import ml_collections

from latentdiff.config_utils import ConfigError

INF = math.inf

# dotted field -> (kind, low, high, low_inclusive). kind: 'int' (a whole number) or 'float'; high is inclusive.
RANGES: dict[str, tuple[str, float, float, bool]] = {
    "batch_size": ("int", 1, INF, True),
    "grad_accum_steps": ("int", 1, INF, True),
    "num_train_steps": ("int", 1, INF, True),
    "checkpoint_every": ("int", 1, INF, True),
    "keep_checkpoints": ("int", 1, INF, True),  # 0 would keep no checkpoint at all
    "log_every": ("int", 1, INF, True),
    "image_every": ("int", 1, INF, True),
    "eval_every": ("int", 1, INF, True),
    "num_eval_batches": ("int", 0, INF, True),
    "max_consecutive_nonfinite": ("int", 1, INF, True),
    "peak_tflops": ("float", 0, INF, True),
    "distributed.timeout_s": ("int", 1, INF, True),
    "data.resolution": ("int", 8, INF, True),
    "ema.decay": ("float", 0, 1, True),
    "diffusion.timesteps": ("int", 1, INF, True),
    "diffusion.linear_start": ("float", 0, 1, False),
    "diffusion.linear_end": ("float", 0, 1, False),
    "diffusion.p_uncond": ("float", 0, 1, True),
    "diffusion.min_snr_gamma": ("float", 0, INF, True),
    "diffusion.loss_buckets": ("int", 1, INF, True),
    "sampling.steps": ("int", 1, INF, True),
    "sampling.eta": ("float", 0, INF, True),
    "sampling.guidance": ("float", 0, INF, True),
    "evaluation.num_images": ("int", 0, INF, True),
    "evaluation.batch_size": ("int", 1, INF, True),
    "evaluation.steps": ("int", 1, INF, True),
    "evaluation.guidance": ("float", 0, INF, True),
    "evaluation.eta": ("float", 0, INF, True),
    "evaluation.inception_batch_size": ("int", 1, INF, True),
    "loss.kl_weight": ("float", 0, INF, True),
    "loss.perceptual_weight": ("float", 0, INF, True),
    "loss.disc_weight": ("float", 0, INF, True),
    "loss.disc_factor": ("float", 0, INF, True),
    "loss.codebook_weight": ("float", 0, INF, True),
    "loss.disc_start": ("int", 0, INF, True),
}
for _optim in ("optim", "disc_optim"):
    RANGES |= {
        # Adam's step moves every parameter by about lr; above 1 no model trains, it only poisons checkpoints.
        f"{_optim}.lr": ("float", 0, 1, False),
        f"{_optim}.b1": ("float", 0, 0.999999, True),
        f"{_optim}.b2": ("float", 0, 0.999999999, True),
        f"{_optim}.eps": ("float", 0, 1, False),
        f"{_optim}.weight_decay": ("float", 0, 1, True),
        f"{_optim}.grad_clip": ("float", 0, INF, True),
        f"{_optim}.warmup_steps": ("int", 0, INF, True),
    }


def _leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, ml_collections.ConfigDict | dict):
        out: dict[str, Any] = {}
        for key in node.keys():
            out |= _leaves(node[key], f"{prefix}{key}.")
        return out
    if isinstance(node, tuple | list):
        return {f"{prefix}{i}": v for i, v in enumerate(node)}
    return {prefix[:-1]: node}


def _range_text(low: float, high: float, low_inclusive: bool) -> str:
    left = "[" if low_inclusive else "("
    right = "inf)" if high == INF else f"{high:g}]"
    return f"{left}{low:g}, {right}"


def check_numbers(config: ml_collections.ConfigDict) -> None:
    """ConfigError for the first non-finite float anywhere in the config, or a field of RANGES outside its range."""
    leaves = _leaves(config)
    for field, value in leaves.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"config field {field} is {value}; set a finite number with --config.{field}=VALUE")
    for field, (kind, low, high, low_inclusive) in RANGES.items():
        if field not in leaves:
            continue
        value = leaves[field]
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"config field {field} is {value!r}, not a number; set --config.{field}=VALUE")
        if kind == "int" and float(value) != int(value):
            raise ConfigError(f"config field {field} is {value}, not a whole number; set --config.{field}=N")
        above_low = value >= low if low_inclusive else value > low
        if not (above_low and value <= high):
            raise ConfigError(
                f"config field {field}={value} is out of range {_range_text(low, high, low_inclusive)}; "
                f"set --config.{field}=VALUE within it"
            )
