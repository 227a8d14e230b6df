"""The stage-1 reconstruction baseline of issue 28: PSNR of bicubic down- and up-sampling that keeps as many values as
the autoencoder's latent (an f-times downsampling with c latent channels keeps (R/f)²·c values; RGB at S × S keeps
S²·3, so S = R/f · sqrt(c/3)). `make emoji-train` reports the same baseline beside its stage-1 PSNR.

    python bench/bicubic_baseline.py --folder data/emoji/heldout --factor 4 --channels 3 4

Prints, per latent channel count, the side S and the mean PSNR over the folder's images (PIL bicubic, uint8).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from PIL import Image

from latentdiff.data import folder as folder_lib
from latentdiff.evaluation import recipe_scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--folder", required=True, help="a folder dataset (latentdiff/data/folder.py)")
    parser.add_argument("--factor", type=int, required=True, help="the autoencoder's downsampling factor f")
    parser.add_argument("--channels", type=int, nargs="+", required=True, help="latent channel counts c")
    args = parser.parse_args()
    index = folder_lib.scan_folder(args.folder)
    images = np.stack([np.asarray(Image.open(f"{index.folder}/{e.relpath}").convert("RGB")) for e in index.entries])
    resolution = images.shape[1]
    for channels in args.channels:
        side = recipe_scores.baseline_side(resolution, args.factor, channels)
        scores = recipe_scores.psnr_per_image(images, recipe_scores.bicubic_round_trip(images, side))
        print(
            json.dumps(
                {"channels": channels, "side": side, "images": len(scores), "psnr": round(float(scores.mean()), 2)}
            )
        )


if __name__ == "__main__":
    main()
