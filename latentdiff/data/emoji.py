"""The Noto emoji set as two folder datasets (latentdiff/data/folder.py's format), for training on real pictures:

    latentdiff emoji --out data/emoji [--tarball emoji-datasource-google-16.0.0.tgz]
    python train.py --config configs/autoencoder_kl_f4.py:demo --workdir w --config.data.name=folder \
        --config.data.folder=data/emoji/train

Source: the npm package emoji-datasource-google@16.0.0 (MIT; images from Google's Noto Emoji): `img/google/64/*.png`,
3,786 RGBA 64x64 images (1,911 emoji and 1,875 skin-tone variants) and `emoji.json` (name, category, ...). Without
--tarball the package is fetched with `npm pack`. Each image is composited onto white (RGB PNG); its caption is the
emoji's name in lower case, with the skin tones of a variant after a colon ("woman raising hand: medium skin tone");
its label is the category (10, e.g. "Food & Drink").

Split (fixed): 10% of the base emoji, chosen by the SHA-256 of their code point sequence, are held out with all
their variants, so no held-out emoji appears in training in any skin tone. Written: OUT/train/ and OUT/heldout/
(each images/*.png + captions.jsonl) and OUT/meta.json (package, counts, split rule), all at once (a temporary
directory renamed into place: a killed run leaves nothing half-written). Any listed image that is missing from the
tarball or not 64x64 stops the run with a one-line error and the count: the set is never silently smaller.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

from PIL import Image

from latentdiff import errors
from latentdiff.data.errors import DataError
from latentdiff.output_paths import check_output_dir

PACKAGE, VERSION = "emoji-datasource-google", "16.0.0"
IMAGE_DIR = "package/img/google/64/"
SIZE = 64
HELD_OUT_FRACTION = 0.1
SKIN_TONES = {
    "1F3FB": "light skin tone",
    "1F3FC": "medium-light skin tone",
    "1F3FD": "medium skin tone",
    "1F3FE": "medium-dark skin tone",
    "1F3FF": "dark skin tone",
}


@dataclass(frozen=True)
class Emoji:
    """One image of the set: its file in the package, caption, category, and the base emoji it belongs to."""

    image: str
    caption: str
    category: str
    base: str  # the base emoji's unified code sequence (variants share it)


def skin_tone_words(key: str) -> str:
    """'1F3FB' -> 'light skin tone'; '1F3FB-1F3FD' -> 'light skin tone, medium skin tone' (two-person emoji)."""
    try:
        return ", ".join(SKIN_TONES[part] for part in key.upper().split("-"))
    except KeyError:
        raise DataError(f"emoji.json: unknown skin-tone key {key!r}; expected parts of {sorted(SKIN_TONES)}") from None


def emoji_entries(listing: list[dict]) -> list[Emoji]:
    """Every image of emoji.json that has a Google image: the base emoji and each skin-tone variant."""
    out = []
    for item in listing:
        name = str(item["name"]).lower()
        if item.get("has_img_google"):
            out.append(Emoji(item["image"], name, item["category"], item["unified"]))
        for key, variant in sorted((item.get("skin_variations") or {}).items()):
            if variant.get("has_img_google"):
                out.append(
                    Emoji(variant["image"], f"{name}: {skin_tone_words(key)}", item["category"], item["unified"])
                )
    return out


def held_out_bases(entries: list[Emoji]) -> set[str]:
    """The HELD_OUT_FRACTION of base emoji with the smallest SHA-256 of their code sequence (fixed, order-free)."""
    bases = sorted({e.base for e in entries}, key=lambda b: hashlib.sha256(b.encode()).hexdigest())
    return set(bases[: round(HELD_OUT_FRACTION * len(bases))])


def fetch_tarball(directory: str) -> str:
    """`npm pack emoji-datasource-google@16.0.0` into `directory` -> the tarball's path (one-line DataError when npm
    or the registry is missing)."""
    spec = f"{PACKAGE}@{VERSION}"
    fix = f"run `npm pack {spec}` where the npm registry is reachable and pass the file with --tarball"
    if shutil.which("npm") is None:
        raise DataError(f"npm is not installed (needed to fetch {spec}): install Node.js, or {fix}")
    result = subprocess.run(["npm", "pack", spec], cwd=directory, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise DataError(f"npm pack {spec} failed ({last[:160]}); {fix}")
    return os.path.join(directory, f"{PACKAGE}-{VERSION}.tgz")


def _member(archive: tarfile.TarFile, name: str) -> bytes | None:
    try:
        handle = archive.extractfile(name)
    except KeyError:
        return None
    return None if handle is None else handle.read()


def read_package(path: str) -> tuple[list[Emoji], Iterator[tuple[Emoji, Image.Image]]]:
    """Checks the tarball (package name and version, every listed image present and 64x64) -> (entries, an iterator
    of (entry, RGB image on white)). Reads regular-file members by name only (nothing is extracted to disk)."""
    if not os.path.isfile(path):
        raise DataError(f"--tarball {path!r}: no such file; fetch it with `npm pack {PACKAGE}@{VERSION}`")
    try:
        archive = tarfile.open(path, "r:gz")
    except (tarfile.TarError, OSError) as error:
        raise DataError(f"--tarball {path!r} is not a gzipped npm tarball ({error})") from None
    meta = json.loads(_member(archive, "package/package.json") or b"{}")
    if (meta.get("name"), meta.get("version")) != (PACKAGE, VERSION):
        raise DataError(
            f"--tarball {path!r} holds {meta.get('name')}@{meta.get('version')}, not {PACKAGE}@{VERSION}; "
            f"fetch it with `npm pack {PACKAGE}@{VERSION}`"
        )
    entries = emoji_entries(json.loads(_member(archive, "package/emoji.json") or b"[]"))
    names = set(archive.getnames())
    missing = [e.image for e in entries if IMAGE_DIR + e.image not in names]
    if missing or not entries:
        raise DataError(
            f"{len(missing)} of {len(entries)} images listed in emoji.json are missing from {path!r} (e.g. "
            f"{missing[:3]}); the tarball is incomplete: fetch it again with `npm pack {PACKAGE}@{VERSION}`"
        )
    images = {e.image: Image.open(io.BytesIO(_member(archive, IMAGE_DIR + e.image))) for e in entries}
    wrong = [name for name, image in images.items() if image.size != (SIZE, SIZE)]
    if wrong:
        raise DataError(
            f"{len(wrong)} of {len(entries)} images are not {SIZE}x{SIZE} (e.g. {wrong[0]}: "
            f"{images[wrong[0]].size[0]}x{images[wrong[0]].size[1]}); expected {PACKAGE}@{VERSION}'s img/google/64"
        )

    def composited() -> Iterator[tuple[Emoji, Image.Image]]:
        for entry in entries:
            rgba = images[entry.image].convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            yield entry, Image.alpha_composite(white, rgba).convert("RGB")

    return entries, composited()


def write_dataset(tarball: str, out: str) -> dict:
    """OUT/train, OUT/heldout (images/*.png + captions.jsonl) and OUT/meta.json, renamed into place at the end."""
    entries, images = read_package(tarball)
    held = held_out_bases(entries)
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".emoji-", dir=parent)
    try:
        rows: dict[str, list[dict]] = {"train": [], "heldout": []}
        for split in rows:
            os.makedirs(os.path.join(staging, split, "images"))
        for entry, image in images:
            split = "heldout" if entry.base in held else "train"
            relpath = f"images/{entry.image}"
            image.save(os.path.join(staging, split, relpath))
            rows[split].append({"file": relpath, "caption": entry.caption, "label": entry.category})
        for split, split_rows in rows.items():
            with open(os.path.join(staging, split, "captions.jsonl"), "w") as f:
                f.writelines(json.dumps(row) + "\n" for row in split_rows)
        meta = {
            "package": f"{PACKAGE}@{VERSION}",
            "images": {split: len(split_rows) for split, split_rows in rows.items()},
            "base_emoji": {"total": len({e.base for e in entries}), "heldout": len(held)},
            "categories": sorted({e.category for e in entries}),
            "split": f"held out: the {HELD_OUT_FRACTION:.0%} of base emoji with the smallest sha256(unified), with "
            "all their skin-tone variants",
            "composited": "RGBA onto white, RGB PNG",
        }
        with open(os.path.join(staging, "meta.json"), "w") as f:
            json.dump(meta, f, indent=2)
        if os.path.isdir(out):
            shutil.rmtree(out)  # an earlier output of this command (check_replaceable)
        os.rename(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return meta


def check_replaceable(out: str) -> None:
    """OUT must be new, empty, or an earlier output of this command (meta.json naming the package): it is replaced."""
    if not os.path.isdir(out) or not os.listdir(out):
        return
    meta_path = os.path.join(out, "meta.json")
    try:
        with open(meta_path) as f:
            ours = json.load(f).get("package") == f"{PACKAGE}@{VERSION}"
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours:
        raise DataError(
            f"--out {out!r} exists and is not an emoji dataset written by this command (no meta.json naming "
            f"{PACKAGE}@{VERSION}); pass a new or empty directory"
        )


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="latentdiff emoji", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output directory (new, empty, or an earlier output: replaced)")
    p.add_argument("--tarball", default="", help=f"{PACKAGE}-{VERSION}.tgz ('' = fetch it with npm pack)")
    args = p.parse_args(argv)

    def run() -> dict:
        check_output_dir(args.out, "--out")
        check_replaceable(args.out)
        with tempfile.TemporaryDirectory() as download:
            tarball = args.tarball or fetch_tarball(download)
            meta = write_dataset(tarball, args.out)
        print(f"{meta['images']['train']} training and {meta['images']['heldout']} held-out images -> {args.out}")
        return meta

    errors.run_cli(run)


if __name__ == "__main__":
    main(sys.argv[1:])
