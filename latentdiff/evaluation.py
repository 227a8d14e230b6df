"""Evaluation protocols behind eval/fid.py, eval/txt2img.py and eval/alignment.py (the scripts only parse flags).

Reference sets ("specs"):
  DIR                 PNG/JPEG files directly in DIR (unreadable ones are skipped and counted)
  FILE.npz            statistics (keys mu, sigma) or uint8 images (key 'images', [N, H, W, 3])
  tfds:NAME/SPLIT     a dataset exactly as the training input pipeline yields it (latentdiff.data.pipeline.make_dataset,
                      eval mode: short side resized to data.resolution with PIL bicubic, centre crop), so the
                      reference is preprocessed like the training data (the known cause of FID that does not
                      reproduce). NAME is a data-config name: shapes, coco_captions, lsun/bedroom, celeb_a_hq/256...;
                      SPLIT may be a TFDS slice (validation[:5000]). E.g. tfds:coco_captions/validation,
                      tfds:shapes/novel.

txt2img protocol (the paper's text-to-image table): the first `num` examples of the reference split in storage order,
one caption per example (a multi-caption dataset such as coco_captions picks one of its captions with the seed);
images generated in shards of `shard_size` (out/shards/NNNNN.npz, written atomically; a shard whose captions and
size match the plan is kept on restart, so runs resume); initial noise of image i is a function of (seed, i) only,
so shards do not depend on the shard size. FID / IS (torch-fidelity's protocol: 'paper' preprocessing, unbiased
logits) against the Inception statistics of the same examples' reference images.

Alignment protocol (shapes): held-out captions of a shapes split (latentdiff.data.shapes.make_examples), one image
per caption, scored by the analytic grader (latentdiff.data.shapes.grade: per-attribute accuracy); the grader's
score of the split's own images is reported beside it as the ceiling; FID against those images when Inception
weights are given.

Pipelines are anything with `__call__(prompts, *, sampler, steps, guidance, eta, seed, batch_size, x_T) -> uint8
[N, H, W, 3]`, `.latent_shape`, `.resolution`, `.step` and `.config` (latentdiff.pipeline.Pipeline).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from latentdiff import atomic_files, config_utils, metrics, progress, sample_set
from latentdiff.errors import UserError

TFDS_PREFIX = "tfds:"
IS_SPLITS = 10  # torch-fidelity's isc_splits
Stats = metrics.Stats


class EvalError(UserError):
    """Bad evaluation input: a one-line message naming the file / flag and the fix."""


# ---------------------------------------------------------------------------------------------------- references


@dataclasses.dataclass(frozen=True)
class DatasetRef:
    """A reference split of a dataset: data-config name (e.g. 'coco_captions', 'lsun/bedroom') and split."""

    name: str
    split: str

    @property
    def spec(self) -> str:
        return f"{TFDS_PREFIX}{self.name}/{self.split}"


def parse_dataset_spec(spec: str) -> DatasetRef | None:
    """'tfds:NAME/SPLIT' -> DatasetRef (NAME may contain '/', the split is after the last one); others -> None."""
    if not spec.startswith(TFDS_PREFIX):
        return None
    name, sep, split = spec[len(TFDS_PREFIX) :].rpartition("/")
    if not sep or not name or not split:
        raise EvalError(f"{spec}: expected tfds:NAME/SPLIT, e.g. tfds:coco_captions/validation or tfds:shapes/novel")
    return DatasetRef(name, split)


def check_counts(**counts: tuple[int, int]) -> None:
    """EvalError naming the first flag whose value is below its minimum: check_counts(num=(args.num, 2), ...)."""
    for flag, (value, minimum) in counts.items():
        if value < minimum:
            raise EvalError(f"--{flag} must be >= {minimum}, got {value}")


def check_sampling_flags(workdir: str, settings: SampleSettings) -> None:
    """The sampler flags against the workdir's config (its number of training timesteps), before any model loads."""
    from latentdiff.sampling import check_sampling_args

    timesteps = config_utils.load_workdir_config(workdir).diffusion.timesteps
    check_sampling_args(settings.sampler, settings.steps, timesteps, settings.guidance, settings.eta)


def caption_reference(spec: str) -> DatasetRef:
    """The dataset reference of txt2img (captions come from it): tfds:NAME/SPLIT only."""
    ref = parse_dataset_spec(spec)
    if ref is None:
        raise EvalError(f"--reference {spec}: expected tfds:NAME/SPLIT, e.g. tfds:coco_captions/validation")
    return ref


def reference_data_config(base: Any, ref: DatasetRef, resolution: int | None, data_dir: str | None) -> Any:
    """The data config that reads `ref`: `base` (a workdir's config.data, or default_data_config()) with name set,
    and resolution / data_dir overridden when given. Checked (one-line DataError for unknown names)."""
    from latentdiff.data.pipeline import check_data_config

    cfg = copy.deepcopy(base)
    if ref.name != cfg.name:  # another dataset than the base's: its own feature mapping
        cfg.image_key = cfg.caption_key = cfg.label_key = "auto"
    cfg.name = ref.name
    if resolution is not None:
        cfg.resolution = resolution
    if data_dir is not None:
        cfg.data_dir = data_dir
    try:
        check_data_config(cfg)
    except ValueError as e:
        raise EvalError(f"{ref.spec}: {e}") from None
    return cfg


def split_size(data_cfg: Any, split: str) -> int:
    """Examples in `split` (prepares shapes / folder data if needed)."""
    from latentdiff.data import named, pipeline

    builder = pipeline.prepare(data_cfg)
    fmt = pipeline.record_format(data_cfg, builder)
    return len(named.open_split(builder, split, fmt.fmap.image_key))


def _largest_divisor(n: int, at_most: int) -> int:
    return max(d for d in range(1, min(n, at_most) + 1) if n % d == 0)


def iter_dataset(
    data_cfg: Any, split: str, num: int, seed: int, max_batch: int = 64
) -> Iterator[tuple[np.ndarray, list[str]]]:
    """The first `num` examples of `split` (0 = all) as make_dataset(train=False) yields them (resize + centre crop
    of data_cfg): (uint8 images [b, R, R, 3], captions [b]). The seed picks among several captions per example."""
    from latentdiff.data.pipeline import make_dataset
    from latentdiff.imaging import to_uint8

    total = split_size(data_cfg, split)
    if num < 0 or num > total:
        raise EvalError(f"{data_cfg.name}/{split} has {total} examples; asked for {num} (use at most {total})")
    num = num or total
    # make_dataset drops a last partial batch in eval mode: a batch size that divides num reads exactly num examples.
    batch = _largest_divisor(num, max_batch)
    it = make_dataset(
        data_cfg,
        split=split,
        tokenizer=None,
        global_batch_size=batch,
        process_index=0,
        process_count=1,
        seed=seed,
        train=False,
    )
    for _ in range(num // batch):
        b = next(it)
        yield to_uint8(b["image"]), [str(c) for c in b["caption"]]


# ---------------------------------------------------------------------------------------------- image sets & stats


@dataclasses.dataclass
class ImageSet:
    """One side of an FID computation: precomputed stats, or chunks of uint8 images [n, H, W, 3] (read lazily)."""

    name: str  # the spec, for messages
    stats: Stats | None
    chunks: Callable[[], Iterable[np.ndarray]] | None
    skipped: int = 0


def load_image_set(
    spec: str, *, data_base: Any = None, resolution: int | None = None, data_dir: str | None = None, num: int = 0
) -> ImageSet:
    """DIR / .npz / tfds:NAME/SPLIT -> ImageSet. `data_base` is the data config a tfds reference starts from
    (default: default_data_config()); `num` limits tfds references to their first num examples (0 = all)."""
    ref = parse_dataset_spec(spec)
    if ref is not None:
        from latentdiff.data.pipeline import default_data_config

        base = default_data_config() if data_base is None else data_base
        cfg = reference_data_config(base, ref, resolution, data_dir)
        split_size(cfg, ref.split)  # now, not after the other side's features: the dataset is prepared, has the split
        return ImageSet(spec, None, lambda: (images for images, _ in iter_dataset(cfg, ref.split, num, 0)))
    if os.path.isdir(spec):  # a sample.py set: exactly the images its manifest lists
        groups, skipped = metrics.load_image_dir(spec, sample_set.set_members(spec))
        return ImageSet(spec, None, lambda: groups, skipped)
    if spec.endswith(".npz") and os.path.isfile(spec):
        try:
            kind, value = metrics.read_npz(spec)
        except ValueError as e:  # wrong keys / dtype: the message already names the file
            raise EvalError(str(e).splitlines()[0]) from None
        except Exception as e:  # not a zip / truncated
            raise EvalError(f"{spec}: not a readable .npz ({type(e).__name__}); write it with numpy.savez") from None
        return ImageSet(spec, value, None) if kind == "stats" else ImageSet(spec, None, lambda: value)
    if not os.path.exists(spec):
        raise EvalError(f"{spec}: no such directory or .npz file (or use tfds:NAME/SPLIT)")
    raise EvalError(f"{spec}: expected a directory of PNG/JPEG images, an .npz (mu/sigma or 'images') or a tfds: spec")


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
            "`python -m latentdiff.convert.inception_weights`"
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
            "be 2048-d pool features of the FID Inception (recompute the stats with eval/fid.py --save_stats)"
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
    """FID of generated vs reference (+ IS of the generated images when the weights have the fc layer) -> a dict:
    fid, n_generated, n_reference, skipped_generated, skipped_reference, inception_score_mean / _std."""
    result: dict = {"generated": generated.name, "reference": reference.name, "preprocess": preprocess}
    gen = set_stats(params, generated, batch_size, preprocess)
    ref = set_stats(params, reference, batch_size, preprocess)
    for side, info in (("generated", gen.info), ("reference", ref.info)):
        result.update({f"{k.replace('_images', '')}_{side}": v for k, v in info.items()})
    result.update(inception_score_of(gen.logits))
    if save_stats:
        metrics.save_stats(save_stats, *gen.stats)
    result["fid"] = fid_between(gen.stats, ref.stats, generated.name, reference.name, gen.features, ref.features)
    return result


def format_scores(result: Mapping) -> str:
    """'FID: 12.3456' and, when present, 'IS: 30.1234 ± 0.5' on a second line."""
    lines = [f"FID: {result['fid']:.4f}"] if "fid" in result else []
    if "inception_score_mean" in result:
        lines.append(f"IS: {result['inception_score_mean']:.4f} ± {result['inception_score_std']:.4f}")
    return "\n".join(lines)


def write_json(path: str, obj: Mapping) -> None:
    from latentdiff.config_utils import atomic_write_text

    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=float))


# ---------------------------------------------------------------------------------------------------- txt2img


@dataclasses.dataclass(frozen=True)
class SampleSettings:
    """Everything that decides the generated images besides the captions (a resumed run must match)."""

    sampler: str
    steps: int
    guidance: float
    eta: float
    seed: int


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def generate_with_global_noise(
    pipe: Any, captions: Sequence[str], start: int, settings: SampleSettings, batch_size: int
) -> np.ndarray:
    """Images for captions[i] with initial noise of global index start + i (independent of sharding): uint8."""
    import jax.numpy as jnp

    from latentdiff.sampling import initial_noise

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
    if shard_size < 1:
        raise EvalError(f"--shard_size must be >= 1, got {shard_size}")
    paths, generated = [], 0
    atomic_files.remove_stale(os.path.join(out, "shards"))  # half-written shards of a killed earlier run
    num_shards, started, done_images = -(-len(captions) // shard_size), time.time(), 0
    for k in range(num_shards):
        start, stop = k * shard_size, min((k + 1) * shard_size, len(captions))
        path = shard_path(out, k)
        paths.append(path)
        if read_shard(path, captions[start:stop]) is not None:
            continue
        # a fixed batch (the last, partial shard is padded by the pipeline): one compiled sampler for every shard
        batch = min(batch_size or shard_size, shard_size)
        with progress.phase(f"shard {k + 1}/{num_shards}: generating {stop - start} images"):
            images = generate_with_global_noise(pipe, captions[start:stop], start, settings, batch)
        write_shard(path, images, captions[start:stop], start)
        generated, done_images = generated + 1, done_images + stop - start
        eta = (len(captions) - stop) * (time.time() - started) / done_images  # this run's rate, compile included
        _log(f"shard {k + 1}/{num_shards}: {stop - start} images -> {path}; ETA {eta:.0f} s")  # time: the line above
    return paths, generated


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
    ref: DatasetRef,
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
        for images, caps in iter_dataset(data_cfg, ref.split, num, seed):
            captions += caps
            if need_stats:
                pools.append(features(params, [images], batch_size, preprocess)[0])
        write_json(cap_path, {"reference": ref.spec, "seed": seed, "captions": captions})
        if need_stats:
            metrics.save_stats(stats_path, *stats_of(np.concatenate(pools), ref.spec))
    ref_stats = metrics.load_stats(stats_path) if params is not None else None
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
    ref = caption_reference(reference)
    if num < 2:
        raise EvalError(f"--num must be >= 2 (FID needs at least 2 images), got {num}")
    data_cfg = reference_data_config(pipe.config.data, ref, pipe.resolution, data_dir)
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
    write_json(os.path.join(out, "settings.json"), run_settings)
    paths, generated = generate_shards(pipe, captions, out, settings, shard_size, batch_size)
    result: dict = {**run_settings, "num": num, "shards": len(paths), "shards_generated": generated, "out": out}
    if params is None:
        result["fid_skipped"] = "no --inception_weights given"
    else:
        loader = (np.load(p, allow_pickle=False)["images"] for p in paths)
        pool, logits = features(params, loader, inception_batch_size, preprocess)
        gen_stats = stats_of(pool, out)
        metrics.save_stats(os.path.join(out, f"generated_stats_{preprocess}.npz"), *gen_stats)
        result.update(inception_score_of(logits))
        result["fid"] = fid_between(gen_stats, ref_stats, out, ref.spec, gen_features=pool)
        result["preprocess"] = preprocess
    write_json(os.path.join(out, "results.json"), result)
    return result


# ---------------------------------------------------------------------------------------------------- alignment


def alignment_examples(pipe: Any, split: str, num: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """Held-out shapes examples at the model's resolution: (uint8 images [num, R, R, 3], captions [num])."""
    from latentdiff.data import shapes

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
    settings: SampleSettings,
    batch_size: int,
    params: Mapping | None,
    inception_batch_size: int,
    preprocess: str,
) -> tuple[dict, np.ndarray, list[str]]:
    """Generates one image per held-out caption and grades it -> (report, generated uint8 images, captions).

    report: {'split', 'num', 'alignment': {attribute: accuracy, 'all', 'num_images', 'num_parsed'},
    'reference_alignment': the grader on the split's own images (the ceiling), 'fid' or 'fid_skipped', settings}.
    """
    from latentdiff.data import shapes

    ref_images, captions = alignment_examples(pipe, split, num, data_seed)
    with progress.phase(
        f"generating {num} images for the {split} captions ({settings.steps} {settings.sampler} steps)"
    ):
        generated = generate_with_global_noise(pipe, captions, 0, settings, batch_size)
    report: dict = {
        "split": split,
        "num": num,
        "data_seed": data_seed,
        "checkpoint_step": int(pipe.step),
        **dataclasses.asdict(settings),
        "alignment": shapes.grade(generated, captions),
        "reference_alignment": shapes.grade(ref_images, captions),
    }
    if params is None:
        report["fid_skipped"] = "no --inception_weights given"
    else:
        gen = ImageSet("generated", None, lambda: [generated])
        ref = ImageSet(f"shapes/{split}", None, lambda: [ref_images])
        scores = fid_report(params, gen, ref, batch_size=inception_batch_size, preprocess=preprocess)
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
