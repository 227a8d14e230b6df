"""Scores of a model trained on a labelled folder set (the emoji recipe, `latentdiff emoji-train`), as pure functions
of arrays: reconstruction against a bicubic baseline, category accuracy of generated images, FID + KID of feature
sets, and the memorisation ratio.

Images are uint8 [N, H, W, 3]; Inception features float [N, D] (latentdiff.evaluation.fid.features).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image

from latentdiff import metrics
from latentdiff.errors import UserError
from latentdiff.evaluation.fid import kid_report


def psnr_per_image(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """PSNR in dB [N] of uint8 image pairs [N, H, W, 3] (peak 255; identical images are capped at 100 dB)."""
    diff = a.astype(np.float64) - b.astype(np.float64)
    mse = np.mean(diff**2, axis=(1, 2, 3))
    return 10.0 * np.log10(255.0**2 / np.maximum(mse, 255.0**2 * 1e-10))


def baseline_side(resolution: int, factor: int, channels: int) -> int:
    """Side S of the RGB image holding as many values as an f-downsampled latent with c channels:
    S² · 3 = (R / f)² · c."""
    return round(resolution / factor * math.sqrt(channels / 3))


def bicubic_round_trip(images: np.ndarray, side: int) -> np.ndarray:
    """images uint8 [N, R, R, 3] resized to side × side and back to R × R with PIL's bicubic filter."""
    out = []
    for image in images:
        pil = Image.fromarray(image)
        small = pil.resize((side, side), Image.Resampling.BICUBIC)
        out.append(np.asarray(small.resize(pil.size, Image.Resampling.BICUBIC)))
    return np.stack(out)


def category_scores(probabilities: np.ndarray, labels: np.ndarray, base: np.ndarray) -> dict[str, float]:
    """How often generated images show their caption's category, by a classifier's probabilities [N, C] and the
    captions' label ids [N]. `base` [N] bool marks base emoji (not skin-tone variants): 'base_accuracy' and its
    'base_chance' (the frequency of the most common category among them) are the fair pair where one category is
    inflated by variants. 'balanced_accuracy' weighs every category present equally (chance 1 / categories)."""
    correct = probabilities.argmax(axis=-1) == labels
    present = np.unique(labels)

    def most_common_share(selected: np.ndarray) -> float:
        return float(np.bincount(selected).max() / len(selected)) if len(selected) else float("nan")

    return {
        "accuracy": float(correct.mean()),
        "chance": most_common_share(labels),
        "balanced_accuracy": float(np.mean([correct[labels == k].mean() for k in present])),
        "balanced_chance": 1.0 / len(present),
        "base_accuracy": float(correct[base].mean()) if base.any() else float("nan"),
        "base_chance": most_common_share(labels[base]),
        "images": len(labels),
        "base_images": int(base.sum()),
    }


def fid_and_kid(features: np.ndarray, reference: np.ndarray, seed: int) -> dict[str, float]:
    """FID and KID (fid.kid_report: unbiased, polynomial kernel, torch-fidelity's subsets) between two feature
    sets [N, D], [M, D]."""
    fid = metrics.frechet_distance(metrics.stats(features), metrics.stats(reference))
    return {"fid": float(fid), **kid_report(features, reference, seed)}


def nearest(query: np.ndarray, reference: np.ndarray, chunk: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """(Euclidean distance [N], index [N]) of each query row's nearest reference row (features [N, D], [M, D])."""
    if len(reference) == 0:
        raise UserError("the nearest-neighbour search needs at least one reference feature")
    ref = np.asarray(reference, np.float64)
    ref_sq = np.sum(ref**2, axis=1)
    distances, indices = [], []
    for start in range(0, len(query), chunk):
        q = np.asarray(query[start : start + chunk], np.float64)
        squared = np.sum(q**2, axis=1)[:, None] - 2.0 * q @ ref.T + ref_sq[None, :]
        best = np.argmin(squared, axis=1)
        distances.append(np.sqrt(np.maximum(squared[np.arange(len(q)), best], 0.0)))
        indices.append(best)
    return np.concatenate(distances), np.concatenate(indices)


def memorisation(generated: np.ndarray, heldout: np.ndarray, train: np.ndarray) -> dict[str, float]:
    """Nearest-training-image distances in feature space: generated images vs real held-out images (which the
    model never saw). ratio = median(generated) / median(held-out): near 1 or above, generated images are as far
    from the training set as new real images are (no sign of copying); well below 1 (e.g. < 0.5), they sit on
    training images (memorised). 'copies' counts generated images closer to a training image than the closest
    held-out real image is to any (by chance alone about N_generated / (N_heldout + 1) when nothing is copied)."""
    gen_d, _ = nearest(generated, train)
    held_d, _ = nearest(heldout, train)
    held_median = float(np.median(held_d))  # 0 only when held-out images duplicate training images
    return {
        "generated_median": float(np.median(gen_d)),
        "heldout_median": held_median,
        "ratio": float(np.median(gen_d)) / held_median if held_median > 0 else float("nan"),
        "copies": int(np.sum(gen_d < held_d.min())),
    }


def pick_guidance(accuracy_by_scale: dict[float, float]) -> float:
    """The guidance scale with the highest score (the smallest such scale on ties)."""
    return min(accuracy_by_scale, key=lambda s: (-accuracy_by_scale[s], s))


def is_base_caption(captions: Sequence[str]) -> np.ndarray:
    """bool [N]: captions of base emoji (a skin-tone variant's caption ends in 'skin tone', `latentdiff emoji`)."""
    return np.asarray([not caption.endswith("skin tone") for caption in captions])
