"""Named TFDS datasets (coco_captions, imagenet2012, celeb_a_hq, lsun, ...) through a small feature-mapping table.

Nothing is downloaded unless `data.download` is True: the dataset must already be prepared in ArrayRecord format
under data_dir (`tfds build NAME --data_dir=DIR --file_format=array_record`, which needs the `tf` extra and, for
some datasets, manually downloaded source files). Prepared data is read without the dataset's builder code
(`read_only_builder.builder_from_files`), so reading needs no TensorFlow.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from latentdiff.data.errors import DataError


@dataclasses.dataclass(frozen=True)
class FeatureMap:
    """Where a dataset keeps its image, caption(s) and label. Keys are '/'-separated paths into the example.

    caption_key '' = no captions (the class name is used as caption when there are class names, else "");
    label_key '' = no labels; name_key = a per-example file name used in messages ('' = none). A caption key that
    holds several captions (coco_captions 'captions/text') gives one of them per example, picked with the seed.
    """

    image_key: str
    caption_key: str
    label_key: str
    name_key: str


# Base name (before '/') -> feature mapping. The text after '/' selects the TFDS config (e.g. lsun/bedroom).
NAMED_DATASETS: dict[str, FeatureMap] = {
    "coco_captions": FeatureMap(
        image_key="image", caption_key="captions/text", label_key="", name_key="image/filename"
    ),
    "imagenet2012": FeatureMap(image_key="image", caption_key="", label_key="label", name_key="file_name"),
    "celeb_a_hq": FeatureMap(image_key="image", caption_key="", label_key="", name_key="image/filename"),
    "lsun": FeatureMap(image_key="image", caption_key="", label_key="", name_key=""),
    "cifar10": FeatureMap(image_key="image", caption_key="", label_key="label", name_key=""),
    "oxford_flowers102": FeatureMap(image_key="image", caption_key="", label_key="label", name_key="file_name"),
}
# Names as users write them (for messages).
NAMED_EXAMPLES: tuple[str, ...] = (
    "coco_captions",
    "imagenet2012",
    "celeb_a_hq/256",
    "lsun/bedroom",
    "lsun/church_outdoor",
    "cifar10",
    "oxford_flowers102",
)
AUTO = "auto"


def available_names() -> str:
    return ", ".join(("shapes", "folder", *NAMED_EXAMPLES))


def resolve_feature_map(name: str, image_key: str, caption_key: str, label_key: str) -> FeatureMap:
    """The mapping for dataset `name`: table entries, with each data-config key that is not 'auto' taking precedence.

    A TFDS name outside the table is accepted only when all three keys are given explicitly.
    """
    base = name.split("/", 1)[0]
    table = NAMED_DATASETS.get(base)
    keys = {"image_key": image_key, "caption_key": caption_key, "label_key": label_key}
    if table is None:
        if AUTO in keys.values():
            raise DataError(
                f"unknown dataset {name!r}; available: {available_names()} (lsun/<category>, celeb_a_hq/<resolution>; "
                "another TFDS dataset needs data.image_key, data.caption_key and data.label_key set)"
            )
        return FeatureMap(image_key=image_key, caption_key=caption_key, label_key=label_key, name_key="")
    chosen = {k: getattr(table, k) if v == AUTO else v for k, v in keys.items()}
    if not chosen["image_key"]:
        raise DataError(f"data.image_key is empty for dataset {name!r}")
    return FeatureMap(**chosen, name_key=table.name_key)


def get_path(example: Mapping[str, Any], key: str) -> Any:
    """example['a']['b'] for key 'a/b'; a flat key 'a/b' is tried first (TFDS flattens some feature names)."""
    if key in example:
        return example[key]
    node: Any = example
    for part in key.split("/"):
        if not isinstance(node, Mapping) or part not in node:
            raise DataError(f"example has no feature {key!r}; it has {sorted(_flat_keys(example))}")
        node = node[part]
    return node


def _flat_keys(example: Mapping[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k, v in example.items():
        out += _flat_keys(v, f"{prefix}{k}/") if isinstance(v, Mapping) else [f"{prefix}{k}"]
    return out


def _text(value: Any) -> str:
    if isinstance(value, bytes | np.bytes_):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray) and value.ndim == 0:
        return _text(value.item())
    return str(value)


def all_captions(value: Any) -> list[str]:
    """Every caption stored in a caption feature value (a string, or a sequence of strings)."""
    if isinstance(value, str | bytes | np.bytes_ | np.str_) or (isinstance(value, np.ndarray) and value.ndim == 0):
        return [_text(value)]
    return [_text(v) for v in value]


def map_example(
    example: Mapping[str, Any], fmap: FeatureMap, label_names: tuple[str, ...], rng: np.random.Generator
) -> dict[str, Any]:
    """Maps a raw TFDS example to {'image': encoded bytes or uint8 array, 'caption': str, 'label': int | None, 'name'}.

    With several captions one is chosen by `rng`; without a caption key the caption is the class name (if the label
    has names) or "".
    """
    image = get_path(example, fmap.image_key)
    label = int(np.asarray(get_path(example, fmap.label_key))) if fmap.label_key else None
    if fmap.caption_key:
        captions = all_captions(get_path(example, fmap.caption_key))
        caption = captions[int(rng.integers(len(captions)))] if captions else ""
    elif label is not None and label_names:
        caption = label_names[label]
    else:
        caption = ""
    name = _text(get_path(example, fmap.name_key)) if fmap.name_key else ""
    return {"image": image, "caption": caption, "label": label, "name": name}


def _skip_decoding_tree(key: str):
    """{'a': {'b': SkipDecoding()}} for key 'a/b' (keeps encoded image bytes; we decode with PIL)."""
    import tensorflow_datasets as tfds

    tree: Any = tfds.decode.SkipDecoding()
    for part in reversed(key.split("/")):
        tree = {part: tree}
    return tree


def open_builder(name: str, data_dir: str, download: bool):
    """The prepared TFDS builder for `name` (read-only, no builder code needed); prepares it when `download`."""
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core import read_only_builder

    where = data_dir or "the TFDS default data_dir (~/tensorflow_datasets or $TFDS_DATA_DIR)"
    command = f"tfds build {name} --data_dir={data_dir or '~/tensorflow_datasets'} --file_format=array_record"
    try:
        builder = read_only_builder.builder_from_files(name, data_dir=data_dir or None)
    except (tfds.core.registered.DatasetNotFoundError, FileNotFoundError, ValueError):
        if not download:
            raise DataError(
                f"dataset {name!r} is not prepared in {where}; prepare it with `{command}` (needs the tf extra), "
                "or let train.py prepare it with --config.data.download=True"
            ) from None
        try:
            builder = tfds.builder(name, data_dir=data_dir or None)
            builder.download_and_prepare(file_format="array_record")
        except ModuleNotFoundError as e:
            raise DataError(
                f"preparing {name!r} needs {e.name} (pip install 'latentdiff[tf]'), or prepare it with `{command}`"
            ) from None
    file_format = str(builder.info.file_format or "")
    if "array_record" not in file_format.lower():
        raise DataError(
            f"dataset {name!r} in {where} is prepared as {file_format or 'tfrecord'}, which needs TensorFlow; "
            f"prepare an ArrayRecord copy with `{command}`"
        )
    return builder


def label_names_of(builder, label_key: str) -> tuple[str, ...]:
    """Class names of the label feature (empty when there is none or it has no names)."""
    if not label_key:
        return ()
    feature: Any = builder.info.features
    for part in label_key.split("/"):
        feature = feature[part]
    names = getattr(feature, "names", None)
    return tuple(names) if names else ()


def open_split(builder, split: str, image_key: str):
    """The split as a random-access source whose image stays encoded bytes. Unknown split -> DataError."""
    available = list(builder.info.splits.keys())
    if split.split("[", 1)[0] not in available:
        hint = getattr(builder, "MISSING_SPLIT_HINT", "")
        raise DataError(
            f"dataset {builder.info.full_name} has no split {split!r}; available: {', '.join(available)}"
            + (f"; {hint}" if hint else "")
        )
    return builder.as_data_source(split=split, decoders=_skip_decoding_tree(image_key))
