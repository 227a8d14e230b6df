"""The paper's text-to-image table protocol: FID / IS of a stage-2 model on captions of a reference split.

  python eval/txt2img.py --workdir DIR --reference tfds:coco_captions/validation --num 30000 --steps 250 \
      --guidance 1.5 --inception_weights pt_inception-2015-12-05-6726825d.pth [--out DIR/eval_txt2img]
  python eval/txt2img.py --workdir DIR --reference tfds:coco_captions/validation --num 1000 ...   # quick mode

Captions: the first --num examples of the reference split (one caption per image, picked with --seed when the
dataset has several). Images are generated in shards of --shard_size under --out/shards (resumable: finished
shards are kept, so rerunning the command continues), then compared with the Inception statistics of the same
examples' images, read exactly as the training data loader reads them (resize + centre crop at the model's
resolution). Without --inception_weights only the images are generated. Results: printed and --out/results.json.
Details: latentdiff/evaluation.py.
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
    p = argparse.ArgumentParser(prog="eval/txt2img.py", description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True, help="a stage-2 (ldm) workdir")
    p.add_argument("--reference", required=True, help="tfds:NAME/SPLIT with captions (tfds:coco_captions/validation)")
    p.add_argument("--num", type=int, default=30000, help="captions / images (the paper: 30000; quick mode: 1000)")
    p.add_argument("--steps", type=int, default=250, help="sampler steps (the paper: 250 DDIM steps)")
    p.add_argument("--guidance", type=float, default=1.5, help="classifier-free guidance scale (LDM-KL-8-G: 1.5)")
    p.add_argument("--sampler", choices=SAMPLERS, default="ddim")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta")
    p.add_argument("--seed", type=int, default=0, help="picks the captions and the initial noise")
    p.add_argument("--shard_size", type=int, default=250, help="images per saved shard (the unit of resuming)")
    p.add_argument("--batch_size", type=int, default=25, help="images per sampling call (0 = a whole shard)")
    p.add_argument("--inception_weights", default=None, help="FID Inception weights (else: generation only)")
    p.add_argument("--preprocess", default="paper", choices=metrics.PREPROCESS_MODES)
    p.add_argument("--inception_batch_size", type=int, default=50)
    p.add_argument("--data_dir", default=None, help="TFDS data directory (default: the workdir's data.data_dir)")
    p.add_argument("--out", default=None, help="output directory (default: WORKDIR/eval_txt2img)")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    from latentdiff.pipeline import Pipeline

    evaluation.caption_reference(args.reference)  # fail fast, before loading the model
    check_output_dir(args.out or os.path.join(args.workdir, "eval_txt2img"), "--out")
    evaluation.check_counts(
        num=(args.num, 2),
        shard_size=(args.shard_size, 1),
        batch_size=(args.batch_size, 0),
        inception_batch_size=(args.inception_batch_size, 1),
    )
    settings = evaluation.SampleSettings(args.sampler, args.steps, args.guidance, args.eta, args.seed)
    evaluation.check_sampling_flags(args.workdir, settings)
    params = None if args.inception_weights is None else evaluation.load_inception_weights(args.inception_weights)
    result = evaluation.run_txt2img(
        Pipeline.from_workdir(args.workdir),
        reference=args.reference,
        num=args.num,
        out=args.out or os.path.join(args.workdir, "eval_txt2img"),
        settings=settings,
        shard_size=args.shard_size,
        batch_size=args.batch_size,
        params=params,
        inception_batch_size=args.inception_batch_size,
        preprocess=args.preprocess,
        data_dir=args.data_dir,
    )
    print(evaluation.format_scores(result) or f"FID skipped: {result['fid_skipped']}")
    print(f"results: {os.path.join(result['out'], 'results.json')}")
    return result


if __name__ == "__main__":
    arguments = parse_args(sys.argv[1:])
    errors.run_cli(lambda: run(arguments))
