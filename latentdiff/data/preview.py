"""Writes a grid of one batch with its captions underneath, to check the data by eye.

    latentdiff preview --config configs/NAME.py:VARIANT --out preview.png

The config file's get_config(VARIANT) (get_config() without ':VARIANT') must return a ConfigDict with `.data`
(see latentdiff.data.input_pipeline.default_data_config). Data is prepared first if needed.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import textwrap
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from latentdiff import cli_flags, config_utils
from latentdiff.config_utils import apply_overrides
from latentdiff.data.errors import DataError
from latentdiff.errors import UserError
from latentdiff.output_paths import check_output_file

MIN_CELL = 128  # images are enlarged by an integer factor to at least this many pixels
PAD = 6  # pixels between cells and around the grid
TEXT_LINES = 6  # caption lines under each image (longer captions end with "...")
MAX_COLUMNS = 8


def cell_side(resolution: int) -> int:
    """Displayed image side: resolution times the smallest integer zoom reaching MIN_CELL."""
    return resolution * max(1, math.ceil(MIN_CELL / resolution))


def render_grid(images: np.ndarray, captions: Sequence[str]) -> Image.Image:
    """A grid (up to MAX_COLUMNS wide) of images float [N, R, R, 3] in [-1, 1], each with its caption below."""
    n, r = images.shape[0], images.shape[1]
    side = cell_side(r)
    font = ImageFont.load_default()
    line_h = font.getbbox("Ag")[3] + 2
    chars = max(8, int(side // max(font.getlength("x"), 1)))
    cols = min(n, MAX_COLUMNS)
    rows = math.ceil(n / cols)
    cell_h = side + TEXT_LINES * line_h + PAD
    grid = Image.new("RGB", (cols * (side + PAD) + PAD, rows * cell_h + PAD), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    pixels = np.clip(np.rint((images + 1.0) * 127.5), 0, 255).astype(np.uint8)
    for i in range(n):
        x, y = PAD + (i % cols) * (side + PAD), PAD + (i // cols) * cell_h
        grid.paste(Image.fromarray(pixels[i]).resize((side, side), Image.Resampling.NEAREST), (x, y))
        lines = textwrap.wrap(str(captions[i]), chars) or [""]
        if len(lines) > TEXT_LINES:
            lines = [*lines[: TEXT_LINES - 1], lines[TEXT_LINES - 1][: chars - 3] + "..."]
        for j, line in enumerate(lines):
            draw.text((x, y + side + 2 + j * line_h), line, fill=(0, 0, 0), font=font)
    return grid


def preview(config_spec: str, out: str, split: str, num: int, seed: int, augment: bool, overrides: list[str]) -> str:
    """Writes the grid PNG for `num` examples of `split` ('' = data.train_split) of the config with `overrides`
    ("FIELD=VALUE", as train.py's --config.FIELD=VALUE) applied; returns the path."""
    from latentdiff.data.input_pipeline import make_dataset

    config = config_utils.load_config(config_spec)
    apply_overrides(config, overrides)
    if "data" not in config:
        raise DataError(f"config {config_spec} has no .data")
    data_cfg = config.data
    split = split or data_cfg.train_split
    it = make_dataset(
        data_cfg,
        split=split,
        tokenizer=None,
        global_batch_size=num,
        process_index=0,
        process_count=1,
        seed=seed,
        train=augment,
    )
    batch = next(it)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    render_grid(batch["image"], batch["caption"]).save(out)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="latentdiff preview", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="configs/NAME.py[:VARIANT]")
    parser.add_argument("--out", required=True, help="PNG file to write")
    parser.add_argument("--split", default="", help="split to show ('' = data.train_split)")
    parser.add_argument("--num", type=int, default=16, help="number of examples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--augment", action="store_true", help="training-mode random crop / flip (as configured)")
    args, overrides = cli_flags.parse_with_config_overrides(parser, argv)
    try:
        check_output_file(args.out, "--out")
        path = preview(args.config, args.out, args.split, args.num, args.seed, args.augment, overrides)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
