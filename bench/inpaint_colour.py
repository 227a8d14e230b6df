"""Inpainting with a text-to-image model on shapes: repaint a shape in another colour, graded inside the mask.

    .venv/bin/python bench/inpaint_colour.py --demo_dir demo --num 64 --steps 25 --guidance 3

For `num` validation images (latentdiff.data.shapes.make_examples, one object each), the mask is the box around
the shape (pixels farther than BG_THRESHOLD from the image's median border colour, bounding box grown by MARGIN
pixels), the caption's colour word is replaced by another object colour (index + 1 + i mod 7, so every colour is
asked for), and the demo model inpaints the box (RePaint-style latent blending, strength 1, DDIM, guidance) with the
recoloured caption. Grading inside the mask: every pixel outside the box is set to the input's background colour
(what the kept region shows: the box holds the whole shape), and `shapes_grader.grade` scores the result against the
recoloured caption; its "colour" accuracy is the fraction of images whose repainted object has the new colour.
Also reported (RMS over pixels and RGB, in levels of 255): how much the output differs from the input's reconstruction
D(E(x)) inside the regenerated latent cells, in the kept pixels, and in kept pixels at least one latent cell (f px)
away from the regenerated ones, next to the autoencoder's own error D(E(x)) vs x there; the kept latents equal E(x)
exactly, so the kept pixels move only through the decoder's non-locality (GroupNorm statistics, mid self-attention,
the receptive field of its convolutions). Those numbers describe the raw decoder output (keep_unmasked=False); what
the pipeline returns by default (keep_unmasked=True) pastes the input back outside the mask, and
"max_abs_change_kept_pixels_returned" checks that those pixels equal the input exactly.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time

import numpy as np

import latentdiff  # noqa: F401  (CPU XLA flags before JAX starts)
from latentdiff.data import shapes
from latentdiff.evaluation import shapes_grader

BG_THRESHOLD = 40.0  # RGB distance from the background that counts as "shape" (the grader's rough mask uses 40)
MARGIN = 2  # pixels added around the shape's bounding box


def backgrounds(images: np.ndarray) -> np.ndarray:
    """Median border colour per image: uint8 [N, H, W, 3] -> float [N, 3]."""
    x = images.astype(np.float32)
    border = np.concatenate([x[:, 0], x[:, -1], x[:, 1:-1, 0], x[:, 1:-1, -1]], axis=1)
    return np.median(border, axis=1)


def shape_boxes(images: np.ndarray, margin: int = MARGIN) -> np.ndarray:
    """Masks [N, H, W] float {0, 1}, 1 on the bounding box (grown by `margin`) of the pixels unlike the background."""
    n, h, w, _ = images.shape
    far = np.sqrt(((images.astype(np.float32) - backgrounds(images)[:, None, None]) ** 2).sum(-1)) > BG_THRESHOLD
    masks = np.zeros((n, h, w), np.float32)
    for i in range(n):
        ys, xs = np.nonzero(far[i])
        if len(ys) == 0:
            raise ValueError(f"image {i} shows no shape (nothing differs from its background)")
        top, bottom = max(ys.min() - margin, 0), min(ys.max() + margin + 1, h)
        left, right = max(xs.min() - margin, 0), min(xs.max() + margin + 1, w)
        masks[i, top:bottom, left:right] = 1.0
    return masks


def recolour(captions: list[str]) -> tuple[list[str], list[str]]:
    """Replaces the colour word of caption i by colour (c + 1 + i mod 7) mod 8 -> (new captions, new colours)."""
    names = list(shapes.OBJECT_COLOURS)
    out, colours = [], []
    for i, caption in enumerate(captions):
        found = [w for w in re.findall(r"[a-z]+", caption) if w in shapes.OBJECT_COLOURS]
        if len(found) != 1:
            raise ValueError(f"caption {caption!r} must name exactly one object colour")
        new = names[(names.index(found[0]) + 1 + i % 7) % len(names)]
        out.append(re.sub(rf"\b{found[0]}\b", new, caption))
        colours.append(new)
    return out, colours


def inpaint_colour(
    pipe: object, num: int, *, steps: int, guidance: float, seed: int, sampler: str = "ddim", batch_size: int = 0
) -> dict[str, float]:
    """Runs the benchmark with a loaded Pipeline; returns the measurements (see the module docstring)."""
    images, captions = shapes.make_examples(num, pipe.resolution, "validation", seed)
    masks = shape_boxes(images)
    prompts, _ = recolour(captions)
    run = dict(sampler=sampler, steps=steps, guidance=guidance, seed=seed, init_image=images, mask=masks, strength=1.0)
    start = time.perf_counter()
    out = pipe(prompts, **run, batch_size=batch_size, keep_unmasked=False)  # the raw decoder output
    seconds = time.perf_counter() - start
    returned = pipe(prompts, **run, batch_size=batch_size)  # the default: composited with the input by the mask
    kept_px = masks == 0
    bg = np.rint(backgrounds(images)).astype(np.uint8)[:, None, None, :]
    inside = np.where(masks[..., None] > 0, out, bg)
    graded = shapes_grader.grade(inside, prompts)
    whole = shapes_grader.grade(out, prompts)
    _, rec = pipe.autoencode(images)
    rec = np.clip(np.round((rec + 1.0) * 127.5), 0, 255)
    sq_change = ((out.astype(np.float32) - rec) ** 2).mean(-1)  # [N, H, W], squared levels of 255
    sq_error = ((images.astype(np.float32) - rec) ** 2).mean(-1)  # the autoencoder's own error
    f = pipe.first_stage.downsample_factor
    regenerated = latent_cells(masks, f)  # the pixels of the latent cells the sampler regenerates
    kept, far = regenerated == 0, dilate(regenerated, f) == 0  # far: at least f pixels (one latent cell) away
    return {
        "num_images": float(num),
        "colour_in_mask": graded["colour"],
        "shape_in_mask": graded["shape"],
        "colour_whole_image": whole["colour"],
        "mask_fraction": float(masks.mean()),
        "regenerated_fraction": float(regenerated.mean()),
        "rms_change_inside": rms(sq_change[regenerated > 0]),
        "rms_change_kept": rms(sq_change[kept]),
        "rms_change_kept_far": rms(sq_change[far]),
        "median_image_rms_change_kept": float(np.median([rms(sq_change[i][kept[i]]) for i in range(num)])),
        "rms_reconstruction_error_kept": rms(sq_error[kept]),
        "rms_reconstruction_error_all": rms(sq_error),
        "max_abs_change_kept_pixels_returned": float(
            np.abs(returned.astype(np.int32) - images.astype(np.int32))[kept_px].max()
        ),
        # the same generation run twice; XLA:CPU may round differently between runs, so this is reported, not 0
        "max_abs_change_repainted_pixels_returned_vs_raw": float(
            np.abs(returned.astype(np.int32) - out.astype(np.int32))[~kept_px].max()
        ),
        "seconds": seconds,
    }


def rms(squares: np.ndarray) -> float:
    return float(np.sqrt(squares.mean()))


def latent_cells(masks: np.ndarray, f: int) -> np.ndarray:
    """[N, H, W] -> [N, H, W]: 1 on every f×f cell holding a masked pixel (what `sampling.latent_mask` regenerates)."""
    n, h, w = masks.shape
    cells = masks.reshape(n, h // f, f, w // f, f).max(axis=(2, 4))
    return np.kron(cells, np.ones((1, f, f), masks.dtype))


def dilate(masks: np.ndarray, r: int) -> np.ndarray:
    """Chebyshev dilation by r pixels of masks [N, H, W] (max over a (2r+1)² window)."""
    h, w = masks.shape[1:]
    padded = np.pad(masks, ((0, 0), (r, r), (r, r)))
    return np.max([padded[:, dy : dy + h, dx : dx + w] for dy in range(2 * r + 1) for dx in range(2 * r + 1)], axis=0)


def main(argv: list[str]) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo_dir", default="demo", help="a stage-2 workdir (the shipped demo model)")
    parser.add_argument("--num", type=int, default=64)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--sampler", default="ddim")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from latentdiff.pipeline import Pipeline

    pipe = Pipeline.from_workdir(args.demo_dir)
    result = inpaint_colour(pipe, args.num, steps=args.steps, guidance=args.guidance, seed=args.seed,
                            sampler=args.sampler)  # fmt: skip
    print(json.dumps({**vars(args), **result}))
    return result


if __name__ == "__main__":
    from latentdiff import errors

    errors.run_cli(lambda: main(sys.argv[1:]))
