"""FID (and Inception Score) between generated images and a reference.

  python eval/fid.py --generated DIR|NPZ --reference DIR|NPZ|tfds:NAME/SPLIT \
      [--inception_weights weights.safetensors] [--preprocess paper|pytorch_fid|clean] [--batch_size 50] \
      [--save_stats gen_stats.npz] [--json fid.json]

DIR: png/jpg files (unreadable ones are skipped and counted); NPZ: statistics (keys mu, sigma) or uint8 images
(key 'images', [N, H, W, 3]). Weights: pytorch-fid's pt_inception-2015-12-05-*.pth, fid-helper's default_1.pt or
a .safetensors made by `python -m latentdiff.convert.inception_weights`; IS needs the fc layer (pytorch-fid weights).
'paper' preprocessing is torch-fidelity's (the LDM paper's protocol); see latentdiff/metrics.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from latentdiff import metrics


def load_images_or_stats(spec: str) -> tuple[str, object, int]:
    """DIR or .npz -> ('stats', (mu, sigma), 0) or ('images', [uint8 arrays grouped by size], skipped)."""
    if os.path.isdir(spec):
        groups, skipped = metrics.load_image_dir(spec)
        return "images", groups, skipped
    if spec.endswith(".npz") and os.path.isfile(spec):
        kind, value = metrics.read_npz(spec)
        return kind, value, 0
    raise SystemExit(f"error: {spec}: expected a directory of images or an .npz (stats or images)")


def load_reference_images(spec: str) -> tuple[str, object, int]:
    """Hook for reference sets: DIR / .npz now; `tfds:NAME/SPLIT` (images exactly as the data loader yields them,
    through latentdiff.data) is to be added here."""
    if spec.startswith("tfds:"):
        raise SystemExit(f"error: {spec}: tfds references are not supported yet (pass a directory or .npz)")
    return load_images_or_stats(spec)


def main(argv: list[str] | None = None) -> dict:
    try:
        return run(argv)
    except ValueError as e:  # bad inputs (too few images, mismatched stats...): one line, no traceback
        raise SystemExit(f"error: {e}") from None


def run(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description="FID / IS with the FID Inception-v3 in JAX")
    p.add_argument("--generated", required=True, help="DIR of images or .npz (stats or 'images')")
    p.add_argument("--reference", required=True, help="DIR, .npz, or tfds:NAME/SPLIT")
    p.add_argument("--inception_weights", default=None, help="needed unless both inputs are stats")
    p.add_argument("--preprocess", default="paper", choices=metrics.PREPROCESS_MODES)
    p.add_argument("--batch_size", type=int, default=50)
    p.add_argument("--save_stats", default=None, help="write the generated set's mu/sigma here (.npz)")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)

    sides = {"generated": load_images_or_stats(args.generated), "reference": load_reference_images(args.reference)}
    params = None
    if any(kind == "images" for kind, _, _ in sides.values()):
        if args.inception_weights is None:
            raise SystemExit("error: --inception_weights is required to compute features of images")
        from latentdiff.convert.common import ConversionError
        from latentdiff.convert.inception_weights import load_inception_params

        try:
            params = load_inception_params(args.inception_weights)
        except (ConversionError, FileNotFoundError) as e:
            raise SystemExit(f"error: {e}") from None
    result: dict = {"preprocess": args.preprocess, "inception_weights": args.inception_weights}
    stats = {}
    for name, (kind, value, skipped) in sides.items():
        if kind == "stats":
            stats[name] = value
            continue
        pool, logits = metrics.inception_features_of_groups(params, value, args.batch_size, args.preprocess)
        stats[name] = metrics.stats(pool)
        result[f"n_{name}"] = int(pool.shape[0])
        result[f"skipped_{name}"] = skipped
        if name == "generated" and logits is not None:
            splits = min(10, logits.shape[0])
            result["inception_score_mean"], result["inception_score_std"] = metrics.inception_score(logits, splits)
    if args.save_stats:
        metrics.save_stats(args.save_stats, *stats["generated"])
    result["fid"] = metrics.frechet_distance(stats["generated"], stats["reference"])
    print(f"FID: {result['fid']:.4f}")
    if "inception_score_mean" in result:
        print(f"IS: {result['inception_score_mean']:.4f} ± {result['inception_score_std']:.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
