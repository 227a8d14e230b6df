"""Stage 2: inpainting LDM, conditioned by concatenating the masked image's latent and the mask to z_t (paper §4.5).

    python train.py --config configs/ldm_inpaint.py:tiny --workdir workdirs/inpaint_tiny \
        --config.first_stage.workdir=workdirs/demo/autoencoder
    python train.py --config configs/ldm_inpaint.py:paper --workdir /mnt/gcs/ldm_inpaint \
        --config.first_stage.workdir=/mnt/gcs/ae_kl_f4

Training inputs are made in the step: a random mask per image (latentdiff.conditioning.random_masks: rectangles or
thick strokes, 1 = fill), the masked image x ⊙ (1 − m) encoded by the frozen first stage (posterior mode, scaled like
z) and the mask area-averaged to the latent grid enter the UNet as latent_channels + 1 extra input channels.

Variants:
  tiny   32 px shapes on the 8x8x4 latents of autoencoder_kl_f4:demo, text-conditioned like ldm_txt2img_kl8:tiny
         (caption dropout 0.1, so a prompt can say what to paint into the hole); UNet 32 ch (1,2), CPU-sized.
  paper  The paper's big inpainting LDM-4 on Places (CompVis inpainting_big config), here on KL-f4 latents
         64x64x3 (in 3 + 3 + 1 = 7, out 3): UNet 256 ch, ch_mult (1,2,3,4), 2 res blocks, attention at ds 2, 4, 8,
         8 heads, no text (text_encoder.kind 'none'); linear schedule 0.0015..0.0205, T 1000, eps. Batch and lr are
         ours (the paper does not state them for this model). UNet 548M params here: our attention levels are
         spatial transformers with feed-forward blocks, the original's plain self-attention blocks (smaller).
"""

import ml_collections
from ml_collections import config_dict

from latentdiff.config_blocks import (
    SHAPES_PROMPTS,
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

# One row per variant; each short key and the config field it sets: latentdiff.config_blocks.VARIANT_KEYS.
VARIANTS = {
    "tiny": dict(batch=32, steps=2_000, res=32, latent_ch=4, mc=32, mult=(1, 2), nrb=1, attn=(2, 1), heads=4,
                 width=64, depth=2, theads=4, hdim=16, vocab=512, length=32, start=0.00085, end=0.012, lr=1e-3,
                 warmup=100, ema=0.999),
    "paper": dict(batch=64, steps=1_000_000, res=256, latent_ch=3, mc=256, mult=(1, 2, 3, 4), nrb=2,
                  attn=(8, 4, 2), heads=8, width=0, depth=0, theads=0, hdim=0, vocab=0, length=0, start=0.0015,
                  end=0.0205, lr=1e-4, warmup=10_000, ema=0.9999),
}  # fmt: skip


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    v = check_variant(arg, VARIANTS, __file__)
    paper = arg == "paper"
    config = run_block(batch_size=v["batch"], num_train_steps=v["steps"], seed=0)
    config.stage = "ldm"
    config.init_from = ""  # a stage-2 workdir to fine-tune (latentdiff/train/finetune.py)
    config.freeze = ()  # parts kept fixed when fine-tuning: "cond" (text encoder) and/or "unet"

    config.data = default_data_config()
    config.data.resolution = v["res"]
    if paper:  # TFDS places365_small: 256x256 images with a scene label (unused)
        config.data.name = "places365_small"
        config.data.image_key, config.data.caption_key, config.data.label_key = "image", "", ""
        config.data.random_flip = True
    else:
        config.data.name = "shapes"

    config.first_stage = ml_collections.ConfigDict(
        dict(
            workdir=config_dict.placeholder(str),  # a trained stage-1 workdir (required on the first run)
            scale_factor=0.0,  # 0: 1/std of the first batch's latents, stored in the checkpoint
            sample_posterior=True,
            dtype="",  # frozen model's dtype in the train step + preview grids: '' = as trained; "bfloat16" on GPU/TPU
            latents="",  # precomputed latents are not usable here: the masked image is encoded in the step
        )
    )
    config.conditioning = ml_collections.ConfigDict(dict(concat="inpaint"))
    config.unet = unet_block(
        in_channels=2 * v["latent_ch"] + 1,  # z_t + masked-image latent + mask
        out_channels=v["latent_ch"],
        model_channels=v["mc"],
        channel_mult=v["mult"],
        num_res_blocks=v["nrb"],
        attention_resolutions=v["attn"],
        num_heads=v["heads"],
        num_head_channels=-1,
        context_dim=v["width"],  # 0 (paper): no cross-attention
        dtype="bfloat16" if paper else "float32",
        remat=paper,
    )
    config.text_encoder = text_encoder_block(
        kind="none" if paper else "bert",
        vocab_size=v["vocab"],
        max_length=v["length"],
        width=v["width"],
        depth=v["depth"],
        num_heads=v["theads"],
        head_dim=v["hdim"],
        mlp_ratio=0 if paper else 4,
        num_classes=0,
        dtype="float32",
        remat=False,
    )
    config.tokenizer = tokenizer_block(
        name_or_path="",
        vocab_size=v["vocab"],
        max_length=v["length"],  # '' = WordPiece from the captions
    )
    config.diffusion = diffusion_block(
        schedule="linear",
        timesteps=1000,
        linear_start=v["start"],
        linear_end=v["end"],
        parameterization="eps",
        p_uncond=0.0 if paper else 0.1,  # caption dropout (the concat input is never dropped)
    )
    config.optim = adamw_block(
        lr=v["lr"],
        weight_decay=0.0 if paper else 0.01,
        warmup_steps=v["warmup"],
        schedule="constant" if paper else "cosine",
    )
    config.ema = ml_collections.ConfigDict(dict(decay=v["ema"], warmup=True))
    config.sampling = ml_collections.ConfigDict(
        dict(
            sampler="ddim",
            steps=100 if paper else 50,
            eta=0.0,
            guidance=1.0 if paper else 3.0,
            prompts=("", "", "", "") if paper else SHAPES_PROMPTS,
        )
    )
    config.log_every = 50 if paper else 25
    config.eval_every = 10**9
    config.evaluation = no_evaluation_block()
    config.image_every = 5_000 if paper else 1_000
    config.checkpoint_every = 5_000 if paper else 500
    return config
