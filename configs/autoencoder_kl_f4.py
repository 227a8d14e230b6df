"""Stage 1: KL-regularised autoencoder with downsampling factor 4 (LDM-KL-f4), and the demo's first stage.

    python train.py --config configs/autoencoder_kl_f4.py:demo --workdir workdirs/demo/autoencoder
    python train.py --config configs/autoencoder_kl_f4.py:emoji --workdir workdirs/emoji/autoencoder  # emoji-train
    python train.py --config configs/autoencoder_kl_f4.py:paper --workdir /mnt/gcs/ae_kl_f4 \
        --config.data.name=coco_captions --config.loss.lpips_weights=weights/lpips_vgg16.safetensors

Variants:
  demo   (alias tiny) The embedded demo's autoencoder (`make demo-train`): 32 px shapes -> 8x8x4 latents, L1 + KL
         only, Adam 2e-3 for 2500 steps, ~0.95M params. Its reconstructions bound the demo's shape accuracy (blurred
         corners turn small squares into circles): after 1500 steps at 1e-3 they graded 0.90, at 2e-3 0.92, and a
         PatchGAN from step 900 did not help (0.90), so the discriminator is configured but starts after the last
         step; these 2500 steps at 2e-3 grade 0.97 (bench/RESULTS.md, issue 8).
  emoji  The first stage of `make emoji-train` (the Noto emoji set, `latentdiff emoji`): 64 px -> 16x16x3 latents
         (the paper's z 3), the demo's network (ch 32, mult (1,2,2), 1 res block), L1 + KL, batch 16 x 1200
         steps, flips, evaluated on the held-out emoji (data.folder_heldout) with PSNR, LPIPS and rFID.
  paper  The paper's KL-f4: ch 128, ch_mult (1,2,4), 2 res blocks, z 3, 256 px, LPIPS + PatchGAN from step 50001.
"""

import ml_collections

from latentdiff.config_blocks import reconstruction_evaluation_block, run_block
from latentdiff.config_utils import check_variant
from latentdiff.data.input_pipeline import default_data_config

EMOJI_STEPS = 1_200  # make emoji-train: fits its 90-minute budget on 2 CPU cores (bench/RESULTS.md)


def get_config(arg: str = "demo") -> ml_collections.ConfigDict:
    variant = check_variant(arg, {"tiny": 0, "demo": 0, "paper": 1, "emoji": 2}, __file__)
    paper, emoji = variant == 1, variant == 2
    config = run_block(batch_size=96 if paper else 32, num_train_steps=200_000 if paper else 2_500, seed=0)
    config.stage = "autoencoder"

    config.data = default_data_config()
    config.data.name = "shapes"
    config.data.resolution = 256 if paper else 32
    config.data.shapes_num_train = 20_000
    config.data.shapes_num_validation = 1024
    if emoji:  # `latentdiff emoji --out data/emoji` writes both folders
        config.batch_size = 16  # 64 px costs 4x the demo's 32 px per image: more, smaller steps in the same time
        config.num_train_steps = EMOJI_STEPS
        config.data.name = "folder"
        config.data.folder = "data/emoji/train"
        config.data.folder_num_validation = 120  # as stage 2's (its guidance is chosen on these): never trained on
        config.data.folder_heldout = "data/emoji/heldout"
        config.data.eval_split = "heldout"
        config.data.resolution = 64
        config.data.random_flip = True

    config.autoencoder = ml_collections.ConfigDict(
        dict(
            kind="kl",
            in_channels=3,
            out_channels=3,
            resolution=config.data.resolution,
            ch=128 if paper else 32,
            ch_mult=(1, 2, 4) if paper else (1, 2, 2),
            num_res_blocks=2 if paper else 1,
            attn_resolutions=(),
            dropout=0.0,
            z_channels=3 if paper or emoji else 4,
            double_z=True,
            embed_dim=3 if paper or emoji else 4,
            n_embed=0,
            beta=0.25,
            ema_codebook=False,
            ema_decay=0.99,
            dtype="float32",
        )
    )
    config.discriminator = ml_collections.ConfigDict(
        dict(in_channels=3, ndf=64, n_layers=3 if paper else 2, use_batchnorm=True, dtype="float32")
    )
    config.loss = ml_collections.ConfigDict(
        dict(
            perceptual_weight=1.0 if paper else 0.0,
            lpips_weights="",
            lpips_dtype="float32",
            kl_weight=1e-6,
            codebook_weight=1.0,
            disc_weight=0.5,
            disc_factor=1.0,
            disc_start=50_001 if paper else config.num_train_steps + 1,
            disc_loss="hinge",
            logvar_init=0.0,
        )
    )
    config.optim = ml_collections.ConfigDict(
        dict(
            name="adam",
            lr=4.5e-6 * config.batch_size if paper else 2e-3,
            b1=0.5,
            b2=0.9,
            eps=1e-8,
            weight_decay=0.0,
            warmup_steps=0 if paper else 100,
            schedule="constant" if paper else "cosine",
            grad_clip=0.0,
        )
    )
    config.disc_optim = ml_collections.ConfigDict(config.optim.to_dict())
    config.log_every = 50
    config.eval_every = 5_000 if paper else EMOJI_STEPS // 2 if emoji else 500
    # rFID needs the FID Inception weights (e.g. --config.evaluation.inception_weights=pt_inception-...pth)
    config.evaluation = reconstruction_evaluation_block(inception_weights="", lpips_weights="")
    config.image_every = 5_000 if paper else EMOJI_STEPS // 2 if emoji else 500
    config.checkpoint_every = 5_000 if paper else 200 if emoji else 250
    return config
