"""Text alignment on the shapes dataset: generate from held-out captions, grade the images analytically.

  python eval/alignment.py --workdir DIR [--split novel] [--num 512] [--steps 50] [--guidance 3] \
      [--inception_weights pt_inception-2015-12-05-6726825d.pth] [--out DIR/eval_alignment]

Prints the per-attribute accuracy (colour, shape, size, position, background, all) of the generated images next to
the grader's score of the split's own images (the ceiling), plus FID against those images when --inception_weights
is given (else FID is skipped and the report says why). Writes --out/alignment_<split>.json and the images
(--out/alignment_<split>.npz: images, captions). Details: latentdiff/evaluation.py.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import latentdiff  # noqa: F401  (CPU XLA flags, opt-in malloc settings, before JAX starts)
from latentdiff import errors, evaluation, metrics
from latentdiff.output_paths import check_output_dir
from latentdiff.sampling import SAMPLERS


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="eval/alignment.py", description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True, help="a stage-2 (ldm) workdir trained on shapes")
    p.add_argument("--split", default="novel", help="shapes split: novel (unseen colour-shape pairs) or validation")
    p.add_argument("--num", type=int, default=512, help="captions / images")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale")
    p.add_argument("--sampler", choices=SAMPLERS, default="ddim")
    p.add_argument("--eta", type=float, default=0.0)
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
    evaluation.check_counts(
        num=(args.num, 1), batch_size=(args.batch_size, 0), inception_batch_size=(args.inception_batch_size, 1)
    )
    evaluation.check_sampling_flags(
        args.workdir, evaluation.SampleSettings(args.sampler, args.steps, args.guidance, args.eta, args.seed)
    )
    params = None if args.inception_weights is None else evaluation.load_inception_weights(args.inception_weights)
    pipe = Pipeline.from_workdir(args.workdir)
    data_seed = pipe.config.data.shapes_seed if args.data_seed is None else args.data_seed
    report, images, captions = evaluation.run_alignment(
        pipe,
        split=args.split,
        num=args.num,
        data_seed=data_seed,
        settings=evaluation.SampleSettings(args.sampler, args.steps, args.guidance, args.eta, args.seed),
        batch_size=args.batch_size,
        params=params,
        inception_batch_size=args.inception_batch_size,
        preprocess=args.preprocess,
    )
    out = args.out or os.path.join(args.workdir, "eval_alignment")
    os.makedirs(out, exist_ok=True)
    evaluation.write_json(os.path.join(out, f"alignment_{args.split}.json"), report)
    np.savez(os.path.join(out, f"alignment_{args.split}.npz"), images=images, captions=np.asarray(captions, str))
    print(evaluation.format_alignment(report))
    print(f"report: {os.path.join(out, f'alignment_{args.split}.json')}")
    return report


if __name__ == "__main__":
    arguments = parse_args(sys.argv[1:])
    errors.run_cli(lambda: run(arguments))
