"""The sampling CLI behind sample.py: prompts in, one PNG per image plus a captioned grid out.

python sample.py --workdir workdirs/ldm_tiny --prompt "a red circle at the top left" --n 4 --steps 50

Image modification (one input image for every prompt and sample):
  img2img / SDEdit:  --init_image IMG --strength 0.6 --prompt ...   (runs the last 60 % of the steps from IMG noised)
  inpainting:        --init_image IMG --mask MASK --prompt ...      (MASK: white = repaint, black = keep; any model)
  super-resolution:  --low_res IMG                                   (models with config.conditioning.concat 'sr')
Inputs must have the model's sizes (the resolution; for --low_res the latent grid) or be given --resize.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Any

import numpy as np

from latentdiff import cli_flags, config_utils, errors, sample_set
from latentdiff.errors import UserError
from latentdiff.generation import check_sampling_args
from latentdiff.output_paths import check_output_dir


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="latentdiff sample", description="Generate images with a trained latentdiff model."
    )
    parser.add_argument("--workdir", required=True, help="a stage-2 (ldm) workdir")
    parser.add_argument("--prompt", action="append", default=[], help="a caption (repeatable)")
    parser.add_argument("--prompt_file", default="", help="UTF-8 text file, one caption per line")
    parser.add_argument("--class_label", action="append", type=int, default=[], help="class-conditional models")
    parser.add_argument("--negative_prompt", default="", help='replaces the empty caption "" in guidance')
    parser.add_argument("--n", type=int, default=1, help="images per prompt")
    cli_flags.add_sampling_flags(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True, help="EMA weights (default)")
    parser.add_argument("--batch_size", type=int, default=0, help="images per device batch (0 = all at once)")
    parser.add_argument("--out", default="samples", help="output directory")
    parser.add_argument("--init_image", default="", help="image to modify (img2img, inpainting): PNG/JPEG, RGB")
    parser.add_argument(
        "--strength",
        type=float,
        default=None,
        help="img2img strength in (0, 1]: the fraction of the steps run from the noised input (1 = from pure noise); "
        "required for img2img, default 1 with --mask or an inpainting model",
    )
    parser.add_argument(
        "--mask", default="", help="inpainting mask, same size as --init_image: white (>= 128) = repaint, black = keep"
    )
    parser.add_argument(
        "--blend",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="replace the kept region's latents at every step (default: on, except for concat inpainting models)",
    )
    parser.add_argument(
        "--keep_unmasked",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="paste --init_image back outside the mask, so kept pixels are exactly the input's (default: on)",
    )
    parser.add_argument("--low_res", default="", help="low-resolution input of a super-resolution model")
    parser.add_argument(
        "--height",
        type=int,
        default=None,
        help="output height in pixels (default: the training resolution); any multiple of the model's stride, "
        "larger than the training size included (convolutional sampling); image inputs then have this size",
    )
    parser.add_argument("--width", type=int, default=None, help="output width in pixels (as --height)")
    parser.add_argument("--resize", action="store_true", help="resize inputs to the model's sizes (bicubic)")
    parser.add_argument(
        "--lora",
        default="",
        help="LoRA adapters of the UNet to merge: a diffusers LoRA file (pytorch_lora_weights.safetensors) or its dir",
    )
    parser.add_argument("--lora_scale", type=float, default=1.0, help="strength of --lora (0 = the base model)")
    return parser.parse_args(argv)


def read_prompts(args: argparse.Namespace) -> list[str]:
    """--prompt values then --prompt_file lines; one-line errors for empty or undecodable input."""
    prompts = list(args.prompt)
    if args.prompt_file:
        if not os.path.isfile(args.prompt_file):
            raise FileNotFoundError(f"--prompt_file {args.prompt_file!r} does not exist")
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                lines = [line.strip() for line in f]
        except UnicodeDecodeError as e:
            raise UserError(
                f"--prompt_file {args.prompt_file!r} is not UTF-8 text ({e.reason}); re-save it as UTF-8"
            ) from None
        lines = [line for line in lines if line]
        if not lines:
            raise UserError(f"--prompt_file {args.prompt_file!r} has no prompts (one caption per line)")
        prompts += lines
    return prompts


def validate(args: argparse.Namespace) -> None:
    if args.strength is not None and not 0.0 < args.strength <= 1.0:
        raise UserError(f"--strength must be in (0, 1] (a fraction of the sampling steps), got {args.strength}")
    if args.strength is not None and not args.init_image:
        raise UserError("--strength needs --init_image IMG (the image to modify)")
    if args.mask and not args.init_image:
        raise UserError("--mask needs --init_image IMG (the image whose white mask region is repainted)")
    if args.blend is not None and not args.mask:
        raise UserError("--blend/--no-blend need --mask")
    if args.keep_unmasked is not None and not args.mask:
        raise UserError("--keep_unmasked/--no-keep_unmasked need --mask")
    if args.n < 1:
        raise UserError(f"--n must be >= 1, got {args.n}")
    if args.batch_size < 0:
        raise UserError(f"--batch_size must be >= 0, got {args.batch_size}")
    for name in ("height", "width"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise UserError(f"--{name} must be a positive number of pixels, got {getattr(args, name)}")
    if not os.path.isdir(args.workdir):
        raise FileNotFoundError(f"--workdir {args.workdir!r} does not exist")
    if args.lora and not os.path.exists(args.lora):
        raise FileNotFoundError(f"--lora {args.lora!r} does not exist")
    if not math.isfinite(args.lora_scale):
        raise UserError(f"--lora_scale must be a finite number, got {args.lora_scale}")
    if args.lora_scale != 1.0 and not args.lora:
        raise UserError("--lora_scale needs --lora FILE (the adapters it scales)")
    check_output_dir(args.out, "--out")
    sample_set.check_directory(args.out)
    config = config_utils.load_workdir_config(args.workdir)
    cli_flags.fill_sampling_defaults(args, config.sampling)
    check_sampling_args(args.sampler, args.steps, config.diffusion.timesteps, args.guidance, args.eta)


def read_inputs(args: argparse.Namespace) -> dict[str, np.ndarray]:
    """The input files, read and checked against each other (before the model loads): 'init_image' uint8 [H,W,3],
    'mask' float {0,1} [H,W] (1 = repaint), 'low_res' uint8 [h,w,3]."""
    from latentdiff.imaging import read_image, read_mask

    inputs = {}
    if args.init_image:
        inputs["init_image"] = read_image(args.init_image, "--init_image")
    if args.mask:
        inputs["mask"] = read_mask(args.mask, "--mask")
        (h, w), (hi, wi) = inputs["mask"].shape, inputs["init_image"].shape[:2]
        if (h, w) != (hi, wi):
            raise UserError(
                f"--mask {args.mask!r} is {w}x{h} but --init_image {args.init_image!r} is {wi}x{hi}: "
                "make the mask the same size as the image"
            )
    if args.low_res:
        inputs["low_res"] = read_image(args.low_res, "--low_res")
    return inputs


def fit_inputs(args: argparse.Namespace, inputs: dict[str, np.ndarray], pipe: Any) -> dict[str, np.ndarray]:
    """Checks the inputs against the loaded model (its concat conditioning and sizes); resizes with --resize."""
    from latentdiff.imaging import resize_image, resize_mask

    kind = pipe.concat
    if kind == "inpaint" and not (args.init_image and args.mask):
        raise UserError("this is an inpainting model (concat conditioning): pass --init_image IMG and --mask MASK")
    if kind == "sr" and not args.low_res:
        raise UserError("this is a super-resolution model (concat conditioning): pass --low_res IMG")
    if kind != "sr" and args.low_res:
        raise UserError(f"--low_res is for super-resolution models; this model's concat conditioning is {kind!r}")
    if args.init_image and args.strength is None and not args.mask and kind != "inpaint":
        raise UserError("img2img needs --strength S in (0, 1] (e.g. 0.6: run the last 60 % of the steps)")
    files = {"init_image": args.init_image, "mask": args.mask, "low_res": args.low_res}
    size = pipe.output_size(args.height, args.width)  # one line when not a multiple of the model's stride
    out = {}
    for name, value in inputs.items():
        want = tuple(pipe.low_res_shape_for(size)[:2]) if name == "low_res" else size
        if tuple(value.shape[:2]) != want:
            if not args.resize:
                raise UserError(
                    f"--{name} {files[name]!r} is {value.shape[1]}x{value.shape[0]} but this model needs "
                    f"{want[1]}x{want[0]}: resize it, or pass --resize"
                )
            value = resize_mask(value, want) if name == "mask" else resize_image(value, want)
        out[name] = value
    return out


def run_text(args: argparse.Namespace, pipe: Any) -> dict[str, str]:
    """The settings every image of this run shares: PNG text chunks of each image and the manifest's run settings."""
    text = {
        "seed": str(args.seed),
        "sampler": args.sampler,
        "steps": str(args.steps),
        "eta": str(args.eta),
        "guidance": str(args.guidance),
        "negative_prompt": args.negative_prompt,
        "ema": str(args.ema),
        "checkpoint_step": str(pipe.step),
        "workdir": os.path.abspath(args.workdir),
    }
    for flag in ("init_image", "mask", "low_res"):
        if getattr(args, flag):
            text[flag] = os.path.abspath(getattr(args, flag))
    if args.init_image:
        text["strength"] = str(1.0 if args.strength is None else args.strength)
    if args.mask:
        text["blend"] = str(pipe.concat != "inpaint" if args.blend is None else args.blend)
        text["keep_unmasked"] = str(args.keep_unmasked is None or args.keep_unmasked)
    if args.resize:
        text["resize"] = "True"
    return text


def apply_lora_file(pipe: Any, path: str, lora_scale: float) -> None:
    """Merges a diffusers LoRA file's UNet adapters into the pipeline (keys it cannot map: one line listing them)."""
    from latentdiff.convert import diffusers_lora
    from latentdiff.convert.key_tables import ConversionError

    try:
        state_dict, file_scale = diffusers_lora.read_lora_file(path)
        adapters = diffusers_lora.import_unet_lora(state_dict, pipe.config.unet, file_scale)
    except ConversionError as error:
        raise UserError(f"--lora {path}: {error}") from None
    pipe.apply_lora({"unet": adapters}, lora_scale)


def run(args: argparse.Namespace) -> list[str]:
    """Generates and writes the files; returns the written image paths."""
    from tqdm import tqdm

    from latentdiff.imaging import grid, save_png
    from latentdiff.pipeline import Pipeline

    validate(args)
    prompts = read_prompts(args)
    inputs = read_inputs(args)
    pipe = Pipeline.from_workdir(args.workdir, use_ema=args.ema)
    if args.lora:
        apply_lora_file(pipe, args.lora, args.lora_scale)
    inputs = fit_inputs(args, inputs, pipe)
    if pipe.class_conditional:
        if not args.class_label:
            raise UserError("this model is class-conditional: pass --class_label N (repeatable)")
        conditions: list = list(args.class_label)
    elif pipe.unconditioned:
        if prompts:
            raise UserError("this model takes no prompt (text_encoder.kind 'none'): drop --prompt / --prompt_file")
        conditions = [""]
    else:
        if not prompts and pipe.concat == "none":
            raise UserError("no prompt given: pass --prompt TEXT (repeatable) or --prompt_file FILE")
        conditions = prompts or [""]  # concat-conditioned (inpainting) models may run on the empty caption
    items = [c for c in conditions for _ in range(args.n)]
    check_sampling_args(args.sampler, args.steps, pipe.schedule.num_timesteps, args.guidance, args.eta)
    bar = tqdm(total=len(items), unit="img", file=sys.stderr)
    start = time.perf_counter()
    images = pipe(
        items,
        sampler=args.sampler,
        steps=args.steps,
        guidance=args.guidance,
        eta=args.eta,
        seed=args.seed,
        negative_prompt=args.negative_prompt,
        batch_size=args.batch_size,
        progress=bar.update,
        strength=args.strength,
        blend=args.blend,
        keep_unmasked=args.keep_unmasked,
        height=args.height,
        width=args.width,
        **inputs,
    )
    elapsed = time.perf_counter() - start
    bar.close()
    os.makedirs(args.out, exist_ok=True)
    removed = sample_set.clear_previous(args.out)
    run_settings = run_text(args, pipe)
    key = "prompt" if not pipe.class_conditional else "class_label"
    paths = []
    for i, (condition, image) in enumerate(zip(items, images)):
        path = os.path.join(args.out, sample_set.image_name(i))
        save_png(image, path, {key: str(condition), "index": str(i), **run_settings})
        paths.append(path)
    captions = [str(c) for c in items]
    scale = max(1, 128 // images.shape[1])
    grid_path = os.path.join(args.out, sample_set.GRID)
    os.makedirs(os.path.dirname(grid_path), exist_ok=True)
    save_png(grid(np.asarray(images), captions, columns=min(8, len(items)), scale=scale), grid_path)
    sample_set.write_manifest(args.out, [os.path.basename(p) for p in paths], captions, run_settings)
    replaced = f" (replacing the previous run's {len(removed)})" if removed else ""
    print(
        f"{len(items)} images in {elapsed:.1f} s ({len(items) / elapsed:.2f} images/s, compile included) -> "
        f"{args.out}{replaced}; grid: {grid_path}"
    )
    return paths


def main(argv: list[str]) -> None:
    arguments = parse_args(argv)
    errors.run_cli(lambda: run(arguments))
