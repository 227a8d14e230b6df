"""The on-disk format of a generated image set (what `sample.py --out DIR` writes and the eval scripts read).

    DIR/00000.png ...   the images, one per (condition, repeat), with their settings in PNG text chunks
    DIR/samples.json    the manifest: {"format", "images": [file names], "conditions": [...], "run": {settings}}
    DIR/grid/grid.png   a captioned overview, in a subfolder so that no directory reader counts it as a sample

The manifest says which files are the set: `latentdiff eval fid --generated DIR` scores exactly those (other image
files in DIR are reported and left out), and a second `sample.py` run into DIR first removes the files the previous
manifest lists, so a folder never mixes two runs. Image files in DIR that no manifest lists are never deleted: sample.py
refuses such a folder instead.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from latentdiff import atomic_files
from latentdiff.config_utils import atomic_write_text, read_json_file
from latentdiff.errors import UserError
from latentdiff.imaging import IMAGE_EXTENSIONS

MANIFEST = "samples.json"
FORMAT = "latentdiff-samples-1"
GRID = os.path.join("grid", "grid.png")


def image_name(index: int) -> str:
    return f"{index:05d}.png"


def image_files(directory: str) -> list[str]:
    """Image file names directly in `directory` (sorted)."""
    return sorted(f for f in os.listdir(directory) if f.lower().endswith(IMAGE_EXTENSIONS))


def read_manifest(directory: str) -> dict[str, Any] | None:
    """DIR/samples.json, or None when DIR has none. UserError (one line) when it is not a manifest of this format."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        return None
    manifest = read_json_file(path, "a sample set manifest")
    valid = isinstance(manifest, dict) and manifest.get("format") == FORMAT and isinstance(manifest.get("images"), list)
    if not valid:
        raise UserError(f"{path} is not a {FORMAT} manifest; remove it or choose another directory")
    return manifest


def check_directory(directory: str) -> None:
    """UserError (one line) when `directory` holds image files that no sample.py manifest lists (checked before the
    model loads; nothing is changed)."""
    if not os.path.isdir(directory):
        return
    manifest = read_manifest(directory)
    listed = set(manifest["images"]) if manifest else set()
    foreign = [name for name in image_files(directory) if name not in listed]
    if foreign:
        raise UserError(
            f"--out {directory} already holds {len(foreign)} image file(s) that no sample.py run made (e.g. "
            f"{foreign[0]}); an image set must not mix runs: choose a new --out or move them away"
        )


def clear_previous(directory: str) -> list[str]:
    """Removes the images, grid and manifest of the previous sample.py run in `directory` (only what its manifest
    lists; check_directory first). Returns the image names removed."""
    check_directory(directory)
    manifest = read_manifest(directory) if os.path.isdir(directory) else None
    listed = sorted(manifest["images"]) if manifest else []
    removed = [name for name in listed if os.path.isfile(os.path.join(directory, name))]
    for name in removed:
        os.remove(os.path.join(directory, name))
    for leftover in (MANIFEST, GRID):
        if os.path.isfile(os.path.join(directory, leftover)):
            os.remove(os.path.join(directory, leftover))
    atomic_files.remove_stale(directory)  # half-written files of a killed earlier run
    return removed


def write_manifest(directory: str, images: Sequence[str], conditions: Sequence[str], run: Mapping[str, Any]) -> str:
    """Writes DIR/samples.json (atomically, after the images); returns its path."""
    path = os.path.join(directory, MANIFEST)
    manifest = {"format": FORMAT, "images": list(images), "conditions": list(conditions), "run": dict(run)}
    atomic_write_text(path, json.dumps(manifest, indent=2))
    return path


def set_members(directory: str) -> list[str] | None:
    """The image files of the set in `directory` per its manifest (None: no manifest, every image file counts).
    Image files the manifest does not list are named in a one-line warning on stderr."""
    manifest = read_manifest(directory)
    if manifest is None:
        return None
    names = list(manifest["images"])
    missing = [name for name in names if not os.path.isfile(os.path.join(directory, name))]
    if missing:
        raise UserError(f"{directory}: {len(missing)} image(s) its {MANIFEST} lists are missing (e.g. {missing[0]})")
    extra = sorted(set(image_files(directory)) - set(names))
    if extra:
        print(
            f"warning: {directory}: {len(extra)} image file(s) not in its {MANIFEST} left out (e.g. {extra[0]})",
            file=sys.stderr,
        )
    return names
