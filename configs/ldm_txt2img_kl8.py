"""Stage 2: text-to-image latent diffusion (LDM-KL-8-G of the paper) with a jointly trained transformer τ_θ.

    python train.py --config configs/ldm_txt2img_kl8.py:tiny --workdir workdirs/ldm_tiny \
        --config.first_stage.workdir=workdirs/ae_kl_tiny
    python train.py --config configs/ldm_txt2img_kl8.py:paper --workdir gs://BUCKET/ldm_txt2img \
        --config.first_stage.workdir=gs://BUCKET/ae_kl_f8 --config.data.name=coco_captions

Variants:
  tiny   CPU-sized UNet + text encoder on the shapes dataset at 64 px (8x8x4 latents of autoencoder_kl_f8:tiny).
  paper  The paper's LDM-KL-8-G: UNet 320, ch_mult (1,2,4,4), 2 res blocks, attention at ds 1, 2, 4, 8 heads,
         context 1280 (~872M params); text encoder 32 layers x 1280, 8 heads x 64, length 77, BERT tokenizer
         (~543M params); linear schedule 0.00085..0.012, T 1000, eps; AdamW lr 1e-4, batch 680, 390k steps.
"""

import ml_collections
from ml_collections import config_dict

from latentdiff.config_utils import check_variant
from latentdiff.data.pipeline import default_data_config
from latentdiff.train.config_blocks import run_block


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    variant = check_variant(arg, {"tiny": 0, "paper": 1}, __file__)
    paper = variant == 1
    config = run_block(batch_size=680 if paper else 32, num_train_steps=390_000 if paper else 2_000, seed=0)
    config.stage = "ldm"

    config.data = default_data_config()
    config.data.name = "coco_captions" if paper else "shapes"
    config.data.resolution = 256 if paper else 64
    if paper:
        config.data.image_key = "image"
        config.data.caption_key = "captions/text"

    config.first_stage = ml_collections.ConfigDict(
        dict(
            workdir=config_dict.placeholder(str),  # a trained stage-1 workdir (required on the first run)
            scale_factor=0.18215 if paper else 0.0,  # 0: 1/std of the first batch's latents, stored in the checkpoint
            sample_posterior=True,
        )
    )
    width = 1280 if paper else 64
    config.unet = ml_collections.ConfigDict(
        dict(
            in_channels=4,
            out_channels=4,
            model_channels=320 if paper else 32,
            channel_mult=(1, 2, 4, 4) if paper else (1, 2),
            num_res_blocks=2 if paper else 1,
            attention_resolutions=(4, 2, 1) if paper else (2, 1),
            num_heads=8 if paper else 4,
            num_head_channels=-1,
            transformer_depth=1,
            context_dim=width,
            num_classes=0,
            dropout=0.0,
            use_linear_proj=False,
            dtype="bfloat16" if paper else "float32",
            remat=paper,
            attention_impl="xla",
        )
    )
    config.text_encoder = ml_collections.ConfigDict(
        dict(
            kind="bert",
            vocab_size=30522 if paper else 512,
            max_length=77 if paper else 16,
            width=width,
            depth=32 if paper else 2,
            num_heads=8 if paper else 4,
            head_dim=64 if paper else 16,
            mlp_ratio=4,
            num_classes=0,
            dtype="bfloat16" if paper else "float32",
            remat=paper,
        )
    )
    config.tokenizer = ml_collections.ConfigDict(
        dict(
            name_or_path="bert-base-uncased" if paper else "",  # '' = train WordPiece on the training captions
            vocab_size=config.text_encoder.vocab_size,
            max_length=config.text_encoder.max_length,
        )
    )
    config.diffusion = ml_collections.ConfigDict(
        dict(
            schedule="linear",
            timesteps=1000,
            linear_start=0.00085,
            linear_end=0.012,
            parameterization="eps",
            min_snr_gamma=0.0,  # > 0 enables min-SNR-γ weighting
            p_uncond=0.1,  # caption dropout for classifier-free guidance
            loss_buckets=4,  # loss logged per timestep bucket
        )
    )
    config.optim = ml_collections.ConfigDict(
        dict(
            name="adamw",
            lr=1e-4 if paper else 1e-3,
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            weight_decay=0.01,
            warmup_steps=10_000 if paper else 100,
            schedule="constant" if paper else "cosine",
            grad_clip=1.0,
            flatten=not paper,  # one flat optimizer vector: faster CPU compiles; off where FSDP shards params
        )
    )
    config.ema = ml_collections.ConfigDict(dict(decay=0.9999 if paper else 0.999, warmup=True))
    config.sampling = ml_collections.ConfigDict(
        dict(
            sampler="ddim",
            steps=250 if paper else 50,
            eta=0.0,
            guidance=1.5 if paper else 3.0,
            prompts=(
                "a red circle at the top left",
                "a small blue square in the centre",
                "a large green triangle at the bottom right",
                "a yellow circle on a white background",
            )
            if not paper
            else (
                "a painting of a virus monster playing guitar",
                "a street sign that reads latent diffusion",
                "a zombie in the style of picasso",
                "an oil painting of a latent space",
            ),
        )
    )
    config.log_every = 50 if paper else 25
    config.eval_every = 10**9  # stage 2 evaluates with eval/ scripts
    config.image_every = 5_000 if paper else 500
    config.checkpoint_every = 5_000 if paper else 500
    return config
