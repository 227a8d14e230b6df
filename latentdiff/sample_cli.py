"""The sampling CLI behind sample.py: prompts in, one PNG per image plus a captioned grid out.

python sample.py --workdir workdirs/ldm_tiny --prompt "a red circle at the top left" --n 4 --steps 50
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from latentdiff.sampling import SAMPLERS, check_sampling_args


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="sample.py", description="Generate images with a trained latentdiff model.")
    parser.add_argument("--workdir", required=True, help="a stage-2 (ldm) workdir")
    parser.add_argument("--prompt", action="append", default=[], help="a caption (repeatable)")
    parser.add_argument("--prompt_file", default="", help="UTF-8 text file, one caption per line")
    parser.add_argument("--class_label", action="append", type=int, default=[], help="class-conditional models")
    parser.add_argument("--negative_prompt", default="", help='replaces the empty caption "" in guidance')
    parser.add_argument("--n", type=int, default=1, help="images per prompt")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--sampler", choices=SAMPLERS, default="ddim")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0 deterministic, 1 ancestral)")
    parser.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale (1 = off)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True, help="EMA weights (default)")
    parser.add_argument("--batch_size", type=int, default=0, help="images per device batch (0 = all at once)")
    parser.add_argument("--out", default="samples", help="output directory")
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
            raise ValueError(
                f"--prompt_file {args.prompt_file!r} is not UTF-8 text ({e.reason}); re-save it as UTF-8"
            ) from None
        lines = [line for line in lines if line]
        if not lines:
            raise ValueError(f"--prompt_file {args.prompt_file!r} has no prompts (one caption per line)")
        prompts += lines
    return prompts


def validate(args: argparse.Namespace) -> None:
    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    if args.batch_size < 0:
        raise ValueError(f"--batch_size must be >= 0, got {args.batch_size}")
    if not os.path.isdir(args.workdir):
        raise FileNotFoundError(f"--workdir {args.workdir!r} does not exist")


def run(args: argparse.Namespace) -> list[str]:
    """Generates and writes the files; returns the written image paths."""
    from tqdm import tqdm

    from latentdiff.imaging import grid, save_png
    from latentdiff.pipeline import Pipeline

    validate(args)
    prompts = read_prompts(args)
    pipe = Pipeline.from_workdir(args.workdir, use_ema=args.ema)
    if pipe.class_conditional:
        if not args.class_label:
            raise ValueError("this model is class-conditional: pass --class_label N (repeatable)")
        conditions: list = list(args.class_label)
    else:
        if not prompts:
            raise ValueError("no prompt given: pass --prompt TEXT (repeatable) or --prompt_file FILE")
        conditions = prompts
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
    )
    elapsed = time.perf_counter() - start
    bar.close()
    os.makedirs(args.out, exist_ok=True)
    paths = []
    for i, (condition, image) in enumerate(zip(items, images)):
        path = os.path.join(args.out, f"{i:05d}.png")
        text = {
            "prompt" if not pipe.class_conditional else "class_label": str(condition),
            "seed": str(args.seed),
            "index": str(i),
            "sampler": args.sampler,
            "steps": str(args.steps),
            "eta": str(args.eta),
            "guidance": str(args.guidance),
            "negative_prompt": args.negative_prompt,
            "ema": str(args.ema),
            "checkpoint_step": str(pipe.step),
            "workdir": os.path.abspath(args.workdir),
        }
        save_png(image, path, text)
        paths.append(path)
    captions = [str(c) for c in items]
    scale = max(1, 128 // images.shape[1])
    save_png(
        grid(np.asarray(images), captions, columns=min(8, len(items)), scale=scale), os.path.join(args.out, "grid.png")
    )
    print(
        f"{len(items)} images in {elapsed:.1f} s ({len(items) / elapsed:.2f} images/s, compile included) -> {args.out}"
    )
    return paths
