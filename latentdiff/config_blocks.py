"""Config blocks shared by the files in configs/ (values only, no logic), so each experiment file stays short.

Every field a trainer reads is set here or in the config file itself; trainers never invent defaults.
"""

from __future__ import annotations

import ml_collections

# The short keys of the configs' VARIANTS tables (one row per variant, so the variants read side by side) and the
# config field each one sets. tests/test_configs.py checks that every table uses only these keys.
VARIANT_KEYS = {
    "batch": "batch_size (global, per optimizer step)",
    "steps": "num_train_steps",
    "seed": "seed",
    "batch_size": "batch_size",
    "num_train_steps": "num_train_steps",
    "res": "data.resolution (image side, px)",
    "latent_ch": "unet.in_channels / out_channels: the stage-1 latent channels",
    "mc": "unet.model_channels",
    "mult": "unet.channel_mult",
    "nrb": "unet.num_res_blocks",
    "attn": "unet.attention_resolutions (downsampling factors with attention)",
    "heads": "unet.num_heads",
    "head_ch": "unet.num_head_channels (-1: from num_heads)",
    "width": "text_encoder.width (and unet.context_dim)",
    "depth": "text_encoder.depth",
    "theads": "text_encoder.num_heads",
    "hdim": "text_encoder.head_dim",
    "vocab": "tokenizer / text_encoder.vocab_size",
    "length": "tokenizer / text_encoder.max_length",
    "start": "diffusion.linear_start (β_1 of the linear schedule)",
    "end": "diffusion.linear_end (β_T)",
    "param": "diffusion.parameterization (eps / v / x0)",
    "lr": "optim.lr (peak)",
    "warmup": "optim.warmup_steps",
    "ema": "ema.decay",
    "guidance": "sampling.guidance",
}

# Sample-grid prompts (config.sampling.prompts) of the shapes text-to-image models and of the paper's text-to-image
# models (the captions of the paper's Figure 5), shared by configs/ and the converters.
SHAPES_PROMPTS = (
    "a red circle at the top left",
    "a small blue square in the centre",
    "a large green triangle at the bottom right",
    "a yellow circle on a white background",
)
EMOJI_PROMPTS = (  # two training captions, one held-out emoji's, one made up
    "grinning face",
    "red apple",
    "australia flag",
    "a green apple",
)
PAPER_TEXT_PROMPTS = (
    "a painting of a virus monster playing guitar",
    "a street sign that reads latent diffusion",
    "a zombie in the style of picasso",
    "an oil painting of a latent space",
)


def run_block(*, batch_size: int, num_train_steps: int, seed: int) -> ml_collections.ConfigDict:
    """Loop, logging and checkpoint settings common to both stages."""
    return ml_collections.ConfigDict(
        dict(
            seed=seed,
            batch_size=batch_size,  # global batch over all processes and devices
            grad_accum_steps=1,  # micro-batches scanned per update (global batch = batch_size * grad_accum_steps)
            num_train_steps=num_train_steps,
            log_every=50,
            eval_every=1000,
            num_eval_batches=4,
            image_every=1000,  # sample / reconstruction grids
            checkpoint_every=1000,
            keep_checkpoints=3,
            async_checkpointing=True,
            max_consecutive_nonfinite=20,  # stop after this many skipped (non-finite) updates in a row
            progress_bar=True,
            peak_tflops=0.0,  # per device, for MFU in the logs (e.g. 197 for a TPU v4 chip in bf16); 0 = unknown
            profile_start_step=-1,  # >= 0: write a jax.profiler trace of a few steps from here
            profile_num_steps=5,
            mesh=ml_collections.ConfigDict(dict(data=-1, fsdp=1)),
            sharding=ml_collections.ConfigDict(
                dict(
                    rules=(),  # ((regex over 'a/b/kernel', (axis or None, ...)), ...) checked before FSDP
                    fsdp_min_size=2**16,  # params smaller than this stay replicated
                )
            ),
            distributed=ml_collections.ConfigDict(
                dict(
                    coordinator="",
                    num_processes=0,
                    process_id=-1,
                    timeout_s=900,  # every wait for the other processes (start-up, first step) gives up after this
                )
            ),
        )
    )


def merge(*blocks: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Later blocks override earlier ones at the top level."""
    out = ml_collections.ConfigDict()
    for block in blocks:
        for key, value in block.items():
            setattr(out, key, value)
    return out


# ---------------------------------------------------------------------------------------------------- stage 2


def unet_block(
    *,
    in_channels: int,
    out_channels: int,
    model_channels: int,
    channel_mult: tuple[int, ...],
    num_res_blocks: int,
    attention_resolutions: tuple[int, ...],
    num_heads: int,
    num_head_channels: int,
    context_dim: int,
    dtype: str,
    remat: bool,
) -> ml_collections.ConfigDict:
    """config.unet of the LDM configs (fields: latentdiff/nn/unet.py). Fixed here: one transformer block per
    attention level, no label embedding (classes enter through cross-attention), no dropout, conv proj_in/out, XLA
    attention (bench/ and the GPU docs switch to 'cudnn')."""
    return ml_collections.ConfigDict(
        dict(
            in_channels=in_channels,
            out_channels=out_channels,
            model_channels=model_channels,
            channel_mult=channel_mult,
            num_res_blocks=num_res_blocks,
            attention_resolutions=attention_resolutions,
            num_heads=num_heads,
            num_head_channels=num_head_channels,
            transformer_depth=1,
            context_dim=context_dim,
            num_classes=0,
            dropout=0.0,
            use_linear_proj=False,
            dtype=dtype,
            remat=remat,
            attention_impl="xla",
        )
    )


def text_encoder_block(
    *,
    kind: str,
    vocab_size: int,
    max_length: int,
    width: int,
    depth: int,
    num_heads: int,
    head_dim: int,
    mlp_ratio: int,
    num_classes: int,
    dtype: str,
    remat: bool,
) -> ml_collections.ConfigDict:
    """config.text_encoder (fields: latentdiff/nn/text_encoder.py); kind 'none' takes every size as 0."""
    return ml_collections.ConfigDict(
        dict(
            kind=kind,
            vocab_size=vocab_size,
            max_length=max_length,
            width=width,
            depth=depth,
            num_heads=num_heads,
            head_dim=head_dim,
            mlp_ratio=mlp_ratio,
            num_classes=num_classes,
            dtype=dtype,
            remat=remat,
            attention_impl="xla",  # 'pallas_tpu' on TPU (README, Train on a Cloud TPU pod)
        )
    )


def no_text_encoder_block() -> ml_collections.ConfigDict:
    """config.text_encoder of a model without τ_θ (kind 'none': conditioned only through concatenated inputs)."""
    return text_encoder_block(
        kind="none",
        vocab_size=0,
        max_length=0,
        width=0,
        depth=0,
        num_heads=0,
        head_dim=0,
        mlp_ratio=0,
        num_classes=0,
        dtype="float32",
        remat=False,
    )


def tokenizer_block(*, name_or_path: str, vocab_size: int, max_length: int) -> ml_collections.ConfigDict:
    """config.tokenizer: a HF name/path, or '' = WordPiece built from the training captions (0s: no tokenizer)."""
    return ml_collections.ConfigDict(dict(name_or_path=name_or_path, vocab_size=vocab_size, max_length=max_length))


def diffusion_block(
    *,
    schedule: str,
    timesteps: int,
    linear_start: float,
    linear_end: float,
    parameterization: str,
    p_uncond: float,
) -> ml_collections.ConfigDict:
    """config.diffusion: the schedule, the parameterisation and the condition dropout p_uncond (for classifier-free
    guidance; concat inputs are never dropped). Fixed here: uniform loss weights (min_snr_gamma 0 = off; > 0 enables
    min-SNR-γ) and the loss logged in 4 timestep buckets."""
    return ml_collections.ConfigDict(
        dict(
            schedule=schedule,
            timesteps=timesteps,
            linear_start=linear_start,
            linear_end=linear_end,
            parameterization=parameterization,
            min_snr_gamma=0.0,
            p_uncond=p_uncond,
            loss_buckets=4,
        )
    )


def adamw_block(*, lr: float, weight_decay: float, warmup_steps: int, schedule: str) -> ml_collections.ConfigDict:
    """config.optim of stage 2: AdamW (β 0.9 / 0.999, eps 1e-8), global-norm clipping at 1."""
    return ml_collections.ConfigDict(
        dict(
            name="adamw",
            lr=lr,
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            weight_decay=weight_decay,
            warmup_steps=warmup_steps,
            schedule=schedule,
            grad_clip=1.0,
        )
    )


def evaluation_block(
    *,
    num_images: int,
    batch_size: int,
    sampler: str,
    steps: int,
    guidance: float,
    seed: int,
    splits: tuple[str, ...],
    inception_weights: str,
) -> ml_collections.ConfigDict:
    """config.evaluation of stage 2: every eval_every steps the EMA weights generate one image for each of the first
    num_images captions of every split in `splits` (fixed captions and noise), scored and logged (latentdiff/train/
    ldm_eval.py): on the shapes dataset the analytic grader's per-attribute accuracy ('validation' = seen colour-shape
    pairs, 'novel' = held-out pairs), elsewhere against the split of config.data; FID (+ IS when the weights carry
    logits) with inception_weights ('' = none), against the split's statistics cached in workdir/eval/; a grid in
    workdir/images/. num_images 0 = no evaluation during training. Fixed here: eta 0, the paper's FID preprocessing,
    50 images per Inception batch."""
    return ml_collections.ConfigDict(
        dict(
            num_images=num_images,
            batch_size=batch_size,
            sampler=sampler,
            steps=steps,
            guidance=guidance,
            eta=0.0,
            seed=seed,
            splits=splits,
            inception_weights=inception_weights,
            inception_batch_size=50,
            preprocess="paper",
        )
    )


def no_evaluation_block() -> ml_collections.ConfigDict:
    """config.evaluation of models the training-time evaluation does not cover (class-conditional and concat
    models: bench/ and eval/ score them): off."""
    return evaluation_block(
        num_images=0, batch_size=1, sampler="ddim", steps=1, guidance=1.0, seed=0, splits=(), inception_weights=""
    )


def reconstruction_evaluation_block(*, inception_weights: str, lpips_weights: str) -> ml_collections.ConfigDict:
    """config.evaluation of stage 1: every eval_every steps PSNR and LPIPS of the reconstructions of the fixed
    validation batches (num_eval_batches), and rFID (FID of the reconstructions against the originals) with the FID
    Inception weights at inception_weights ('' = no rFID). LPIPS uses the perceptual loss's weights
    (loss.lpips_weights) when the loss has them, else lpips_weights ('' too = no LPIPS: a run without the perceptual
    loss, like the demo's, can still report it). Fixed here: the paper's FID preprocessing, 50 images per Inception
    batch."""
    return ml_collections.ConfigDict(
        dict(
            inception_weights=inception_weights,
            inception_batch_size=50,
            preprocess="paper",
            lpips_weights=lpips_weights,
        )
    )
