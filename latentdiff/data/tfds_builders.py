"""TFDS builders for the built-in `shapes` dataset and local image folders, prepared as ArrayRecord (no TensorFlow).

Images are stored as PNG (shapes) or the original PNG/JPEG bytes (folders); read them back with
`builder.as_data_source()`. Each builder config gets a name derived from its settings, so two resolutions (or two
folders, or a folder whose files changed) never share a directory under data_dir.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import logging
import os
import re
import sys
import warnings

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image
from tensorflow_datasets.core import utils as tfds_utils

from latentdiff.data import folder as folder_lib
from latentdiff.data import shapes
from latentdiff.data.errors import DataError, DataWarning


class _DropCustomConfigNotice(logging.Filter):
    """TFDS logs 'Using custom data configuration: ...' for every builder made from a config object, as ours are."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Using custom data configuration")


logging.getLogger("absl").addFilter(_DropCustomConfigNotice())


class _LocalBuilder:
    """Mixin for builders that generate their data on this machine.

    TFDS's default `code_path` probes the optional `importlib_resources` backport (not installed) for builders inside
    a package; this file's path is what it would find. TFDS's messages around preparation speak of a download
    ("Downloading and preparing dataset Unknown size", "downloaded and prepared"): these builders say what they
    generate, where, and how to put it elsewhere instead (on stderr, with the other progress lines)."""

    @tfds_utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(inspect.getfile(cls))

    def describe(self) -> str:
        raise NotImplementedError

    def _log_download_bytes(self) -> None:
        print(
            f"preparing {self.describe()} in {self.data_dir} (generated here, nothing is downloaded; "
            "--config.data.data_dir=DIR or $TFDS_DATA_DIR puts it elsewhere)",
            file=sys.stderr,
            flush=True,
        )

    def _log_download_done(self) -> None:
        print(f"prepared {self.name} in {self.data_dir}; later runs with the same settings reuse it", file=sys.stderr)


def png_bytes(image: np.ndarray) -> bytes:
    """PNG encoding of a uint8 image [H, W, 3]."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


@dataclasses.dataclass
class ShapesConfig(tfds.core.BuilderConfig):
    """Settings of one prepared copy of `shapes` (all fields are set by `shapes_config`)."""

    resolution: int = 0
    num_train: int = 0
    num_validation: int = 0
    num_novel: int = 0
    max_objects: int = 0
    seed: int = 0


def shapes_config(resolution: int, num_train: int, num_validation: int, num_novel: int, max_objects: int, seed: int):
    """A ShapesConfig whose name encodes every setting, e.g. 'r32_n20000_1024_1024_o1_s0'."""
    for field, value in dict(num_train=num_train, num_validation=num_validation, num_novel=num_novel).items():
        if value < 1:
            raise DataError(f"data.shapes_{field}={value}: every shapes split needs at least one example")
    if not 8 <= resolution <= 1024:
        raise DataError(f"data.resolution={resolution}: shapes supports 8..1024 px")
    if not 1 <= max_objects <= len(shapes.OBJECT_COLOURS):
        raise DataError(f"data.shapes_max_objects={max_objects}: must be in 1..{len(shapes.OBJECT_COLOURS)}")
    if seed < 0:
        raise DataError(f"data.shapes_seed={seed}: must be >= 0")
    name = f"r{resolution}_n{num_train}_{num_validation}_{num_novel}_o{max_objects}_s{seed}"
    return ShapesConfig(
        name=name,
        version=LatentdiffShapes.VERSION,
        description="procedural coloured shapes with captions",
        resolution=resolution,
        num_train=num_train,
        num_validation=num_validation,
        num_novel=num_novel,
        max_objects=max_objects,
        seed=seed,
    )


class LatentdiffShapes(_LocalBuilder, tfds.core.GeneratorBasedBuilder):
    """Procedural text-image dataset: latentdiff.data.shapes rendered into train / validation / novel splits."""

    VERSION = tfds.core.Version("1.2.0")
    RELEASE_NOTES = {  # noqa: RUF012 (TFDS class attribute)
        "1.0.0": "First release.",
        "1.1.0": "label: the first object's colour x shape class (for class-conditional models).",
        "1.2.0": "A caption that names no background now has a black background (it was random).",
    }

    def describe(self) -> str:
        c = self.builder_config
        return (
            f"the built-in shapes dataset ({c.num_train} train, {c.num_validation} validation, {c.num_novel} novel "
            f"images of {c.resolution} px)"
        )

    def _info(self) -> tfds.core.DatasetInfo:
        r = self.builder_config.resolution
        return tfds.core.DatasetInfo(
            builder=self,
            description=shapes.__doc__.split("\n\n")[0],
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(r, r, 3), encoding_format="png"),
                    "caption": tfds.features.Text(),
                    "label": tfds.features.ClassLabel(names=list(shapes.class_names())),
                }
            ),
            supervised_keys=None,
        )

    def _split_generators(self, dl_manager):
        c = self.builder_config
        counts = {"train": c.num_train, "validation": c.num_validation, "novel": c.num_novel}
        return {split: self._generate_examples(split, n) for split, n in counts.items()}

    def _generate_examples(self, split: str, n: int):
        c = self.builder_config
        layout = shapes.sample_layout(n, split, c.seed, c.max_objects)
        for start, images in shapes.render_chunks(layout, c.resolution, shapes.chunk_size(c.resolution)):
            for j, image in enumerate(images):
                i = start + j
                label = int(layout.colour[i, 0]) * len(shapes.SHAPES) + int(layout.shape[i, 0])
                yield i, {"image": png_bytes(image), "caption": layout.captions[i], "label": label}


@dataclasses.dataclass
class FolderConfig(tfds.core.BuilderConfig):
    """One prepared copy of a local folder (all fields are set by `folder_config`)."""

    folder: str = ""
    num_validation: int = 0
    heldout_folder: str = ""  # '' = no split 'heldout'


def folder_config(folder: str, num_validation: int, heldout_folder: str = "") -> FolderConfig:
    """A FolderConfig named after the folder and a fingerprint of its contents (and of the held-out folder's, when
    there is one), e.g. 'photos_3f2a9c0d11ab_v0' or 'train_3f2a9c0d11ab_v128_h5b1e07aa90c2'."""
    index = folder_lib.scan_folder(folder)
    slug = re.sub(r"[^a-zA-Z0-9]+", "_", index.folder.rstrip("/").rsplit("/", 1)[-1]).strip("_")[:40] or "folder"
    name = f"{slug}_{folder_lib.fingerprint(index)}_v{num_validation}"
    if heldout_folder:
        heldout = folder_lib.scan_folder(heldout_folder)
        if os.path.commonpath([heldout.folder, index.folder]) in (heldout.folder, index.folder):
            raise DataError(
                f"data.folder_heldout ({heldout.folder}) and data.folder ({index.folder}) are the same or one holds the "
                "other; hold out a separate folder"
            )
        folder_lib.with_shared_labels(index, heldout)  # labelled both or neither: checked before any preparing
        name += f"_h{folder_lib.fingerprint(heldout)}"
        heldout_folder = heldout.folder
    return FolderConfig(
        name=name,
        version=LatentdiffFolder.VERSION,
        description=f"images and captions from {index.folder}" + (f", held out: {heldout_folder}" if heldout_folder else ""),
        folder=index.folder,
        num_validation=num_validation,
        heldout_folder=heldout_folder,
    )


class LatentdiffFolder(_LocalBuilder, tfds.core.GeneratorBasedBuilder):
    """A local directory of captioned images (see latentdiff.data.folder for the layout)."""

    # named.open_split adds this to its "no split" error: the folder's only splits are train and, when asked, validation
    MISSING_SPLIT_HINT = (
        "a folder dataset has a 'validation' split only when --config.data.folder_num_validation=N holds N of its "
        "images out of training (e.g. 64), and a 'heldout' split only when --config.data.folder_heldout=DIR names a "
        "second folder"
    )
    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {  # noqa: RUF012 (TFDS class attribute)
        "1.0.0": "First release.",
        "1.1.0": "label: the first object's colour x shape class (for class-conditional models).",
    }

    def describe(self) -> str:
        return f"the images of {self.builder_config.folder}"

    def _indexes(self) -> dict[str, folder_lib.FolderIndex]:
        """{'train': the folder's index, 'heldout': the held-out folder's (when configured)}, sharing label ids."""
        if not hasattr(self, "_folder_indexes"):
            c = self.builder_config
            indexes = {"train": folder_lib.scan_folder(c.folder)}
            if c.heldout_folder:
                pair = folder_lib.with_shared_labels(indexes["train"], folder_lib.scan_folder(c.heldout_folder))
                indexes = dict(zip(("train", "heldout"), pair, strict=True))
            self._folder_indexes = indexes
        return self._folder_indexes

    def _index(self) -> folder_lib.FolderIndex:
        return self._indexes()["train"]

    def _info(self) -> tfds.core.DatasetInfo:
        features = {
            "image": tfds.features.Image(shape=(None, None, 3)),
            "caption": tfds.features.Text(),
            "filename": tfds.features.Text(),
        }
        if self.builder_config.folder and self._index().label_names:
            features["label"] = tfds.features.ClassLabel(names=list(self._index().label_names))
        return tfds.core.DatasetInfo(
            builder=self, description="captioned local images", features=tfds.features.FeaturesDict(features)
        )

    def _split_generators(self, dl_manager):
        indexes = self._indexes()
        for index in indexes.values():
            if index.missing:
                shown = ", ".join(index.missing[:5]) + (" ..." if len(index.missing) > 5 else "")
                warnings.warn(
                    f"left out {len(index.missing)} file(s) of {index.folder} without image or caption: {shown}",
                    DataWarning,
                    stacklevel=2,
                )
        splits = folder_lib.split_entries(indexes["train"], self.builder_config.num_validation)
        generators = {split: self._generate_examples(indexes["train"], split, e) for split, e in splits.items()}
        if "heldout" in indexes:
            generators["heldout"] = self._generate_examples(indexes["heldout"], "heldout", indexes["heldout"].entries)
        return generators

    def _generate_examples(self, index: folder_lib.FolderIndex, split: str, entries):
        for entry, data in folder_lib.read_entries(index, entries, split):
            example = {"image": data, "caption": entry.caption, "filename": entry.relpath}
            if index.label_names:
                example["label"] = entry.label
            yield entry.relpath, example
