"""Stage 2: class-conditional latent diffusion (the paper's LDM-VQ-4 on ImageNet 256, "cin256").

    python train.py --config configs/ldm_cin256.py:tiny --workdir workdirs/cin_tiny \
        --config.first_stage.workdir=workdirs/ae_vq_tiny
    python train.py --config configs/ldm_cin256.py:paper --workdir /mnt/gcs/ldm_cin256 \
        --config.first_stage.workdir=/mnt/gcs/ae_vq_f4 --config.data.name=imagenet2012

Variants:
  tiny   CPU-sized class-conditional UNet on the shapes dataset's 24 "colour shape" classes at 32 px, on the 8x8x3
         latents of autoencoder_vq_f4:tiny.
  paper  As the released cin256-v2 config: UNet 192 ch, ch_mult (1,2,3,5), 2 res blocks, attention at ds 2, 4, 8,
         32-channel heads, class embedding 512 (1000 classes + the null class) through cross-attention; VQ-f4
         latents 64x64x3, linear schedule 0.0015..0.0195, T 1000, eps; lr 1e-4.
"""

import ml_collections
from ml_collections import config_dict

from latentdiff.config_blocks import (
    adamw_block,
    diffusion_block,
    no_evaluation_block,
    run_block,
    text_encoder_block,
    tokenizer_block,
    unet_block,
)
from latentdiff.config_utils import check_variant
from latentdiff.data.input_pipeline import default_data_config


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    variant = check_variant(arg, {"tiny": 0, "paper": 1}, __file__)
    paper = variant == 1
    config = run_block(batch_size=256 if paper else 32, num_train_steps=1_000_000 if paper else 2_000, seed=0)
    config.stage = "ldm"
    config.init_from = ""  # a stage-2 workdir to fine-tune (latentdiff/train/finetune.py)
    config.freeze = ()  # parts kept fixed when fine-tuning: "cond" (text encoder) and/or "unet"

    config.data = default_data_config()
    config.data.name = "imagenet2012" if paper else "shapes"
    config.data.resolution = 256 if paper else 32
    config.data.random_flip = paper

    config.first_stage = ml_collections.ConfigDict(
        dict(
            workdir=config_dict.placeholder(str),
            scale_factor=1.0 if paper else 0.0,
            sample_posterior=False,
            dtype="",  # frozen model's dtype in the train step + preview grids: '' = as trained; "bfloat16" on GPU/TPU
            latents="",  # a directory written by `latentdiff encode` ('' = encode images on the fly)
        )
    )
    # concat conditioning (latentdiff/conditioning.py): none / inpaint / sr (configs/ldm_inpaint.py, ldm_sr4.py)
    config.conditioning = ml_collections.ConfigDict(dict(concat="none"))
    width = 512 if paper else 64
    num_classes = 1000 if paper else 24
    config.unet = unet_block(
        in_channels=3,
        out_channels=3,
        model_channels=192 if paper else 32,
        channel_mult=(1, 2, 3, 5) if paper else (1, 2),
        num_res_blocks=2 if paper else 1,
        attention_resolutions=(8, 4, 2) if paper else (2, 1),
        num_heads=-1,
        num_head_channels=32 if paper else 16,
        context_dim=width,
        dtype="bfloat16" if paper else "float32",
        remat=paper,
    )
    config.text_encoder = text_encoder_block(
        kind="class",
        vocab_size=0,
        max_length=0,
        width=width,
        depth=0,
        num_heads=0,
        head_dim=0,
        mlp_ratio=0,
        num_classes=num_classes,
        dtype="float32",
        remat=False,
    )
    config.tokenizer = tokenizer_block(name_or_path="", vocab_size=0, max_length=0)
    config.diffusion = diffusion_block(
        schedule="linear",
        timesteps=1000,
        linear_start=0.0015 if paper else 0.00085,
        linear_end=0.0195 if paper else 0.012,
        parameterization="eps",
        p_uncond=0.1,  # label dropout to the null class for classifier-free guidance
    )
    config.optim = adamw_block(
        lr=1e-4 if paper else 1e-3,
        weight_decay=0.0,
        warmup_steps=10_000 if paper else 100,
        schedule="constant" if paper else "cosine",
    )
    config.ema = ml_collections.ConfigDict(dict(decay=0.9999 if paper else 0.999, warmup=True))
    config.sampling = ml_collections.ConfigDict(
        dict(sampler="ddim", steps=250 if paper else 50, eta=0.0, guidance=3.0, prompts=(0, 1, 5, 9, 13, 17, 21, 23))
    )
    config.log_every = 50 if paper else 25
    config.eval_every = 10**9
    config.evaluation = no_evaluation_block()
    config.image_every = 5_000 if paper else 1_000
    config.checkpoint_every = 5_000 if paper else 500
    return config
