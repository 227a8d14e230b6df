"""FID (and Inception Score) between generated images and a reference; `latentdiff eval fid` is its command line:

  latentdiff eval fid --generated DIR|NPZ --reference DIR|NPZ|tfds:NAME/SPLIT \
      [--inception_weights weights.safetensors] [--preprocess paper|pytorch_fid|clean] [--batch_size 50] \
      [--save_stats gen_stats.npz] [--json fid.json] \
      [--workdir WORKDIR] [--resolution 256] [--data_dir DIR] [--num_reference 0]

DIR: png/jpg files (unreadable ones are skipped and counted); NPZ: statistics (keys mu, sigma) or uint8 images
(key 'images', [N, H, W, 3]). tfds:NAME/SPLIT (e.g. tfds:coco_captions/validation, tfds:shapes/novel): the split
exactly as the training input pipeline yields it (resize + centre crop to the data resolution): the data config is
the one of --workdir's config.json when given (else latentdiff's defaults), with --resolution / --data_dir overriding.
Weights: pytorch-fid's pt_inception-2015-12-05-*.pth, fid-helper's default_1.pt or a .safetensors made by
`latentdiff convert-inception`; IS needs the fc layer (pytorch-fid weights).
'paper' preprocessing is torch-fidelity's (the LDM paper's protocol); see latentdiff/metrics.py.
Bad input (too few images, mismatched stats, wrong weights): one line on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Iterable, Mapping

import numpy as np

from latentdiff import compile_cache, errors, metrics, progress
from latentdiff.evaluation import references
from latentdiff.evaluation.references import EvalError, ImageSet
from latentdiff.output_paths import check_output_file

IS_SPLITS = 10  # torch-fidelity's isc_splits
Stats = metrics.Stats


KID_SUBSETS = 100  # torch-fidelity's defaults: 100 subsets of 1000 images each (subsets of a smaller set hold
# all of its images, so only the larger set's draws vary: kid_std then understates the spread)
KID_MAX_SUBSET = 1000
KID_SEED = 2020  # torch-fidelity's default seed


def kid_report(features1: np.ndarray, features2: np.ndarray, seed: int = KID_SEED) -> dict[str, float]:
    """{'kid', 'kid_std', 'kid_subset'}: kernel_inception_distance with torch-fidelity's defaults, the subset size
    capped at the smaller set (then every subset holds all of its images)."""
    subset = min(KID_MAX_SUBSET, len(features1), len(features2))
    kid, kid_std = metrics.kernel_inception_distance(features1, features2, KID_SUBSETS, subset, seed)
    return {"kid": kid, "kid_std": kid_std, "kid_subset": subset}


def load_inception_weights(path: str) -> dict:
    """Inception params from any supported file; every failure is one EvalError naming the file and the fix."""
    from latentdiff.convert.inception_weights import load_inception_params

    if not os.path.isfile(path):
        raise EvalError(f"--inception_weights {path}: no such file")
    try:
        return load_inception_params(path)
    except ValueError as e:  # ConversionError: a state dict of the wrong kind
        raise EvalError(str(e).splitlines()[0]) from None
    except Exception as e:  # unreadable container (safetensors header, zip...): same one-line treatment
        raise EvalError(
            f"{path}: cannot read Inception weights ({type(e).__name__}); expected pytorch-fid's "
            "pt_inception-2015-12-05-*.pth, fid-helper's default_1.pt or a .safetensors from "
            "`latentdiff convert-inception`"
        ) from None


def features(
    params: Mapping, chunks: Iterable[np.ndarray], batch_size: int, preprocess: str
) -> tuple[np.ndarray, np.ndarray | None]:
    """Inception pool features [N, 2048] (and unbiased logits [N, 1008] or None) of uint8 chunks [n_i, H, W, 3].

    Every chunk goes through metrics.inception_features with the same batch_size (one compile per image size)."""
    pools, logits = [], []
    for chunk in chunks:
        if len(chunk) == 0:
            continue
        pool, logit = metrics.inception_features(params, chunk, batch_size, preprocess)
        pools.append(pool)
        if logit is not None:
            logits.append(logit)
    if not pools:
        return np.zeros((0, 2048), np.float32), None
    return np.concatenate(pools), (np.concatenate(logits) if logits else None)


def stats_of(feats: np.ndarray, name: str) -> Stats:
    """metrics.stats with the set named in the error: fewer than 2 images is a one-line EvalError."""
    if feats.shape[0] < 2:
        raise EvalError(f"{name}: FID needs at least 2 images, found {feats.shape[0]}; add images to it")
    return metrics.stats(feats)


def fid_between(
    gen: Stats,
    ref: Stats,
    gen_name: str,
    ref_name: str,
    gen_features: np.ndarray | None = None,
    ref_features: np.ndarray | None = None,
) -> float:
    """Fréchet distance with both sets named when their dimensions differ. When a side's features are given and
    it has at most D images (a singular covariance), the exact N x N form metrics.frechet_distance_lowrank is used."""
    if np.shape(gen[0]) != np.shape(ref[0]):
        raise EvalError(
            f"{gen_name} has {np.shape(gen[0])[0]}-d statistics but {ref_name} has {np.shape(ref[0])[0]}-d; both must "
            "be 2048-d pool features of the FID Inception (recompute the stats with latentdiff eval fid --save_stats)"
        )
    dim = np.shape(gen[0])[0]
    small = [(f, other) for f, other in ((gen_features, ref), (ref_features, gen)) if f is not None and len(f) <= dim]
    if small:
        feats, other = min(small, key=lambda p: len(p[0]))
        return metrics.frechet_distance_lowrank(feats, other)
    return metrics.frechet_distance(gen, ref)


def inception_score_of(logits: np.ndarray | None) -> dict:
    """{'inception_score_mean', 'inception_score_std'} over min(10, N) splits; {} without logits (FID-only weights)."""
    if logits is None or logits.shape[0] < 2:
        return {}
    mean, std = metrics.inception_score(logits, min(IS_SPLITS, logits.shape[0]))
    return {"inception_score_mean": mean, "inception_score_std": std}


@dataclasses.dataclass
class SetStats:
    """Statistics of one side; `features` [N, 2048] and `logits` when they were computed here (else None)."""

    stats: Stats
    info: dict
    features: np.ndarray | None
    logits: np.ndarray | None


def set_stats(params: Mapping | None, image_set: ImageSet, batch_size: int, preprocess: str) -> SetStats:
    """SetStats of an ImageSet (features computed with params unless the set holds statistics)."""
    if image_set.stats is not None:
        return SetStats(image_set.stats, {}, None, None)
    if params is None:
        raise EvalError(f"{image_set.name}: --inception_weights is required to compute features of images")
    with progress.phase(f"Inception features of {image_set.name}"):
        pool, logits = features(params, image_set.chunks(), batch_size, preprocess)
    info = {"n_images": int(pool.shape[0]), "skipped": image_set.skipped}
    return SetStats(stats_of(pool, image_set.name), info, pool, logits)


def fid_report(
    params: Mapping | None,
    generated: ImageSet,
    reference: ImageSet,
    *,
    batch_size: int,
    preprocess: str,
    save_stats: str | None = None,
) -> dict:
    """FID of generated vs reference (+ IS of the generated images when the weights have the fc layer, + KID when
    both sides are images, not statistics) -> a dict: fid, n_generated, n_reference, skipped_generated,
    skipped_reference, inception_score_mean / _std, kid / kid_std / kid_subset."""
    result: dict = {"generated": generated.name, "reference": reference.name, "preprocess": preprocess}
    gen = set_stats(params, generated, batch_size, preprocess)
    ref = set_stats(params, reference, batch_size, preprocess)
    for side, info in (("generated", gen.info), ("reference", ref.info)):
        result.update({f"{k.replace('_images', '')}_{side}": v for k, v in info.items()})
    result.update(inception_score_of(gen.logits))
    if save_stats:
        references.save_stats(save_stats, *gen.stats)
    result["fid"] = fid_between(gen.stats, ref.stats, generated.name, reference.name, gen.features, ref.features)
    if gen.features is not None and ref.features is not None and min(len(gen.features), len(ref.features)) >= 2:
        result.update(kid_report(gen.features, ref.features))  # unbiased: fair on a few hundred images
    return result


def format_scores(result: Mapping) -> str:
    """'FID: 12.3456' and, when present, 'KID: 0.012345 ± 0.001 (N images per subset)' and 'IS: 30.1234 ± 0.5'."""
    lines = [f"FID: {result['fid']:.4f}"] if "fid" in result else []
    if "kid" in result:
        lines.append(f"KID: {result['kid']:.6f} ± {result['kid_std']:.6f} ({result['kid_subset']} images per subset)")
    if "inception_score_mean" in result:
        lines.append(f"IS: {result['inception_score_mean']:.4f} ± {result['inception_score_std']:.4f}")
    return "\n".join(lines)


def write_json(path: str, obj: Mapping) -> None:
    from latentdiff.config_utils import atomic_write_text

    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=float))


# -------------------------------------------------------------------------------------------------------- command line


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
    s = references.load_image_set(spec)
    return ("stats", s.stats, 0) if s.stats is not None else ("images", list(s.chunks()), s.skipped)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="latentdiff eval fid", description="FID / IS with the FID Inception-v3 in JAX")
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
    references.check_counts(batch_size=(args.batch_size, 1), num_reference=(args.num_reference, 0))
    for flag in ("json", "save_stats"):
        if getattr(args, flag):
            check_output_file(getattr(args, flag), f"--{flag}")
    data_base = None
    if args.workdir is not None:
        from latentdiff.config_utils import load_workdir_config

        data_base = load_workdir_config(args.workdir).data
    elif references.parse_dataset_spec(args.reference) and args.resolution is None:
        raise EvalError(
            f"{args.reference}: pass --resolution (the training resolution, e.g. 256) or --workdir so the reference "
            "is cropped and resized like the training data"
        )
    tfds_opts = dict(data_base=data_base, resolution=args.resolution, data_dir=args.data_dir, num=args.num_reference)
    generated = references.load_image_set(args.generated, **tfds_opts)
    reference = references.load_image_set(args.reference, **tfds_opts)
    params = None
    if generated.stats is None or reference.stats is None:
        if args.inception_weights is None:
            raise EvalError("--inception_weights is required to compute features of images")
        params = load_inception_weights(args.inception_weights)
    result = fid_report(
        params, generated, reference, batch_size=args.batch_size, preprocess=args.preprocess, save_stats=args.save_stats
    )
    result["inception_weights"] = args.inception_weights
    print(format_scores(result))
    if args.json:
        write_json(args.json, result)
    return result


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    compile_cache.enable()
    try:
        return run(args)
    except errors.user_error_types() as e:  # bad inputs: one line, no traceback, exit status 2
        raise fail(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
