"""The text-to-image table protocol (FID / IS of images generated from a dataset's captions), and `latentdiff eval
txt2img`, its command line.

Protocol: the first `num` examples of the reference split in storage order, one caption per example (a multi-caption
dataset such as coco_captions picks one of its captions with the seed); images generated in shards of `shard_size`
(out/shards/NNNNN.npz, written atomically; a shard whose captions and size match the plan is kept on restart, so runs
resume); initial noise of image i is a function of (seed, i) only, so shards do not depend on the shard size. FID /
IS (torch-fidelity's protocol: 'paper' preprocessing, unbiased logits) against the Inception statistics of the same
examples' reference images.

Pipelines are anything with `__call__(prompts, *, sampler, steps, guidance, eta, seed, batch_size, x_T, progress)
-> uint8 [N, H, W, 3]` (progress: called with the number of images each finished batch adds), `.latent_shape`,
`.resolution`, `.step` and `.config` (latentdiff.pipeline.Pipeline).

Command line (sampling flags not given take the model's config.sampling values; the paper config's are the
protocol's 250 DDIM steps at guidance 1.5):

  latentdiff eval txt2img --workdir DIR --reference tfds:coco_captions/validation --num 30000 --steps 250 \
      --guidance 1.5 --inception_weights pt_inception-2015-12-05-6726825d.pth [--out DIR/eval_txt2img]
  latentdiff eval txt2img --workdir DIR --reference tfds:coco_captions/validation --num 1000 ...   # quick mode

Captions: the first --num examples of the reference split (one caption per image, picked with --seed when the
dataset has several). Images are generated in shards of --shard_size under --out/shards (resumable: finished
shards are kept, so rerunning the command continues), then compared with the Inception statistics of the same
examples' images, read exactly as the training data loader reads them (resize + centre crop at the model's
resolution). Without --inception_weights only the images are generated. Results: printed and --out/results.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from latentdiff import atomic_files, cli_flags, config_utils, errors, metrics
from latentdiff.evaluation import fid, references
from latentdiff.evaluation.references import EvalError, Stats
from latentdiff.output_paths import check_output_dir


@dataclasses.dataclass(frozen=True)
class SampleSettings:
    """Everything that decides the generated images besides the captions (a resumed run must match)."""

    sampler: str
    steps: int
    guidance: float
    eta: float
    seed: int


def sample_settings(args: argparse.Namespace) -> SampleSettings:
    """The sampling flags of an eval command; those not given come from the workdir's config.sampling (the model's
    tuned values: the paper's LDM-KL-8-G 250 DDIM steps at guidance 1.5, the demo's 50 at 2). Checked against the
    model's timesteps before any model loads."""
    from latentdiff.generation import check_sampling_args

    config = config_utils.load_workdir_config(args.workdir)
    cli_flags.fill_sampling_defaults(args, config.sampling)
    check_sampling_args(args.sampler, args.steps, config.diffusion.timesteps, args.guidance, args.eta)
    return SampleSettings(args.sampler, args.steps, args.guidance, args.eta, args.seed)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def generate_with_global_noise(
    pipe: Any,
    captions: Sequence[str],
    start: int,
    settings: SampleSettings,
    batch_size: int,
    progress: Callable[[int], Any] | None = None,
) -> np.ndarray:
    """Images for captions[i] with initial noise of global index start + i (independent of sharding): uint8
    [N, H, W, 3]; `progress(n)` after each batch of n images."""
    import jax.numpy as jnp

    from latentdiff.generation import initial_noise

    x_t = np.asarray(initial_noise(settings.seed, jnp.arange(start, start + len(captions)), pipe.latent_shape))
    return pipe(
        list(captions),
        sampler=settings.sampler,
        steps=settings.steps,
        guidance=settings.guidance,
        eta=settings.eta,
        seed=settings.seed + start,
        batch_size=batch_size,
        x_T=x_t,
        progress=progress,
    )


def shard_path(out: str, index: int) -> str:
    return os.path.join(out, "shards", f"{index:05d}.npz")


def read_shard(path: str, captions: Sequence[str]) -> np.ndarray | None:
    """The images of a finished shard whose stored captions equal `captions`; None when missing / stale / broken."""
    if not os.path.isfile(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            images, stored = f["images"], [str(c) for c in f["captions"]]
    except (OSError, ValueError, KeyError):
        return None
    if stored != list(captions) or images.shape[0] != len(captions) or images.dtype != np.uint8:
        return None
    return images


def write_shard(path: str, images: np.ndarray, captions: Sequence[str], start: int) -> None:
    """Atomic .npz write (temporary file + rename): an interrupted run never leaves half a shard."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic_files.replacing(path, ".npz") as tmp:
        np.savez(tmp, images=images, captions=np.asarray(list(captions), dtype=str), start=np.int64(start))


def generate_shards(
    pipe: Any, captions: Sequence[str], out: str, settings: SampleSettings, shard_size: int, batch_size: int
) -> tuple[list[str], int]:
    """Generates every missing shard of `captions` under out/shards -> (shard paths in order, shards generated)."""
    from tqdm import tqdm

    if shard_size < 1:
        raise EvalError(f"--shard_size must be >= 1, got {shard_size}")
    atomic_files.remove_stale(os.path.join(out, "shards"))  # half-written shards of a killed earlier run
    num_shards, started = -(-len(captions) // shard_size), time.time()
    bounds = [(k * shard_size, min((k + 1) * shard_size, len(captions))) for k in range(num_shards)]
    paths = [shard_path(out, k) for k in range(num_shards)]
    missing = [k for k, (lo, hi) in enumerate(bounds) if read_shard(paths[k], captions[lo:hi]) is None]
    kept = len(captions) - sum(bounds[k][1] - bounds[k][0] for k in missing)
    # ETA from this run's own rate (shards kept from an earlier run are the bar's starting point)
    bar = tqdm(total=len(captions), initial=kept, unit="img", file=sys.stderr, dynamic_ncols=True, desc="txt2img")
    for k in missing:
        lo, hi = bounds[k]
        bar.set_postfix_str(f"shard {k + 1}/{num_shards}")
        # a fixed batch (the last, partial shard is padded by the pipeline): one compiled sampler for every shard
        batch = min(batch_size or shard_size, shard_size)
        images = generate_with_global_noise(pipe, captions[lo:hi], lo, settings, batch, bar.update)
        write_shard(paths[k], images, captions[lo:hi], lo)
    bar.close()
    _log(
        f"txt2img: {len(captions)} images in {num_shards} shards under {os.path.join(out, 'shards')} "
        f"({len(missing)} shards generated by this run, {time.time() - started:.0f} s)"
    )
    return paths, len(missing)


def check_run_settings(out: str, settings: Mapping) -> None:
    """EvalError when `out` holds image shards made with other settings (out/settings.json). Settings left by a run
    that made no image (it failed before its first shard) do not count."""
    path = os.path.join(out, "settings.json")
    shards = os.path.join(out, "shards")
    if not (os.path.isfile(path) and os.path.isdir(shards) and os.listdir(shards)):
        return
    old = config_utils.read_json_file(path, "an earlier run's settings")
    diff = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in settings.items() if old.get(k) != v]
    if diff:
        raise EvalError(
            f"{out} holds images made with other settings ({'; '.join(diff)}); pass another --out or delete it"
        )


def load_captions_and_reference(
    data_cfg: Any,
    ref: references.DatasetRef,
    num: int,
    seed: int,
    out: str,
    params: Mapping | None,
    batch_size: int,
    preprocess: str,
) -> tuple[list[str], Stats | None]:
    """Captions of the first `num` examples of the reference split and (with params) the Inception statistics of
    their images, in one pass over the data; both cached in `out` (captions_n<num>.json,
    reference_stats_n<num>_<preprocess>.npz). The first k captions do not depend on num, so a quick run's shards
    are reused by a longer run in the same `out`."""
    cap_path = os.path.join(out, f"captions_n{num}.json")
    stats_path = os.path.join(out, f"reference_stats_n{num}_{preprocess}.npz")
    captions = None
    if os.path.isfile(cap_path):
        captions = config_utils.read_json_file(cap_path, "cached captions")["captions"]
    need_stats = params is not None and not os.path.isfile(stats_path)
    if captions is None or need_stats:
        captions, pools = [], []
        for images, caps in references.iter_dataset(data_cfg, ref.split, num, seed):
            captions += caps
            if need_stats:
                pools.append(fid.features(params, [images], batch_size, preprocess)[0])
        fid.write_json(cap_path, {"reference": ref.spec, "seed": seed, "captions": captions})
        if need_stats:
            references.save_stats(stats_path, *fid.stats_of(np.concatenate(pools), ref.spec))
    ref_stats = references.load_stats(stats_path) if params is not None else None
    return captions, ref_stats


def run_txt2img(
    pipe: Any,
    *,
    reference: str,
    num: int,
    out: str,
    settings: SampleSettings,
    shard_size: int,
    batch_size: int,
    params: Mapping | None,
    inception_batch_size: int,
    preprocess: str,
    data_dir: str | None = None,
) -> dict:
    """The text-to-image table protocol (module docstring). Returns (and writes out/results.json) a dict with
    fid, inception_score_mean / _std (when weights are given), num, shards, shards_generated, settings."""
    ref = references.caption_reference(reference)
    if num < 2:
        raise EvalError(f"--num must be >= 2 (FID needs at least 2 images), got {num}")
    data_cfg = references.reference_data_config(pipe.config.data, ref, pipe.resolution, data_dir)
    run_settings = {
        **dataclasses.asdict(settings),
        "reference": ref.spec,
        "resolution": int(pipe.resolution),
        "checkpoint_step": int(pipe.step),
    }
    check_run_settings(out, run_settings)
    created = not os.path.exists(out)
    try:  # the reference first (not prepared: nothing left behind); the settings are written before any image
        os.makedirs(out, exist_ok=True)
        captions, ref_stats = load_captions_and_reference(
            data_cfg, ref, num, settings.seed, out, params, inception_batch_size, preprocess
        )
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    fid.write_json(os.path.join(out, "settings.json"), run_settings)
    paths, generated = generate_shards(pipe, captions, out, settings, shard_size, batch_size)
    result: dict = {**run_settings, "num": num, "shards": len(paths), "shards_generated": generated, "out": out}
    if params is None:
        result["fid_skipped"] = "no --inception_weights given"
    else:
        loader = (np.load(p, allow_pickle=False)["images"] for p in paths)
        pool, logits = fid.features(params, loader, inception_batch_size, preprocess)
        gen_stats = fid.stats_of(pool, out)
        references.save_stats(os.path.join(out, f"generated_stats_{preprocess}.npz"), *gen_stats)
        result.update(fid.inception_score_of(logits))
        result["fid"] = fid.fid_between(gen_stats, ref_stats, out, ref.spec, gen_features=pool)
        result["preprocess"] = preprocess
    fid.write_json(os.path.join(out, "results.json"), result)
    return result


# -------------------------------------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="latentdiff eval txt2img", description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True, help="a stage-2 (ldm) workdir")
    p.add_argument("--reference", required=True, help="tfds:NAME/SPLIT with captions (tfds:coco_captions/validation)")
    p.add_argument("--num", type=int, default=30000, help="captions / images (the paper: 30000; quick mode: 1000)")
    cli_flags.add_sampling_flags(p)
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

    references.caption_reference(args.reference)  # fail fast, before loading the model
    check_output_dir(args.out or os.path.join(args.workdir, "eval_txt2img"), "--out")
    references.check_counts(
        num=(args.num, 2),
        shard_size=(args.shard_size, 1),
        batch_size=(args.batch_size, 0),
        inception_batch_size=(args.inception_batch_size, 1),
    )
    settings = sample_settings(args)
    params = None if args.inception_weights is None else fid.load_inception_weights(args.inception_weights)
    result = run_txt2img(
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
    print(fid.format_scores(result) or f"FID skipped: {result['fid_skipped']}")
    print(f"results: {os.path.join(result['out'], 'results.json')}")
    return result


def main(argv: list[str]) -> None:
    arguments = parse_args(argv)
    errors.run_cli(lambda: run(arguments))
