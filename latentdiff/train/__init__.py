"""Training: one `train_and_evaluate(config, workdir)` per stage, chosen by config.stage."""

from __future__ import annotations

from typing import Any

import ml_collections

from latentdiff.errors import UserError

STAGES = ("autoencoder", "ldm")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> Any:
    """Dispatches on config.stage: 'autoencoder' (stage 1) or 'ldm' (stage 2).

    Before anything is written: the config's numbers, the workdir's path, its stage and model (latentdiff.workdir),
    a fine-tuning base's model (config.init_from), and the lock (one run per workdir, held by process 0 for the
    whole run).
    """
    import jax

    from latentdiff import parallel
    from latentdiff import workdir as workdir_lib
    from latentdiff.config_utils import require_local_path
    from latentdiff.train.config_checks import check_numbers

    require_local_path(workdir, "--workdir")
    if config.stage not in STAGES:
        raise UserError(f"config.stage {config.stage!r} is not one of {STAGES}")
    if config.stage == "ldm" and config.first_stage.workdir:
        require_local_path(config.first_stage.workdir, "first_stage.workdir")
    check_numbers(config)
    workdir_lib.check_compatible(config, workdir)
    if config.stage == "ldm" and config.init_from:
        from latentdiff.train import finetune

        finetune.check_freeze(config)
        finetune.check_paths(config, workdir)
        if not workdir_lib.has_checkpoints(workdir):  # a resumed run no longer reads the base
            finetune.base_config(config)  # the base holds the model the config describes
    if config.stage == "autoencoder":
        from latentdiff.train.autoencoder import train_and_evaluate as run
    else:
        from latentdiff.train.ldm import train_and_evaluate as run
    parallel.init_distributed(
        config.distributed.coordinator,
        config.distributed.num_processes,
        config.distributed.process_id,
        timeout_s=config.distributed.timeout_s,
    )
    with workdir_lib.exclusive_run(workdir, enabled=jax.process_index() == 0):
        return run(config, workdir)
