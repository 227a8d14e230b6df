"""The stage-1 reconstruction baseline of issue 28: PSNR of bicubic down- and up-sampling that keeps as many values as
the autoencoder's latent (an f-times downsampling with c latent channels keeps (R/f)²·c values; RGB at S × S keeps
S²·3, so S = R/f · sqrt(c/3)).

    python bench/bicubic_baseline.py --folder data/emoji/heldout --factor 4 --channels 3 4

Prints, per latent channel count, the side S and the mean PSNR over the folder's images (PIL bicubic, uint8).
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
from PIL import Image

from latentdiff.data import folder as folder_lib


def psnr_uint8(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 10.0 * math.log10(255.0**2 / max(mse, 1e-10))


def bicubic_psnr(image: Image.Image, side: int) -> float:
    """PSNR of `image` against itself resized to side × side and back (bicubic)."""
    small = image.resize((side, side), Image.Resampling.BICUBIC)
    return psnr_uint8(np.asarray(image), np.asarray(small.resize(image.size, Image.Resampling.BICUBIC)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--folder", required=True, help="a folder dataset (latentdiff/data/folder.py)")
    parser.add_argument("--factor", type=int, required=True, help="the autoencoder's downsampling factor f")
    parser.add_argument("--channels", type=int, nargs="+", required=True, help="latent channel counts c")
    args = parser.parse_args()
    index = folder_lib.scan_folder(args.folder)
    images = [Image.open(f"{index.folder}/{entry.relpath}").convert("RGB") for entry in index.entries]
    resolution = images[0].size[0]
    for channels in args.channels:
        side = round(resolution / args.factor * math.sqrt(channels / 3))
        scores = [bicubic_psnr(image, side) for image in images]
        psnr = round(float(np.mean(scores)), 2)
        print(json.dumps({"channels": channels, "side": side, "images": len(scores), "psnr": psnr}))


if __name__ == "__main__":
    main()
