"""Config blocks shared by the files in configs/ (values only, no logic), so each experiment file stays short.

Every field a trainer reads is set here or in the config file itself; trainers never invent defaults.
"""

from __future__ import annotations

import ml_collections


def run_block(*, batch_size: int, num_train_steps: int, seed: int) -> ml_collections.ConfigDict:
    """Loop, logging and checkpoint settings common to both stages."""
    return ml_collections.ConfigDict(
        dict(
            seed=seed,
            batch_size=batch_size,  # global batch over all processes and devices
            grad_accum_steps=1,  # micro-batches scanned per update (global batch = batch_size * grad_accum_steps)
            num_train_steps=num_train_steps,
            log_every=50,
            eval_every=1000,
            num_eval_batches=4,
            image_every=1000,  # sample / reconstruction grids
            checkpoint_every=1000,
            keep_checkpoints=3,
            async_checkpointing=True,
            max_consecutive_nonfinite=20,  # stop after this many skipped (non-finite) updates in a row
            progress_bar=True,
            peak_tflops=0.0,  # per device, for MFU in the logs (e.g. 197 for a TPU v4 chip in bf16); 0 = unknown
            profile_start_step=-1,  # >= 0: write a jax.profiler trace of a few steps from here
            profile_num_steps=5,
            mesh=ml_collections.ConfigDict(dict(data=-1, fsdp=1)),
            sharding=ml_collections.ConfigDict(
                dict(
                    rules=(),  # ((regex over 'a/b/kernel', (axis or None, ...)), ...) checked before FSDP
                    fsdp_min_size=2**16,  # params smaller than this stay replicated
                )
            ),
            distributed=ml_collections.ConfigDict(dict(coordinator="", num_processes=0, process_id=-1)),
        )
    )


def merge(*blocks: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Later blocks override earlier ones at the top level."""
    out = ml_collections.ConfigDict()
    for block in blocks:
        for key, value in block.items():
            setattr(out, key, value)
    return out
