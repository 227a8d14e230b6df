"""Text alignment on the shapes dataset, and `latentdiff eval alignment`, its command line.

Protocol: held-out captions of a shapes split (latentdiff.data.shapes.make_examples), one image per caption, scored by
the analytic grader (latentdiff.evaluation.shapes_grader.grade: per-attribute accuracy); the grader's score of the
split's own images is reported beside it as the ceiling; FID against those images when Inception weights are given.

Command line (sampling flags not given take the model's config.sampling values):

  latentdiff eval alignment --workdir DIR [--split novel] [--num 512] [--steps 50] [--guidance 3] \
      [--inception_weights pt_inception-2015-12-05-6726825d.pth] [--out DIR/eval_alignment]

Prints the per-attribute accuracy (colour, shape, size, position, background, all) of the generated images next to
the grader's score of the split's own images (the ceiling), plus FID against those images when --inception_weights
is given (else FID is skipped and the report says why). Writes --out/alignment_<split>.json and the images
(--out/alignment_<split>.npz: images, captions).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np

from latentdiff import cli_flags, errors, metrics
from latentdiff.data import shapes
from latentdiff.evaluation import fid, references, shapes_grader, txt2img
from latentdiff.evaluation.references import EvalError
from latentdiff.output_paths import check_output_dir


def alignment_examples(pipe: Any, split: str, num: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """Held-out shapes examples at the model's resolution: (uint8 images [num, R, R, 3], captions [num])."""
    data = pipe.config.data
    if data.name != "shapes":
        raise EvalError(f"alignment is graded on the shapes dataset; this model was trained on {data.name!r}")
    if split not in shapes.SPLITS:
        raise EvalError(f"--split {split!r}: expected one of {', '.join(shapes.SPLITS)}")
    if num < 1:
        raise EvalError(f"--num must be >= 1, got {num}")
    return shapes.make_examples(num, pipe.resolution, split, seed, max_objects=data.shapes_max_objects)


def run_alignment(
    pipe: Any,
    *,
    split: str,
    num: int,
    data_seed: int,
    settings: txt2img.SampleSettings,
    batch_size: int,
    params: Mapping | None,
    inception_batch_size: int,
    preprocess: str,
) -> tuple[dict, np.ndarray, list[str]]:
    """Generates one image per held-out caption and grades it -> (report, generated uint8 images, captions).

    report: {'split', 'num', 'alignment': {attribute: accuracy, 'all', 'num_images', 'num_parsed'},
    'reference_alignment': the grader on the split's own images (the ceiling), 'fid' or 'fid_skipped', settings}.
    """
    ref_images, captions = alignment_examples(pipe, split, num, data_seed)
    from tqdm import tqdm

    desc = f"alignment {split} ({settings.steps} {settings.sampler} steps)"
    with tqdm(total=num, unit="img", file=sys.stderr, dynamic_ncols=True, desc=desc) as bar:  # ETA per batch
        generated = txt2img.generate_with_global_noise(pipe, captions, 0, settings, batch_size, bar.update)
    report: dict = {
        "split": split,
        "num": num,
        "data_seed": data_seed,
        "checkpoint_step": int(pipe.step),
        **dataclasses.asdict(settings),
        "alignment": shapes_grader.grade(generated, captions),
        "reference_alignment": shapes_grader.grade(ref_images, captions),
    }
    if params is None:
        report["fid_skipped"] = "no --inception_weights given"
    else:
        gen = references.ImageSet("generated", None, lambda: [generated])
        ref = references.ImageSet(f"shapes/{split}", None, lambda: [ref_images])
        scores = fid.fid_report(params, gen, ref, batch_size=inception_batch_size, preprocess=preprocess)
        report.update({k: v for k, v in scores.items() if k in ("fid", "preprocess")})
    return report, generated, captions


def format_alignment(report: Mapping) -> str:
    """A small table: attribute, accuracy of the generated images, accuracy on the split's own images."""
    gen, ref = report["alignment"], report["reference_alignment"]
    keys = [k for k in ("colour", "shape", "size", "position", "background", "all") if k in gen]
    lines = [f"{'attribute':<12}{'generated':>10}{'reference':>10}"]
    lines += [f"{k:<12}{gen[k]:>10.3f}{ref.get(k, float('nan')):>10.3f}" for k in keys]
    if "fid" in report:
        lines.append(f"FID vs shapes/{report['split']}: {report['fid']:.4f}")
    else:
        lines.append(f"FID skipped: {report['fid_skipped']}")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="latentdiff eval alignment", description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True, help="a stage-2 (ldm) workdir trained on shapes")
    p.add_argument("--split", default="novel", help="shapes split: novel (unseen colour-shape pairs) or validation")
    p.add_argument("--num", type=int, default=512, help="captions / images")
    cli_flags.add_sampling_flags(p)
    p.add_argument("--seed", type=int, default=0, help="initial noise")
    p.add_argument("--data_seed", type=int, default=None, help="caption sampling (default: the workdir's shapes_seed)")
    p.add_argument("--batch_size", type=int, default=64, help="images per sampling call (0 = all at once)")
    p.add_argument("--inception_weights", default=None, help="FID Inception weights (else FID is skipped)")
    p.add_argument("--preprocess", default="paper", choices=metrics.PREPROCESS_MODES)
    p.add_argument("--inception_batch_size", type=int, default=50)
    p.add_argument("--out", default=None, help="output directory (default: WORKDIR/eval_alignment)")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    import numpy as np

    from latentdiff.pipeline import Pipeline

    check_output_dir(args.out or os.path.join(args.workdir, "eval_alignment"), "--out")
    references.check_counts(
        num=(args.num, 1), batch_size=(args.batch_size, 0), inception_batch_size=(args.inception_batch_size, 1)
    )
    settings = txt2img.sample_settings(args)
    params = None if args.inception_weights is None else fid.load_inception_weights(args.inception_weights)
    pipe = Pipeline.from_workdir(args.workdir)
    data_seed = pipe.config.data.shapes_seed if args.data_seed is None else args.data_seed
    report, images, captions = run_alignment(
        pipe,
        split=args.split,
        num=args.num,
        data_seed=data_seed,
        settings=settings,
        batch_size=args.batch_size,
        params=params,
        inception_batch_size=args.inception_batch_size,
        preprocess=args.preprocess,
    )
    out = args.out or os.path.join(args.workdir, "eval_alignment")
    os.makedirs(out, exist_ok=True)
    fid.write_json(os.path.join(out, f"alignment_{args.split}.json"), report)
    np.savez(os.path.join(out, f"alignment_{args.split}.npz"), images=images, captions=np.asarray(captions, str))
    print(format_alignment(report))
    print(f"report: {os.path.join(out, f'alignment_{args.split}.json')}")
    return report


def main(argv: list[str]) -> None:
    arguments = parse_args(argv)
    errors.run_cli(lambda: run(arguments))
