"""Train either stage of a latent diffusion model (`latentdiff train`; latentdiff/train/cli.py).

    python train.py --config configs/autoencoder_kl_f8.py:tiny --workdir workdirs/ae
    python train.py --config configs/ldm_txt2img_kl8.py:tiny --workdir workdirs/ldm \
        --config.first_stage.workdir=workdirs/ae

Any config field can be overridden with --config.FIELD=VALUE. Re-running with the same --workdir resumes.
Multi-host: run the same command on every host (TPU pods: automatic) or add
--config.distributed.coordinator=HOST:PORT --config.distributed.num_processes=N --config.distributed.process_id=I.
"""

from latentdiff import cli

if __name__ == "__main__":
    cli.run_as("train")
