"""Flags shared by the command-line programs (latentdiff/cli.py): sampling settings that default to the model's own
config.sampling, and config-field overrides written the same way everywhere (--config.FIELD=VALUE)."""

from __future__ import annotations

import argparse
from typing import Any

SAMPLING_FIELDS = ("sampler", "steps", "eta", "guidance")
FROM_CONFIG = "default: the model's config.sampling"
CONFIG_PREFIX = "--config."


def add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    """--steps, --sampler, --eta, --guidance, all defaulting to None (= the model's config.sampling value)."""
    from latentdiff.generation import SAMPLERS  # here, not at import: the pre-flight parses flags before JAX starts

    parser.add_argument("--steps", type=int, default=None, help=f"sampling steps ({FROM_CONFIG})")
    parser.add_argument("--sampler", choices=SAMPLERS, default=None, help=f"({FROM_CONFIG})")
    parser.add_argument(
        "--eta", type=float, default=None, help=f"DDIM eta, 0 deterministic, 1 ancestral ({FROM_CONFIG})"
    )
    parser.add_argument(
        "--guidance", type=float, default=None, help=f"classifier-free guidance scale, 1 = off ({FROM_CONFIG})"
    )


def fill_sampling_defaults(args: argparse.Namespace, sampling: Any) -> None:
    """Every sampling flag not given takes the model's tuned value from its config.sampling (the demo model's
    guidance is 2, a converted SD model's 7.5, the paper's LDM-KL-8-G 250 DDIM steps at 1.5): one source of
    defaults, the model's own."""
    for field in SAMPLING_FIELDS:
        if getattr(args, field) is None:
            setattr(args, field, sampling[field])


def parse_with_config_overrides(
    parser: argparse.ArgumentParser, argv: list[str] | None
) -> tuple[argparse.Namespace, list[str]]:
    """Parses `argv`, collecting --config.FIELD=VALUE overrides (as train.py takes them) -> (args, ["FIELD=VALUE",
    ...]) for config_utils.apply_overrides. Any other unknown argument is the parser's one-line usage error."""
    args, extra = parser.parse_known_args(argv)
    unknown = [arg for arg in extra if not arg.startswith(CONFIG_PREFIX)]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)} (config fields are set with --config.FIELD=VALUE)")
    return args, [arg[len(CONFIG_PREFIX) :] for arg in extra]
