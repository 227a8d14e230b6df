"""Input pipeline: TFDS ArrayRecord data sources read by grain (no TensorFlow), sharded per process.

    builder = prepare(config.data)                           # generate / check the prepared data (idempotent)
    tok = make_tokenizer(config.tokenizer, config.data, save_dir=workdir + "/tokenizer")
    it = make_dataset(config.data, split=config.data.train_split, tokenizer=tok, global_batch_size=256,
                      process_index=jax.process_index(), process_count=jax.process_count(), seed=0, train=True)
    batch = next(it)  # {"image": f32 [b, R, R, 3] in [-1, 1], "tokens": i32 [b, L], "caption": str [b], ("label")}
    state = it.get_state()  # JSON-serialisable; it.set_state(state) resumes exactly

Each process reads a disjoint contiguous shard of the split (grain ShardOptions, drop_remainder: every shard has
floor(N / process_count) records) and gets global_batch_size // process_count examples per batch.
train=True: infinite, reshuffled every epoch with the seed, random crop / flip when the config asks.
train=False: one pass in storage order, centre crop, and the last partial batch is DROPPED (every process yields the
same number of batches, `DataIterator.num_batches`); call make_dataset again for another pass.
The same (config, split, seed, process, num_workers) gives byte-identical batches; the worker count changes which
examples share a batch (grain batches inside each worker), and a saved state restores only with the same count.
In training each process reshuffles only its own shard (no exchange of examples between processes).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import ml_collections
import numpy as np
from PIL import Image

from latentdiff.data import named
from latentdiff.data import shapes as shapes_lib
from latentdiff.data.errors import DataError, DataWarning
from latentdiff.data.named import FeatureMap
from latentdiff.data.tokenizer import Tokenizer, is_tokenizer_dir, load_tokenizer, train_wordpiece

_SHAPES_MAP = FeatureMap(image_key="image", caption_key="caption", label_key="label", name_key="")


def default_data_config() -> ml_collections.ConfigDict:
    """Every data field with its default; configs start from this and override (read as config.data).

    name: 'shapes' (built-in procedural dataset), 'folder' (data.folder) or a TFDS name from
        latentdiff.data.named.NAMED_DATASETS (coco_captions, imagenet2012, celeb_a_hq/256, lsun/bedroom, ...).
    data_dir: TFDS data directory for prepared data ('' = TFDS default, ~/tensorflow_datasets or $TFDS_DATA_DIR).
    folder: directory of captioned images, for name='folder' (layout: latentdiff.data.folder).
    folder_num_validation: images of the folder held out as split 'validation' (0 = only 'train').
    folder_heldout: a second folder (same layout) prepared as split 'heldout', never trained on ('' = none): e.g.
        images of subjects absent from data.folder; its label names join the folder's.
    resolution: side of the square training images (short side resized to it, then cropped).
    image_key, caption_key, label_key: feature paths for named TFDS datasets ('auto' = the table's mapping;
        caption_key/label_key '' = none). A TFDS name outside the table needs all three set.
    download: named TFDS datasets only: let prepare() download and prepare missing data (needs the tf extra).
    train_split, eval_split: split names (shapes: train / validation / novel; TFDS slices like 'train[:1000]' work).
    random_crop: training crops at a random place (else centre); random_flip: training flips left-right half the
        time (not allowed for shapes, whose captions say left/right).
    shapes_num_train, shapes_num_validation, shapes_num_novel: examples per shapes split.
    shapes_max_objects: objects per shapes image (1 = exactly one; K > 1 = 1..K).
    shapes_seed: seed of the shapes generator (part of the prepared dataset's name).
    num_workers: grain worker processes (0 = decode and augment in the main process).
    read_threads, read_prefetch: threads fetching records from the ArrayRecord files, and records fetched ahead, per
        process (grain ReadOptions; raise both for remote storage, e.g. 16 / 500).
    tokenizer_corpus_examples: at most this many examples of train_split are read to build the WordPiece vocabulary.
    """
    c = ml_collections.ConfigDict()
    c.name = "shapes"
    c.data_dir = ""
    c.folder = ""
    c.folder_num_validation = 0
    c.folder_heldout = ""
    c.resolution = 32
    c.image_key = named.AUTO
    c.caption_key = named.AUTO
    c.label_key = named.AUTO
    c.download = False
    c.train_split = "train"
    c.eval_split = "validation"
    c.random_crop = False
    c.random_flip = False
    c.shapes_num_train = 20000
    c.shapes_num_validation = 1024
    c.shapes_num_novel = 1024
    c.shapes_max_objects = 1
    c.shapes_seed = 0
    c.num_workers = 0
    c.read_threads = 4
    c.read_prefetch = 64
    c.tokenizer_corpus_examples = 100000
    return c


def check_data_config(data_cfg: ml_collections.ConfigDict) -> None:
    """Raises DataError (one line) for a data config that cannot work."""
    missing = [k for k in default_data_config() if k not in data_cfg]
    if missing:
        raise DataError(f"data config lacks {', '.join(missing)}; start from default_data_config()")
    if data_cfg.name not in ("shapes", "folder"):
        named.resolve_feature_map(data_cfg.name, data_cfg.image_key, data_cfg.caption_key, data_cfg.label_key)
    if data_cfg.resolution < 8:
        raise DataError(f"data.resolution={data_cfg.resolution} is too small (>= 8)")
    if data_cfg.folder_heldout and data_cfg.name != "folder":
        raise DataError(f"data.folder_heldout is for data.name='folder', not {data_cfg.name!r}; set it to ''")
    if data_cfg.name == "shapes" and data_cfg.random_flip:
        raise DataError("data.random_flip would contradict the left/right in shapes captions; set it to False")
    for field in ("num_workers", "read_threads", "read_prefetch"):
        if data_cfg[field] < 0:
            raise DataError(f"data.{field}={data_cfg[field]} must be >= 0")


# ------------------------------------------------------------------------------------------------- preparation


def prepare(data_cfg: ml_collections.ConfigDict):
    """Generates (shapes, folder) or checks (named TFDS) the prepared ArrayRecord data; returns the TFDS builder.

    Idempotent: prepared data under data_cfg.data_dir is reused. Processes that share a data_dir (the processes of
    a multi-host run on one machine, or hosts on one network filesystem) take turns through a lock file in it: the
    first generates, the others then find the data prepared (TFDS would otherwise fail renaming its temporary
    directory onto the one another process just wrote). Object stores (gs://) have no file locks: prepare such a
    data_dir from one process before the launch.
    """
    check_data_config(data_cfg)
    with _preparation_lock(data_cfg.data_dir):
        return _prepare(data_cfg)


PREPARE_LOCK = ".latentdiff-prepare.lock"  # the lock file `prepare` leaves in a data_dir (empty; not data)


def _preparation_lock(data_dir: str) -> Any:
    """An exclusive lock file in data_dir (TFDS's default ~/tensorflow_datasets when empty); none for URLs."""
    import contextlib

    import filelock

    if "://" in data_dir:
        return contextlib.nullcontext()
    directory = os.path.expanduser(data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets"))
    os.makedirs(directory, exist_ok=True)
    return filelock.FileLock(os.path.join(directory, PREPARE_LOCK))


def _prepare(data_cfg: ml_collections.ConfigDict):
    from latentdiff.data import tfds_builders

    data_dir = data_cfg.data_dir or None
    if data_cfg.name == "shapes":
        config = tfds_builders.shapes_config(
            data_cfg.resolution,
            data_cfg.shapes_num_train,
            data_cfg.shapes_num_validation,
            data_cfg.shapes_num_novel,
            data_cfg.shapes_max_objects,
            data_cfg.shapes_seed,
        )
        builder = tfds_builders.LatentdiffShapes(config=config, data_dir=data_dir, file_format="array_record")
    elif data_cfg.name == "folder":
        config = tfds_builders.folder_config(data_cfg.folder, data_cfg.folder_num_validation, data_cfg.folder_heldout)
        builder = tfds_builders.LatentdiffFolder(config=config, data_dir=data_dir, file_format="array_record")
    else:
        return named.open_builder(data_cfg.name, data_cfg.data_dir, data_cfg.download)
    prepare_or_clean_up(builder)
    return builder


def prepare_or_clean_up(builder) -> None:
    """builder.download_and_prepare; when it fails (e.g. no readable image), the directories this attempt created
    are removed again, so no empty prepared dataset is left behind to be mistaken for data."""
    version_dir = os.path.abspath(builder.data_dir)
    candidates = [version_dir]
    while os.path.dirname(candidates[-1]) != candidates[-1]:
        candidates.append(os.path.dirname(candidates[-1]))
    candidates = candidates[:3]  # <data_dir>/<dataset>/<config>/<version>: the dataset-owned levels
    downloads = os.path.join(os.path.dirname(candidates[-1]), "downloads")
    new_dirs = [d for d in [*candidates, downloads] if not os.path.exists(d)]
    try:
        builder.download_and_prepare(file_format="array_record")
    except BaseException:
        for directory in new_dirs:  # deepest first; only what this attempt created
            shutil.rmtree(directory, ignore_errors=True)
        raise


@dataclasses.dataclass(frozen=True)
class RecordFormat:
    """How to read one dataset's records: feature map and the label's class names."""

    fmap: FeatureMap
    label_names: tuple[str, ...]


def record_format(data_cfg: ml_collections.ConfigDict, builder) -> RecordFormat:
    if data_cfg.name == "shapes":
        return RecordFormat(_SHAPES_MAP, shapes_lib.class_names())
    if data_cfg.name == "folder":
        has_label = "label" in builder.info.features
        fmap = FeatureMap("image", "caption", "label" if has_label else "", "filename")
        return RecordFormat(fmap, named.label_names_of(builder, fmap.label_key))
    fmap = named.resolve_feature_map(data_cfg.name, data_cfg.image_key, data_cfg.caption_key, data_cfg.label_key)
    return RecordFormat(fmap, named.label_names_of(builder, fmap.label_key))


# ------------------------------------------------------------------------------------------------- preprocessing


def decode_image(data: Any, name: str) -> Image.Image:
    """An RGB PIL image from encoded bytes (or a uint8 array [H, W, C])."""
    if isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 3:
        return Image.fromarray(data if data.shape[-1] == 3 else data[..., :1].repeat(3, -1))
    try:
        with Image.open(io.BytesIO(bytes(data))) as img:
            return img.convert("RGB")
    except (OSError, ValueError, SyntaxError) as err:
        raise DataError(f"cannot decode image {name}: {err}") from None


def preprocess_image(
    img: Image.Image, resolution: int, random_crop: bool, flip: bool, rng: np.random.Generator, name: str
) -> np.ndarray:
    """Resize the short side to `resolution` (bicubic), crop a square (random or centre), maybe flip.

    Returns float32 [R, R, 3] in [-1, 1]. A short side below `resolution` is upscaled with a DataWarning naming it.
    """
    w, h = img.size
    short = min(w, h)
    if short < resolution:
        warnings.warn(
            f"image {name} ({w}x{h}) is smaller than resolution {resolution}; upscaling it", DataWarning, stacklevel=2
        )
    if short != resolution:
        scale = resolution / short
        size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
        img = img.resize(size, Image.Resampling.BICUBIC)
    arr = np.asarray(img, dtype=np.uint8)
    hh, ww = arr.shape[:2]
    if random_crop:
        top, left = int(rng.integers(hh - resolution + 1)), int(rng.integers(ww - resolution + 1))
    else:
        top, left = (hh - resolution) // 2, (ww - resolution) // 2
    arr = arr[top : top + resolution, left : left + resolution]
    if flip and rng.random() < 0.5:
        arr = arr[:, ::-1]
    return arr.astype(np.float32) / 127.5 - 1.0


@dataclasses.dataclass(frozen=True)
class ToExample(grain.transforms.RandomMap):
    """Raw TFDS record -> {'image': f32 [R, R, 3], 'caption': str, ('label': int32)}; rng is grain's per record."""

    fmt: RecordFormat
    dataset: str
    resolution: int
    random_crop: bool
    random_flip: bool

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        ex = named.map_example(element, self.fmt.fmap, self.fmt.label_names, rng)
        name = ex["name"] or f"of dataset {self.dataset!r}"
        img = decode_image(ex["image"], name)
        out = {
            "image": preprocess_image(img, self.resolution, self.random_crop, self.random_flip, rng, name),
            "caption": ex["caption"],
        }
        if ex["label"] is not None:
            out["label"] = np.int32(ex["label"])
        return out


def stack_examples(examples: Sequence[dict]) -> dict:
    """Batches example dicts: arrays stacked on a new axis 0, captions as a str array [b]."""
    out = {k: np.stack([e[k] for e in examples]) for k in examples[0] if k != "caption"}
    out["caption"] = np.array([e["caption"] for e in examples], dtype=str)
    return out


@dataclasses.dataclass(frozen=True)
class Tokenize(grain.transforms.Map):
    """Adds 'tokens' int32 [b, L] to a batch from its captions."""

    tokenizer: Tokenizer

    def map(self, element: dict) -> dict:
        return {**element, "tokens": self.tokenizer.encode(element["caption"].tolist())}


# ------------------------------------------------------------------------------------------------- iteration


class DataIterator:
    """Iterator over this process's batches; get_state() / set_state() save and restore the exact position."""

    def __init__(self, loader: grain.DataLoader, local_batch_size: int, num_batches: int | None):
        self._loader = loader
        self._iter = iter(loader)
        self.local_batch_size = local_batch_size
        self.num_batches = num_batches  # batches in one pass (train=False); None when infinite (train=True)

    def __iter__(self) -> DataIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._iter)

    def get_state(self) -> dict:
        """JSON-serialisable position (grain's iterator state)."""
        return json.loads(self._iter.get_state().decode())

    def set_state(self, state: dict) -> None:
        """Continues from a position saved by get_state() of an iterator over the same data and settings."""
        try:
            self._iter.set_state(json.dumps(state).encode())
        except (ValueError, KeyError, TypeError) as err:
            raise DataError(f"cannot restore the data iterator (different dataset or settings?): {err}") from None


def _ensure_absl_flags_parsed() -> None:
    """grain's worker processes read absl flags; outside absl.app.run (argparse CLIs, notebooks, pytest) they are
    unparsed and grain raises UnparsedFlagAccessError, so accept their defaults."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _grain_seed(seed: int) -> int:
    """A 32-bit seed for grain mixed from `seed` (grain's per-record rng is seed + index, so raw seeds s and s + 1
    would give shifted copies of one random stream)."""
    if seed < 0:
        raise DataError(f"data seed must be >= 0, got {seed}")
    return int(np.random.SeedSequence([seed, 0x6C64]).generate_state(1)[0] >> 1)


def make_dataset(
    data_cfg: ml_collections.ConfigDict,
    *,
    split: str,
    tokenizer: Tokenizer | None,
    global_batch_size: int,
    process_index: int,
    process_count: int,
    seed: int,
    train: bool,
) -> DataIterator:
    """Batches of `split` for this process: {"image": f32 [b, R, R, 3] in [-1, 1], "caption": str [b],
    "tokens": i32 [b, L] (if tokenizer), "label": i32 [b] (if the dataset has labels)}, b = global // process_count.

    Prepares the data first if needed (see prepare). See the module docstring for train / eval semantics.
    """
    if process_count < 1 or not 0 <= process_index < process_count:
        raise DataError(f"bad process_index={process_index} / process_count={process_count}")
    if global_batch_size < process_count or global_batch_size % process_count:
        raise DataError(f"global batch size {global_batch_size} is not a multiple of process_count={process_count}")
    local = global_batch_size // process_count
    builder = prepare(data_cfg)
    fmt = record_format(data_cfg, builder)
    source = named.open_split(builder, split, fmt.fmap.image_key)
    per_process = len(source) // process_count
    if per_process == 0:
        raise DataError(f"split {split!r} has {len(source)} examples, fewer than the {process_count} processes")
    if not train and per_process < local:
        raise DataError(
            f"split {split!r} has {per_process} examples per process, fewer than one batch of {local}; "
            "lower the batch size or use a bigger split"
        )
    shard = grain.sharding.ShardOptions(shard_index=process_index, shard_count=process_count, drop_remainder=True)
    sampler = grain.samplers.IndexSampler(
        num_records=len(source),
        shard_options=shard,
        shuffle=train,
        num_epochs=None if train else 1,
        seed=_grain_seed(seed),
    )
    operations: list[Any] = [
        ToExample(
            fmt=fmt,
            dataset=data_cfg.name,
            resolution=data_cfg.resolution,
            random_crop=train and data_cfg.random_crop,
            random_flip=train and data_cfg.random_flip,
        ),
        grain.transforms.Batch(batch_size=local, drop_remainder=True, batch_fn=stack_examples),
    ]
    if tokenizer is not None:
        operations.append(Tokenize(tokenizer))
    if data_cfg.num_workers > 0:
        _ensure_absl_flags_parsed()
    loader = grain.DataLoader(
        data_source=source,
        sampler=sampler,
        operations=operations,
        worker_count=data_cfg.num_workers,
        shard_options=shard,
        read_options=grain.ReadOptions(num_threads=data_cfg.read_threads, prefetch_buffer_size=data_cfg.read_prefetch),
    )
    return DataIterator(loader, local, None if train else per_process // local)


# ------------------------------------------------------------------------------------------------- tokenizer


def caption_corpus(data_cfg: ml_collections.ConfigDict, split: str, max_examples: int) -> Iterator[str]:
    """Every caption of the first `max_examples` examples of `split` (all captions of multi-caption datasets);
    the class names for datasets without captions."""
    builder = prepare(data_cfg)
    fmt = record_format(data_cfg, builder)
    if not fmt.fmap.caption_key:
        yield from fmt.label_names
        return
    source = named.open_split(builder, split, fmt.fmap.image_key)
    n = min(len(source), max_examples)
    for start in range(0, n, 256):
        for record in source.__getitems__(list(range(start, min(start + 256, n)))):
            yield from named.all_captions(named.get_path(record, fmt.fmap.caption_key))


def make_tokenizer(
    tokenizer_cfg: ml_collections.ConfigDict, data_cfg: ml_collections.ConfigDict, *, save_dir: str
) -> Tokenizer:
    """The run's tokenizer: the one saved in save_dir if any; else tokenizer_cfg.name_or_path (a Hugging Face name or
    directory); else ('' ) a WordPiece vocabulary of tokenizer_cfg.vocab_size built from data_cfg.train_split's
    captions. Saved to save_dir (unless '') so sampling reuses exactly this vocabulary. Building is deterministic,
    so every process of a multi-host run gets the same ids; save from one process only.
    """
    if save_dir and is_tokenizer_dir(save_dir):
        return load_tokenizer(save_dir, tokenizer_cfg.max_length)
    if tokenizer_cfg.name_or_path:
        tok = load_tokenizer(tokenizer_cfg.name_or_path, tokenizer_cfg.max_length)
    else:
        corpus = caption_corpus(data_cfg, data_cfg.train_split, data_cfg.tokenizer_corpus_examples)
        tok = train_wordpiece(corpus, tokenizer_cfg.vocab_size, tokenizer_cfg.max_length)
    if save_dir:
        tok.save(save_dir)
    return tok
