"""Stage 1: vector-quantised autoencoder (LDM-VQ-f4, the first stage of the class-conditional ImageNet LDM).

    python train.py --config configs/autoencoder_vq_f4.py:tiny --workdir workdirs/ae_vq_tiny
    python train.py --config configs/autoencoder_vq_f4.py:paper --workdir /mnt/gcs/ae_vq_f4 \
        --config.data.name=imagenet2012 --config.loss.lpips_weights=weights/lpips_vgg16.safetensors

Variants:
  tiny   CPU-sized f=4 VQ autoencoder on shapes (32 px -> 8x8x3 latents, 256 codes, EMA codebook).
  paper  The paper's VQ-f4: ch 128, ch_mult (1,2,4), 2 res blocks, embed_dim 3, 8192 codes, 256 px, LPIPS + PatchGAN.
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
    config.data.resolution = 256 if paper else 32
    config.data.random_flip = paper

    config.autoencoder = ml_collections.ConfigDict(
        dict(
            kind="vq",
            in_channels=3,
            out_channels=3,
            resolution=config.data.resolution,
            ch=128 if paper else 32,
            ch_mult=(1, 2, 4) if paper else (1, 2, 2),
            num_res_blocks=2 if paper else 1,
            attn_resolutions=(),
            dropout=0.0,
            z_channels=3,
            double_z=False,
            embed_dim=3,
            n_embed=8192 if paper else 256,
            beta=0.25,
            ema_codebook=not paper,
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
            lpips_weights="",
            lpips_dtype="float32",
            kl_weight=0.0,
            codebook_weight=1.0,
            disc_weight=0.75 if paper else 0.5,
            disc_factor=1.0,
            disc_start=0 if paper else 1_000,
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
