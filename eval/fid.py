"""FID (and Inception Score) between generated images and a reference.

  python eval/fid.py --generated DIR|NPZ --reference DIR|NPZ|tfds:NAME/SPLIT \
      [--inception_weights weights.safetensors] [--preprocess paper|pytorch_fid|clean] [--batch_size 50] \
      [--save_stats gen_stats.npz] [--json fid.json] \
      [--workdir WORKDIR] [--resolution 256] [--data_dir DIR] [--num_reference 0]

DIR: png/jpg files (unreadable ones are skipped and counted); NPZ: statistics (keys mu, sigma) or uint8 images
(key 'images', [N, H, W, 3]). tfds:NAME/SPLIT (e.g. tfds:coco_captions/validation, tfds:shapes/novel): the split
exactly as the training input pipeline yields it (resize + centre crop to the data resolution): the data config is
the one of --workdir's config.json when given (else latentdiff's defaults), with --resolution / --data_dir overriding.
Weights: pytorch-fid's pt_inception-2015-12-05-*.pth, fid-helper's default_1.pt or a .safetensors made by
`python -m latentdiff.convert.inception_weights`; IS needs the fc layer (pytorch-fid weights).
'paper' preprocessing is torch-fidelity's (the LDM paper's protocol); see latentdiff/metrics.py.
Bad input (too few images, mismatched stats, wrong weights): one line on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import latentdiff  # noqa: F401  (CPU XLA flags, opt-in malloc settings, before JAX starts)
from latentdiff import compile_cache, errors, evaluation, metrics
from latentdiff.output_paths import check_output_file


class CliExit(SystemExit):
    """Exit status 2 with the one-line message as its text (printed to stderr before raising)."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


def fail(message: str) -> CliExit:
    message = f"error: {message}"
    print(message, file=sys.stderr)
    return CliExit(message)


def load_images_or_stats(spec: str) -> tuple[str, object, int]:
    """DIR or .npz -> ('stats', (mu, sigma), 0) or ('images', [uint8 arrays grouped by size], skipped)."""
    s = evaluation.load_image_set(spec)
    return ("stats", s.stats, 0) if s.stats is not None else ("images", list(s.chunks()), s.skipped)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="FID / IS with the FID Inception-v3 in JAX")
    p.add_argument("--generated", required=True, help="DIR of images or .npz (stats or 'images')")
    p.add_argument("--reference", required=True, help="DIR, .npz, or tfds:NAME/SPLIT")
    p.add_argument("--inception_weights", default=None, help="needed unless both inputs are stats")
    p.add_argument("--preprocess", default="paper", choices=metrics.PREPROCESS_MODES)
    p.add_argument("--batch_size", type=int, default=50, help="Inception batch (one compile per image size)")
    p.add_argument("--save_stats", default=None, help="write the generated set's mu/sigma here (.npz)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--workdir", default=None, help="tfds references: read with this workdir's data config")
    p.add_argument("--resolution", type=int, default=None, help="tfds references: the data resolution")
    p.add_argument("--data_dir", default=None, help="tfds references: the TFDS data directory")
    p.add_argument("--num_reference", type=int, default=0, help="tfds references: first N examples (0 = all)")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    evaluation.check_counts(batch_size=(args.batch_size, 1), num_reference=(args.num_reference, 0))
    for flag in ("json", "save_stats"):
        if getattr(args, flag):
            check_output_file(getattr(args, flag), f"--{flag}")
    data_base = None
    if args.workdir is not None:
        from latentdiff.config_utils import load_workdir_config

        data_base = load_workdir_config(args.workdir).data
    elif evaluation.parse_dataset_spec(args.reference) and args.resolution is None:
        raise evaluation.EvalError(
            f"{args.reference}: pass --resolution (the training resolution, e.g. 256) or --workdir so the reference "
            "is cropped and resized like the training data"
        )
    tfds_opts = dict(data_base=data_base, resolution=args.resolution, data_dir=args.data_dir, num=args.num_reference)
    generated = evaluation.load_image_set(args.generated, **tfds_opts)
    reference = evaluation.load_image_set(args.reference, **tfds_opts)
    params = None
    if generated.stats is None or reference.stats is None:
        if args.inception_weights is None:
            raise evaluation.EvalError("--inception_weights is required to compute features of images")
        params = evaluation.load_inception_weights(args.inception_weights)
    result = evaluation.fid_report(
        params, generated, reference, batch_size=args.batch_size, preprocess=args.preprocess, save_stats=args.save_stats
    )
    result["inception_weights"] = args.inception_weights
    print(evaluation.format_scores(result))
    if args.json:
        evaluation.write_json(args.json, result)
    return result


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    compile_cache.enable()
    try:
        return run(args)
    except errors.user_error_types() as e:  # bad inputs: one line, no traceback, exit status 2
        raise fail(str(e).splitlines()[0] if str(e) else type(e).__name__) from None


if __name__ == "__main__":
    main()
