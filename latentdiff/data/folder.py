"""Local folder datasets: a directory of images with captions and optional class labels.

Captions come from the first of these that exists in the folder:
1. `captions.jsonl`: one JSON object per line, {"file": "cats/a.png", "caption": "a cat", "label": "cat"}.
2. `captions.csv`: a header row, then the same columns.
   In both, the file column may also be called `file_name` or `image` (relative to the folder, or absolute), the
   caption column `text`; `label` is optional (all rows or none). Images not listed are ignored. Labels that are
   all integers are used as ids; otherwise the sorted distinct names become ids 0..K-1.
3. Sidecar text files: `a.png` + `a.txt` (UTF-8, the caption). When every image lies in a first-level subfolder,
   the subfolder names are the class labels (as in ImageFolder).
Images: .png .jpg .jpeg .bmp .gif .webp .tif .tiff (any depth). Unreadable, corrupt or truncated images (and
manifest rows whose file is missing) are skipped with a DataWarning naming the file and a final count.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

from PIL import Image

from latentdiff import imaging
from latentdiff.data.errors import DataError, DataWarning

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
MANIFESTS: tuple[str, ...] = ("captions.jsonl", "captions.csv")
_FILE_KEYS = ("file", "file_name", "image")
_CAPTION_KEYS = ("caption", "text")


@dataclass(frozen=True)
class Entry:
    """One image of a folder dataset: path relative to the folder, caption, label id (-1 when unlabelled)."""

    relpath: str
    caption: str
    label: int


@dataclass(frozen=True)
class FolderIndex:
    folder: str
    entries: tuple[Entry, ...]
    label_names: tuple[str, ...]  # empty when the dataset has no labels
    source: str  # "captions.jsonl", "captions.csv" or "sidecar .txt"
    missing: tuple[str, ...]  # manifest rows or images left out (missing file, no caption)


def _list_images(folder: str) -> list[str]:
    out = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith("."):
                out.append(os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/"))
    return out


def _pick(row: dict, keys: tuple[str, ...], where: str) -> str:
    for key in keys:
        if key in row and row[key] is not None:
            return str(row[key])
    raise DataError(f"{where}: no {' / '.join(keys)} field (expected e.g. {{'file': 'a.png', 'caption': '...'}})")


def _read_manifest(path: str) -> list[tuple[str, str, str | None]]:
    """(file, caption, label or None) rows of a captions.jsonl / captions.csv manifest."""
    rows: list[tuple[str, str, str | None]] = []
    name = os.path.basename(path)
    with open(path, encoding="utf-8", newline="") as f:
        if path.endswith(".jsonl"):
            records = []
            for i, line in enumerate(f, 1):
                if line.strip():
                    try:
                        records.append((f"{name}:{i}", json.loads(line)))
                    except json.JSONDecodeError as e:
                        raise DataError(f"{name}:{i}: not valid JSON ({e.msg})") from None
        else:
            reader = csv.DictReader(f)
            records = [(f"{name}:{i}", row) for i, row in enumerate(reader, 2)]
    for where, row in records:
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object per line")
        label = row.get("label")  # an optional manifest column, not a config default
        rows.append(
            (
                _pick(row, _FILE_KEYS, where),
                _pick(row, _CAPTION_KEYS, where),
                None if label in (None, "") else str(label),
            )
        )
    return rows


def _label_ids(labels: list[str | None], where: str) -> tuple[list[int], tuple[str, ...]]:
    if all(label is None for label in labels):
        return [-1] * len(labels), ()
    if any(label is None for label in labels):
        raise DataError(f"{where}: some rows have a label and some do not; label all rows or none")
    if all(re.fullmatch(r"\d+", label) for label in labels):
        ids = [int(label) for label in labels]
        return ids, tuple(str(i) for i in range(max(ids) + 1))
    names = tuple(sorted(set(labels)))
    return [names.index(label) for label in labels], names


def scan_folder(folder: str) -> FolderIndex:
    """Indexes a folder dataset (captions and labels; images are not opened). Raises DataError on user error."""
    if not folder:
        raise DataError("data.folder is empty; set it to the directory holding your images")
    folder = os.path.abspath(os.path.expanduser(folder))
    if not os.path.isdir(folder):
        raise DataError(f"data folder {folder} does not exist or is not a directory")
    images = _list_images(folder)
    if not images:
        raise DataError(f"data folder {folder} holds no images ({' '.join(IMAGE_EXTENSIONS)})")
    present = set(images)
    missing: list[str] = []
    manifest = next((m for m in MANIFESTS if os.path.isfile(os.path.join(folder, m))), None)
    if manifest is not None:
        rows = []
        for file, caption, label in _read_manifest(os.path.join(folder, manifest)):
            rel = os.path.relpath(file, folder) if os.path.isabs(file) else os.path.normpath(file)
            rel = rel.replace(os.sep, "/")
            if rel in present:
                rows.append((rel, caption, label))
            else:
                missing.append(f"{file} (listed in {manifest}, not found)")
        source = manifest
    else:
        rows = []
        for rel in images:
            txt = os.path.join(folder, os.path.splitext(rel)[0] + ".txt")
            if os.path.isfile(txt):
                with open(txt, encoding="utf-8") as f:
                    rows.append((rel, f.read().strip(), None))
            else:
                missing.append(f"{rel} (no sidecar .txt caption)")
        if not rows:
            raise DataError(
                f"no captions in {folder}: add captions.jsonl or captions.csv, or a .txt file beside each image"
            )
        if all("/" in rel for rel, _, _ in rows):  # ImageFolder layout: first-level subfolder = class
            rows = [(rel, caption, rel.split("/", 1)[0]) for rel, caption, _ in rows]
        source = "sidecar .txt"
    if not rows:
        raise DataError(f"none of the files listed in {os.path.join(folder, manifest or '')} exist in {folder}")
    ids, names = _label_ids([label for _, _, label in rows], os.path.join(folder, manifest or ""))
    entries = tuple(Entry(rel, caption, i) for (rel, caption, _), i in zip(rows, ids))
    return FolderIndex(folder, entries, names, source, tuple(missing))


def with_shared_labels(train: FolderIndex, heldout: FolderIndex) -> tuple[FolderIndex, FolderIndex]:
    """Both indexes relabelled over the union of their label names (a held-out folder may lack some categories), so
    one label id means one category in every split. DataError when one folder is labelled and the other is not."""
    if bool(train.label_names) != bool(heldout.label_names):
        labelled, unlabelled = (train, heldout) if train.label_names else (heldout, train)
        raise DataError(
            f"{labelled.folder} has labels but {unlabelled.folder} has none; label both folders' images or neither"
        )
    if train.label_names == heldout.label_names:
        return train, heldout
    numeric = all(re.fullmatch(r"\d+", n) for n in (*train.label_names, *heldout.label_names))
    if numeric:
        size = max(len(train.label_names), len(heldout.label_names))
        names = tuple(str(i) for i in range(size))
    else:
        names = tuple(sorted(set(train.label_names) | set(heldout.label_names)))

    def relabel(index: FolderIndex) -> FolderIndex:
        ids = [names.index(index.label_names[e.label]) for e in index.entries]
        entries = tuple(Entry(e.relpath, e.caption, i) for e, i in zip(index.entries, ids, strict=True))
        return FolderIndex(index.folder, entries, names, index.source, index.missing)

    return relabel(train), relabel(heldout)


def fingerprint(index: FolderIndex) -> str:
    """Short hash of the folder path, captions, labels, file sizes and modification times (changes re-prepare)."""
    h = hashlib.sha256(index.folder.encode())
    for e in index.entries:
        st = os.stat(os.path.join(index.folder, e.relpath))
        h.update(f"{e.relpath}\0{e.caption}\0{e.label}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:12]


def load_image_bytes(path: str) -> tuple[bytes, list[str]]:
    """Fully decodes an image file (catching truncation) -> (PNG/JPEG bytes of an 8-bit RGB image, conversion notes).

    8-bit RGB PNG/JPEG files without an EXIF rotation are returned unchanged; anything else goes through
    `imaging.to_rgb8` (EXIF orientation, transparency onto white, 16-bit / float scaled, palette / CMYK -> RGB) and is
    re-encoded as PNG. Raises OSError / ValueError / SyntaxError for unreadable files, UserError for unsupported ones.
    """
    with open(path, "rb") as f:
        data = f.read()
    with Image.open(io.BytesIO(data)) as img:
        img.load()  # full decode: raises on truncated or corrupt data
        if img.format in ("PNG", "JPEG") and img.mode == "RGB" and img.getexif().get(0x0112, 1) in (1, None):
            return data, []
        pixels, notes = imaging.to_rgb8(img)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue(), notes


def read_entries(index: FolderIndex, entries: tuple[Entry, ...], split: str) -> Iterator[tuple[Entry, bytes]]:
    """Yields (entry, encoded RGB image bytes). Unreadable or unsupported images are skipped with a DataWarning each
    and a final count; conversions that change more than the format (EXIF rotation, transparency, 16-bit, float) are
    counted in one DataWarning. A split with no readable image is a DataError."""
    skipped = []
    converted: dict[str, int] = {}
    for e in entries:
        path = os.path.join(index.folder, e.relpath)
        try:
            data, notes = load_image_bytes(path)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            skipped.append(e.relpath)
            warnings.warn(f"skipping unreadable image {path}: {err}", DataWarning, stacklevel=2)
            continue
        for note in notes:
            converted[note] = converted.get(note, 0) + 1
        yield e, data
    if converted:
        counts = ", ".join(f"{n} {kind}" for kind, n in sorted(converted.items()))
        warnings.warn(
            f"converted images of split {split!r} in {index.folder} to 8-bit RGB: {counts} (EXIF orientation applied, "
            "transparency composited onto white, 16-bit and float greyscale scaled to 0..255)",
            DataWarning,
            stacklevel=2,
        )
    if skipped and len(skipped) == len(entries):
        raise DataError(
            f"none of the {len(entries)} images of split {split!r} in {index.folder} is readable (e.g. "
            f"{skipped[0]}); check the files (PNG/JPEG, 8-bit RGB or greyscale)"
        )
    if skipped:
        warnings.warn(
            f"skipped {len(skipped)} of {len(entries)} images of split {split!r} in {index.folder} "
            f"(corrupt, truncated, unreadable or unsupported): {', '.join(skipped[:5])}"
            f"{' ...' if len(skipped) > 5 else ''}",
            DataWarning,
            stacklevel=2,
        )


def split_entries(index: FolderIndex, num_validation: int) -> dict[str, tuple[Entry, ...]]:
    """{'train': ..., 'validation': ...}: validation = every k-th entry in path order (k = N // num_validation)."""
    entries = index.entries
    if num_validation <= 0:
        return {"train": entries}
    if num_validation >= len(entries):
        raise DataError(
            f"data.folder_num_validation={num_validation} leaves no training images ({len(entries)} captioned images)"
        )
    step = len(entries) // num_validation
    val = set(range(0, step * num_validation, step))
    return {
        "train": tuple(e for i, e in enumerate(entries) if i not in val),
        "validation": tuple(e for i, e in enumerate(entries) if i in val),
    }
