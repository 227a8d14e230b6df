"""Train either stage of a latent diffusion model.

    python train.py --config configs/autoencoder_kl_f8.py:tiny --workdir workdirs/ae
    python train.py --config configs/ldm_txt2img_kl8.py:tiny --workdir workdirs/ldm \
        --config.first_stage.workdir=workdirs/ae

Any config field can be overridden with --config.FIELD=VALUE. Re-running with the same --workdir resumes.
Multi-host: run the same command on every host (TPU pods: automatic) or add
--config.distributed.coordinator=HOST:PORT --config.distributed.num_processes=N --config.distributed.process_id=I.
"""

import logging

from absl import app, flags
from ml_collections import config_flags

import latentdiff  # noqa: F401  (applies the CPU XLA flags, and opt-in malloc settings, before JAX starts)
from latentdiff import config_utils, errors

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/NAME.py:VARIANT", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and images (resumes if it exists).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.getLogger("absl").setLevel(logging.WARNING)
    from latentdiff.train import train_and_evaluate

    errors.run_cli(lambda: train_and_evaluate(_CONFIG.value, _WORKDIR.value))


if __name__ == "__main__":
    import sys

    errors.run_cli(lambda: config_utils.check_overrides(sys.argv[1:]))
    app.run(main)
