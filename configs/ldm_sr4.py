"""Stage 2: ×4 super-resolution LDM, conditioned by concatenating the low-resolution image to z_t (paper §4.4).

    python train.py --config configs/ldm_sr4.py:tiny --workdir workdirs/sr4_tiny \
        --config.first_stage.workdir=workdirs/demo/autoencoder
    python bench/sr_psnr.py --workdir workdirs/sr4_tiny      (PSNR of the ×4 output vs bicubic, validation split)
    python train.py --config configs/ldm_sr4.py:paper --workdir /mnt/gcs/ldm_sr4 \
        --config.first_stage.workdir=/mnt/gcs/ae_vq_f4 --config.data.name=imagenet2012

Training pairs are made in the step: the low-resolution input is the antialiased bicubic ↓4 of the batch image
(latentdiff.conditioning.low_res_from_image) and enters the UNet as 3 extra input channels at the latent grid
(f = 4: the ↓4 image already has the latent size). No text or class conditioning (text_encoder.kind 'none', no
cross-attention, no guidance).

Variants:
  tiny   32 px shapes from 8 px inputs, on the 8x8x4 latents of autoencoder_kl_f4:demo (the demo's first stage);
         UNet 64 ch (1,2), 1 res block, self-attention at ds 2; 4000 steps, ~24 min on a 2-core CPU: 27.9 dB
         against bicubic's 24.5 (bench/RESULTS.md).
  paper  The paper's bicubic ×4 LDM-4 on ImageNet 64 -> 256 (CompVis bsr_sr config): VQ-f4 latents 64x64x3 + the 64 px
         image (in 6, out 3), UNet 160 ch, ch_mult (1,2,2,4), 2 res blocks, attention at ds 8 (the original lists
         16 and 8; ds 16 does not occur with four levels), 32-channel heads; linear schedule 0.0015..0.0155, T 1000,
         eps; lr 6.4e-5 (= the original base lr 1e-6 × batch 64). UNet 157.9M params here (the paper reports 169M;
         our attention levels are spatial transformers, the original's plain self-attention blocks).
"""

import ml_collections
from ml_collections import config_dict

from latentdiff.config_blocks import (
    adamw_block,
    diffusion_block,
    no_evaluation_block,
    no_text_encoder_block,
    run_block,
    tokenizer_block,
    unet_block,
)
from latentdiff.config_utils import check_variant
from latentdiff.data.input_pipeline import default_data_config

# One row per variant; each short key and the config field it sets: latentdiff.config_blocks.VARIANT_KEYS.
VARIANTS = {
    "tiny": dict(batch=32, steps=4_000, res=32, latent_ch=4, mc=64, mult=(1, 2), nrb=1, attn=(2,), heads=4,
                 head_ch=-1, start=0.0015, end=0.0155, lr=1e-3, warmup=100, ema=0.999),
    "paper": dict(batch=64, steps=1_000_000, res=256, latent_ch=3, mc=160, mult=(1, 2, 2, 4), nrb=2, attn=(8,),
                  heads=-1, head_ch=32, start=0.0015, end=0.0155, lr=6.4e-5, warmup=10_000, ema=0.9999),
}  # fmt: skip
SR_FACTOR = 4


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    v = check_variant(arg, VARIANTS, __file__)
    paper = arg == "paper"
    config = run_block(batch_size=v["batch"], num_train_steps=v["steps"], seed=0)
    config.stage = "ldm"
    config.init_from = ""  # a stage-2 workdir to fine-tune (latentdiff/train/finetune.py)
    config.freeze = ()  # parts kept fixed when fine-tuning: "cond" (text encoder) and/or "unet"

    config.data = default_data_config()
    config.data.name = "imagenet2012" if paper else "shapes"
    config.data.resolution = v["res"]
    config.data.random_flip = paper
    config.data.random_crop = paper

    config.first_stage = ml_collections.ConfigDict(
        dict(
            workdir=config_dict.placeholder(str),  # a trained stage-1 workdir (required on the first run)
            scale_factor=1.0 if paper else 0.0,  # 0: 1/std of the first batch's latents, stored in the checkpoint
            sample_posterior=not paper,
            dtype="",  # frozen model's dtype in the train step + preview grids: '' = as trained; "bfloat16" on GPU/TPU
            latents="",  # precomputed latents are not usable here: the low-resolution input is made from the images
        )
    )
    config.conditioning = ml_collections.ConfigDict(dict(concat="sr", sr_factor=SR_FACTOR))
    config.unet = unet_block(
        in_channels=v["latent_ch"] + 3,  # z_t + the low-resolution RGB image
        out_channels=v["latent_ch"],
        model_channels=v["mc"],
        channel_mult=v["mult"],
        num_res_blocks=v["nrb"],
        attention_resolutions=v["attn"],
        num_heads=v["heads"],
        num_head_channels=v["head_ch"],
        context_dim=0,  # no cross-attention: the transformers' second attention attends to the image itself
        dtype="bfloat16" if paper else "float32",
        remat=paper,
    )
    config.text_encoder = no_text_encoder_block()
    config.tokenizer = tokenizer_block(name_or_path="", vocab_size=0, max_length=0)
    config.diffusion = diffusion_block(
        schedule="linear",
        timesteps=1000,
        linear_start=v["start"],
        linear_end=v["end"],
        parameterization="eps",
        p_uncond=0.0,  # nothing to drop: the concat input is never dropped
    )
    config.optim = adamw_block(
        lr=v["lr"],
        weight_decay=0.0,
        warmup_steps=v["warmup"],
        schedule="constant" if paper else "cosine",
    )
    config.ema = ml_collections.ConfigDict(dict(decay=v["ema"], warmup=True))
    config.sampling = ml_collections.ConfigDict(
        dict(sampler="ddim", steps=100 if paper else 50, eta=0.0, guidance=1.0, prompts=("", "", "", ""))
    )
    config.log_every = 50 if paper else 25
    config.eval_every = 10**9  # evaluated with bench/sr_psnr.py
    config.evaluation = no_evaluation_block()
    config.image_every = 5_000 if paper else 1_000
    config.checkpoint_every = 5_000 if paper else 500
    return config
