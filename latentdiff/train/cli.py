"""`latentdiff train` (and train.py): train either stage of a latent diffusion model.

    latentdiff train --config configs/autoencoder_kl_f8.py:tiny --workdir workdirs/ae
    latentdiff train --config configs/ldm_txt2img_kl8.py:tiny --workdir workdirs/ldm \
        --config.first_stage.workdir=workdirs/ae

Any config field can be overridden with --config.FIELD=VALUE. Re-running with the same --workdir resumes.
Multi-host: run the same command on every host (TPU pods: automatic) or add
--config.distributed.coordinator=HOST:PORT --config.distributed.num_processes=N --config.distributed.process_id=I.
"""

from __future__ import annotations

import logging

from absl import app, flags
from ml_collections import config_flags

from latentdiff import config_utils, errors

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/NAME.py:VARIANT", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and images (resumes if it exists).")
flags.mark_flags_as_required(["config", "workdir"])


def _run(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.getLogger("absl").setLevel(logging.WARNING)
    from latentdiff.train import train_and_evaluate

    errors.run_cli(lambda: train_and_evaluate(_CONFIG.value, _WORKDIR.value))


def main(argv: list[str]) -> None:
    """Parses --config / --workdir / --config.FIELD=VALUE (absl + ml_collections flags) and trains."""
    errors.run_cli(lambda: config_utils.check_overrides(argv))  # unknown fields: one line, not absl's traceback
    app.run(_run, argv=["latentdiff train", *argv])
