"""Reference and generated image sets of the evaluation protocols, and the files they are read from.

Specs:
  DIR                 PNG/JPEG files directly in DIR (a sample.py set: exactly the images its manifest lists;
                      unreadable files are skipped and counted)
  FILE.npz            statistics (keys mu, sigma: this module owns that pytorch-fid-compatible format) or uint8
                      images (key 'images', [N, H, W, 3])
  tfds:NAME/SPLIT     a dataset exactly as the training input pipeline yields it
                      (latentdiff.data.input_pipeline.make_dataset, eval mode: short side resized to data.resolution
                      with PIL bicubic, centre crop), so the reference is preprocessed like the training data (the
                      known cause of FID that does not reproduce). NAME is a data-config name: shapes,
                      coco_captions, lsun/bedroom, celeb_a_hq/256...; SPLIT may be a TFDS slice (validation[:5000]).
                      E.g. tfds:coco_captions/validation, tfds:shapes/novel.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from latentdiff import atomic_files, imaging, metrics, sample_set
from latentdiff.errors import UserError

Stats = metrics.Stats


TFDS_PREFIX = "tfds:"


class EvalError(UserError):
    """Bad evaluation input: a one-line message naming the file / flag and the fix."""


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


def caption_reference(spec: str) -> DatasetRef:
    """The dataset reference of txt2img (captions come from it): tfds:NAME/SPLIT only."""
    ref = parse_dataset_spec(spec)
    if ref is None:
        raise EvalError(f"--reference {spec}: expected tfds:NAME/SPLIT, e.g. tfds:coco_captions/validation")
    return ref


def reference_data_config(base: Any, ref: DatasetRef, resolution: int | None, data_dir: str | None) -> Any:
    """The data config that reads `ref`: `base` (a workdir's config.data, or default_data_config()) with name set,
    and resolution / data_dir overridden when given. Checked (one-line DataError for unknown names)."""
    from latentdiff.data.input_pipeline import check_data_config

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
    from latentdiff.data import input_pipeline, named

    builder = input_pipeline.prepare(data_cfg)
    fmt = input_pipeline.record_format(data_cfg, builder)
    return len(named.open_split(builder, split, fmt.fmap.image_key))


def _largest_divisor(n: int, at_most: int) -> int:
    return max(d for d in range(1, min(n, at_most) + 1) if n % d == 0)


def iter_dataset(
    data_cfg: Any, split: str, num: int, seed: int, max_batch: int = 64
) -> Iterator[tuple[np.ndarray, list[str]]]:
    """The first `num` examples of `split` (0 = all) as make_dataset(train=False) yields them (resize + centre crop
    of data_cfg): (uint8 images [b, R, R, 3], captions [b]). The seed picks among several captions per example."""
    from latentdiff.data.input_pipeline import make_dataset
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
        from latentdiff.data.input_pipeline import default_data_config

        base = default_data_config() if data_base is None else data_base
        cfg = reference_data_config(base, ref, resolution, data_dir)
        split_size(cfg, ref.split)  # now, not after the other side's features: the dataset is prepared, has the split
        return ImageSet(spec, None, lambda: (images for images, _ in iter_dataset(cfg, ref.split, num, 0)))
    if os.path.isdir(spec):  # a sample.py set: exactly the images its manifest lists
        groups, skipped = load_image_dir(spec, sample_set.set_members(spec))
        return ImageSet(spec, None, lambda: groups, skipped)
    if spec.endswith(".npz") and os.path.isfile(spec):
        try:
            kind, value = read_npz(spec)
        except ValueError as e:  # wrong keys / dtype: the message already names the file
            raise EvalError(str(e).splitlines()[0]) from None
        except Exception as e:  # not a zip / truncated
            raise EvalError(f"{spec}: not a readable .npz ({type(e).__name__}); write it with numpy.savez") from None
        return ImageSet(spec, value, None) if kind == "stats" else ImageSet(spec, None, lambda: value)
    if not os.path.exists(spec):
        raise EvalError(f"{spec}: no such directory or .npz file (or use tfds:NAME/SPLIT)")
    raise EvalError(f"{spec}: expected a directory of PNG/JPEG images, an .npz (mu/sigma or 'images') or a tfds: spec")


# ------------------------------------------------------------------------------------------------------------ files


def save_stats(path: str, mu: np.ndarray, sigma: np.ndarray) -> None:
    """Writes pytorch-fid-compatible statistics: .npz with keys 'mu' [D] and 'sigma' [D, D], atomically."""
    mu, sigma = metrics.check_stats((mu, sigma), path)
    buffer = io.BytesIO()
    np.savez(buffer, mu=mu, sigma=sigma)
    # atomic (a killed run leaves the old file or none); np.savez's own naming: '.npz' added when missing
    atomic_files.write_bytes(path if path.endswith(".npz") else path + ".npz", buffer.getvalue())


def load_stats(path: str) -> Stats:
    """Reads an .npz with keys 'mu' and 'sigma' (pytorch-fid / ours) -> (mu float64 [D], sigma float64 [D, D])."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such statistics file")
    with np.load(path, allow_pickle=False) as f:
        if "mu" not in f.files or "sigma" not in f.files:
            raise UserError(f"{path}: expected an .npz with keys 'mu' and 'sigma'; found {sorted(f.files)}")
        return metrics.check_stats((f["mu"], f["sigma"]), path)


def load_image_dir(path: str, names: list[str] | None = None) -> tuple[list[np.ndarray], int]:
    """PNG/JPEG files directly in `path` (sorted, not recursive; only `names` when given) -> (uint8 arrays
    [n_i, H_i, W_i, 3] grouped by size, number of unreadable files skipped). Images are converted to RGB as
    pytorch-fid / torch-fidelity do."""
    from PIL import Image

    if names is None:
        names = sorted(f for f in os.listdir(path) if f.lower().endswith(imaging.IMAGE_EXTENSIONS))
    by_size: dict[tuple[int, ...], list[np.ndarray]] = {}
    skipped = 0
    for name in names:
        try:
            with Image.open(os.path.join(path, name)) as im:
                arr = imaging.to_rgb8(im)[0]  # plain 8-bit RGB files: exactly PIL's convert('RGB'), as pytorch-fid
        except (OSError, ValueError):  # unreadable, or a mode to_rgb8 refuses (UserError is a ValueError)
            skipped += 1
            continue
        by_size.setdefault(arr.shape, []).append(arr)
    if skipped:
        warnings.warn(f"{path}: skipped {skipped} unreadable image file(s)", stacklevel=2)
    return [np.stack(v) for v in by_size.values()], skipped


def read_npz(path: str) -> tuple[str, Any]:
    """An .npz of statistics (keys mu, sigma) -> ('stats', (mu, sigma)); of images (key 'images', uint8
    [N, H, W, 3]) -> ('images', [images])."""
    with np.load(path, allow_pickle=False) as f:
        files = set(f.files)
        if {"mu", "sigma"} <= files:
            return "stats", metrics.check_stats((f["mu"], f["sigma"]), path)
        if "images" in files:
            images = f["images"]
            if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
                raise UserError(f"{path}: 'images' must be uint8 [N, H, W, 3]; got {images.dtype} {images.shape}")
            return "images", [images]
    raise UserError(f"{path}: expected an .npz with keys mu/sigma (statistics) or 'images'; found {sorted(files)}")
