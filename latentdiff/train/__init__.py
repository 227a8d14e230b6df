"""Training: one `train_and_evaluate(config, workdir)` per stage, chosen by config.stage."""

from __future__ import annotations

from typing import Any

import ml_collections

STAGES = ("autoencoder", "ldm")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> Any:
    """Dispatches on config.stage: 'autoencoder' (stage 1) or 'ldm' (stage 2)."""
    from latentdiff.config_utils import require_local_path

    require_local_path(workdir, "--workdir")
    if config.stage == "ldm" and config.first_stage.workdir:
        require_local_path(config.first_stage.workdir, "first_stage.workdir")
    if config.stage == "autoencoder":
        from latentdiff.train.autoencoder import train_and_evaluate as run
    elif config.stage == "ldm":
        from latentdiff.train.ldm import train_and_evaluate as run
    else:
        raise ValueError(f"config.stage {config.stage!r} is not one of {STAGES}")
    return run(config, workdir)
