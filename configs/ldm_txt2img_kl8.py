"""Stage 2: text-to-image latent diffusion (LDM-KL-8-G of the paper) with a jointly trained transformer τ_θ.

    python train.py --config configs/ldm_txt2img_kl8.py:tiny --workdir workdirs/ldm_tiny \
        --config.first_stage.workdir=workdirs/ae_kl_tiny
    python train.py --config configs/ldm_txt2img_kl8.py:demo --workdir workdirs/demo/ldm \
        --config.first_stage.workdir=workdirs/demo/autoencoder
    python train.py --config configs/ldm_txt2img_kl8.py:emoji --workdir workdirs/emoji/ldm \
        --config.first_stage.workdir=workdirs/emoji/autoencoder      (or all of make emoji-train)
    python train.py --config configs/ldm_txt2img_kl8.py:paper --workdir /mnt/gcs/ldm_txt2img \
        --config.first_stage.workdir=/mnt/gcs/ae_kl_f8 --config.data.name=coco_captions

Variants:
  tiny   CPU-sized UNet + text encoder on the shapes dataset at 64 px (8x8x4 latents of autoencoder_kl_f8:tiny).
  demo   The embedded demo (`make demo-train`): the same recipe at 32 px on the 8x8x4 latents of
         autoencoder_kl_f4:demo; UNet 64 ch (1,2), attention at both levels, text encoder 2 x 128; v-prediction
         (not the paper's eps: with eps the loss barely weighs the high-noise steps that decide where an object goes,
         and the model never learned position words; bench/RESULTS.md, issue 8); guidance 2, chosen on held-out
         captions (shape 0.875 / 0.887 / 0.883 / 0.855 at 1.5 / 2 / 2.5 / 3).
  emoji  Stage 2 of `make emoji-train` (latentdiff/emoji_train.py) on the Noto emoji set (`latentdiff emoji`): 64 px
         images as the 16x16x3 latents of autoencoder_kl_f4:emoji, captions = emoji names; UNet 64 ch (1,2,2) with
         attention at 8x8 and 4x4, text encoder 2 x 128 over a 1024-word WordPiece vocabulary; v-prediction (as the
         demo); 3000 steps of batch 32. 120 training images are held back as 'validation' (the guidance scale is
         chosen on their captions), the held-out folder's emoji ('heldout') are the test captions.
  paper  The paper's LDM-KL-8-G: UNet 320, ch_mult (1,2,4,4), 2 res blocks, attention at ds 1, 2, 4, 8 heads,
         context 1280 (~872M params); text encoder 32 layers x 1280, 8 heads x 64, length 77, BERT tokenizer
         (~543M params); linear schedule 0.00085..0.012, T 1000, eps; AdamW lr 1e-4, batch 680, 390k steps.
"""

import ml_collections
from ml_collections import config_dict

from latentdiff.config_blocks import (
    EMOJI_PROMPTS,
    PAPER_TEXT_PROMPTS,
    SHAPES_PROMPTS,
    adamw_block,
    diffusion_block,
    evaluation_block,
    run_block,
    text_encoder_block,
    tokenizer_block,
    unet_block,
)
from latentdiff.config_utils import check_variant
from latentdiff.data.input_pipeline import default_data_config

# One row per variant; each short key and the config field it sets: latentdiff.config_blocks.VARIANT_KEYS.
VARIANTS = {
    "tiny": dict(batch=32, steps=2_000, res=64, latent_ch=4, mc=32, mult=(1, 2), nrb=1, attn=(2, 1), heads=4, width=64,
                 depth=2, theads=4, hdim=16, vocab=512, length=32, lr=1e-3, warmup=100, ema=0.999, guidance=3.0,
                 param="eps"),
    "demo": dict(batch=32, steps=6_000, res=32, latent_ch=4, mc=64, mult=(1, 2), nrb=1, attn=(2, 1), heads=4, width=128,
                 depth=2, theads=4, hdim=32, vocab=256, length=24, lr=5e-4, warmup=300, ema=0.999, guidance=2.0,
                 param="v"),
    "emoji": dict(batch=32, steps=3_000, res=64, latent_ch=3, mc=64, mult=(1, 2, 2), nrb=1, attn=(2, 4), heads=4,
                  width=128, depth=2, theads=4, hdim=32, vocab=1024, length=24, lr=5e-4, warmup=200, ema=0.999,
                  guidance=3.0, param="v"),
    "paper": dict(batch=680, steps=390_000, res=256, latent_ch=4, mc=320, mult=(1, 2, 4, 4), nrb=2, attn=(4, 2, 1),
                  heads=8, width=1280, depth=32, theads=8, hdim=64, vocab=30522, length=77, lr=1e-4, warmup=10_000,
                  ema=0.9999, guidance=1.5, param="eps"),
}  # fmt: skip


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    v = check_variant(arg, VARIANTS, __file__)
    paper, emoji = arg == "paper", arg == "emoji"
    config = run_block(batch_size=v["batch"], num_train_steps=v["steps"], seed=0)
    config.stage = "ldm"
    config.init_from = ""  # a stage-2 workdir to fine-tune (latentdiff/train/finetune.py)
    config.freeze = ()  # parts kept fixed when fine-tuning: "cond" (text encoder) and/or "unet"

    config.data = default_data_config()
    config.data.name = "coco_captions" if paper else "shapes"
    config.data.resolution = v["res"]
    if emoji:  # `latentdiff emoji --out data/emoji` writes both folders
        config.data.name = "folder"
        config.data.folder = "data/emoji/train"
        config.data.folder_num_validation = 120  # training captions held back to choose the guidance scale on
        config.data.folder_heldout = "data/emoji/heldout"  # emoji never seen in training: the test captions

    config.first_stage = ml_collections.ConfigDict(
        dict(
            workdir=config_dict.placeholder(str),  # a trained stage-1 workdir (required on the first run)
            scale_factor=0.18215 if paper else 0.0,  # 0: 1/std of the first batch's latents, stored in the checkpoint
            sample_posterior=True,
            dtype="",  # frozen model's dtype in the train step + preview grids: '' = as trained; "bfloat16" on GPU/TPU
            latents="",  # a directory written by `latentdiff encode` ('' = encode images on the fly)
        )
    )
    # concat conditioning (latentdiff/conditioning.py): none / inpaint / sr (configs/ldm_inpaint.py, ldm_sr4.py)
    config.conditioning = ml_collections.ConfigDict(dict(concat="none"))
    config.unet = unet_block(
        in_channels=v["latent_ch"],
        out_channels=v["latent_ch"],
        model_channels=v["mc"],
        channel_mult=v["mult"],
        num_res_blocks=v["nrb"],
        attention_resolutions=v["attn"],
        num_heads=v["heads"],
        num_head_channels=-1,
        context_dim=v["width"],
        dtype="bfloat16" if paper else "float32",
        remat=paper,
    )
    config.text_encoder = text_encoder_block(
        kind="bert",
        vocab_size=v["vocab"],
        max_length=v["length"],
        width=v["width"],
        depth=v["depth"],
        num_heads=v["theads"],
        head_dim=v["hdim"],
        mlp_ratio=4,
        num_classes=0,
        dtype="bfloat16" if paper else "float32",
        remat=paper,
    )
    config.tokenizer = tokenizer_block(
        name_or_path="bert-base-uncased" if paper else "",  # '' = WordPiece built from the training captions
        vocab_size=v["vocab"],
        max_length=v["length"],
    )
    config.diffusion = diffusion_block(
        schedule="linear",
        timesteps=1000,
        linear_start=0.00085,
        linear_end=0.012,
        parameterization=v["param"],
        p_uncond=0.1,  # caption dropout for classifier-free guidance
    )
    config.optim = adamw_block(
        lr=v["lr"],
        weight_decay=0.01,
        warmup_steps=v["warmup"],
        schedule="constant" if paper else "cosine",
    )
    config.ema = ml_collections.ConfigDict(dict(decay=v["ema"], warmup=True))
    config.sampling = ml_collections.ConfigDict(
        dict(
            sampler="ddim",
            steps=250 if paper else 50,
            eta=0.0,
            guidance=v["guidance"],
            prompts=PAPER_TEXT_PROMPTS if paper else EMOJI_PROMPTS if emoji else SHAPES_PROMPTS,
        )
    )
    config.log_every = 50 if paper else 25
    # Evaluation during training (latentdiff/train/ldm_eval.py): FID needs Inception weights (paper: pass
    # --config.evaluation.inception_weights=PATH; `make demo-train` passes the fid-helper file it fetches).
    config.eval_every = 10_000 if paper else 1_500 if emoji else 1_000
    config.evaluation = evaluation_block(
        num_images=2_048 if paper else 64,
        batch_size=256 if paper else 64,
        sampler="ddim",
        steps=50 if paper else 25,
        guidance=v["guidance"],
        seed=0,
        splits=("validation",) if paper else ("validation", "heldout") if emoji else ("validation", "novel"),
        inception_weights="",
    )
    config.image_every = 5_000 if paper else 1_500 if emoji else 1_000
    config.checkpoint_every = 5_000 if paper else 500
    return config
