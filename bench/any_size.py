"""The demo model sampled at sizes it was not trained at (32 x 32): text alignment by the shapes grader per size.

    python bench/any_size.py --num 64 --sizes 32x32 32x48 64x64

The UNet and the decoder are convolutional, so any multiple of the model's stride can be sampled (the paper's
convolutional sampling beyond the training size). The captions are the validation ("seen") captions of the shapes set
at the training resolution; positions and sizes in them are relative to the image, which the grader measures at
any size. Prints one JSON line per size ("hxw"): per-attribute accuracy and seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv: list[str]) -> None:
    from latentdiff.data import shapes
    from latentdiff.evaluation import shapes_grader
    from latentdiff.pipeline import Pipeline

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default=os.path.join(ROOT, "demo"))
    parser.add_argument("--num", type=int, default=64, help="seen captions per size")
    parser.add_argument("--sizes", nargs="+", default=["32x32", "32x48", "64x64"], help="HxW in pixels")
    parser.add_argument("--seed", type=int, default=4321)
    args = parser.parse_args(argv)
    pipe = Pipeline.from_workdir(args.workdir)
    s = pipe.config.sampling
    _, captions = shapes.make_examples(args.num, pipe.resolution, "validation", args.seed)
    for size in args.sizes:
        height, width = (int(v) for v in size.lower().split("x"))
        start = time.perf_counter()
        images = pipe(
            list(captions),
            sampler=s.sampler,
            steps=s.steps,
            guidance=s.guidance,
            seed=args.seed,
            batch_size=64,
            height=height,
            width=width,
        )
        grades = shapes_grader.grade(images, captions)
        row = {"hxw": f"{height}x{width}", **{k: round(float(v), 3) for k, v in grades.items()}}
        print(json.dumps(row | {"seconds": round(time.perf_counter() - start, 1)}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
