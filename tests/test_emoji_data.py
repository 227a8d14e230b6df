"""`latentdiff emoji` (latentdiff/data/emoji.py) on a small tarball laid out like emoji-datasource-google@16.0.0:
folder datasets with captions and categories, a held-out split that keeps every skin tone of an emoji together,
alpha composited onto white; a wrong package, a missing or mis-sized image, an output directory that is not ours and
a missing npm are one-line errors."""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from latentdiff.data import emoji
from latentdiff.data.errors import DataError
from latentdiff.data.folder import scan_folder

CATEGORIES = ("Smileys & Emotion", "Food & Drink", "People & Body")


def listing(num: int) -> list[dict]:
    """emoji.json rows: every third emoji has the five skin tones; one Google-less emoji is left out."""
    rows = []
    for i in range(num):
        unified = f"1F{0x600 + i:03X}"
        row = {"name": f"TEST FACE {i}", "unified": unified, "image": f"{unified.lower()}.png",
               "category": CATEGORIES[i % 3], "has_img_google": True}  # fmt: skip
        if i % 3 == 2:
            row["skin_variations"] = {
                tone: {"image": f"{unified.lower()}-{tone.lower()}.png", "has_img_google": True}
                for tone in emoji.SKIN_TONES
            }
        rows.append(row)
    rows.append({"name": "NO GOOGLE", "unified": "1F999", "image": "1f999.png", "category": "Flags",
                 "has_img_google": False})  # fmt: skip
    return rows


def png(size: int = 64) -> bytes:
    """A half-transparent red square on a transparent background."""
    rgba = np.zeros((size, size, 4), np.uint8)
    rgba[16:48, 16:48] = (255, 0, 0, 128)
    buffer = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buffer, format="PNG")
    return buffer.getvalue()


def make_tarball(path, rows, *, version: str = emoji.VERSION, skip: str = "", small: str = "") -> str:
    def add(archive, name, data):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))

    with tarfile.open(path, "w:gz") as archive:
        add(archive, "package/package.json", json.dumps({"name": emoji.PACKAGE, "version": version}).encode())
        add(archive, "package/emoji.json", json.dumps(rows).encode())
        for entry in emoji.emoji_entries(rows):
            if entry.image != skip:
                add(archive, emoji.IMAGE_DIR + entry.image, png(32 if entry.image == small else 64))
    return str(path)


def test_writes_train_and_heldout_folders_with_every_variant_on_one_side(tmp_path):
    rows = listing(60)
    tarball = make_tarball(tmp_path / "e.tgz", rows)
    out = str(tmp_path / "data")
    emoji.main(["--out", out, "--tarball", tarball])
    meta = json.load(open(os.path.join(out, "meta.json")))
    entries = emoji.emoji_entries(rows)
    assert len(entries) == 60 + 20 * 5  # the Google-less emoji is not there
    assert meta["images"]["train"] + meta["images"]["heldout"] == len(entries)
    assert meta["base_emoji"] == {"total": 60, "heldout": 6}
    split_of = {}
    for split in ("train", "heldout"):
        index = scan_folder(os.path.join(out, split))
        assert not index.missing and set(index.label_names) <= set(CATEGORIES)
        for e in index.entries:
            split_of[e.relpath] = split
    by_base: dict[str, set] = {}
    for entry in entries:
        by_base.setdefault(entry.base, set()).add(split_of[f"images/{entry.image}"])
    assert all(len(sides) == 1 for sides in by_base.values())  # an emoji and its skin tones never straddle the split
    captions = [json.loads(line)["caption"] for line in open(os.path.join(out, "train", "captions.jsonl"))]
    captions += [json.loads(line)["caption"] for line in open(os.path.join(out, "heldout", "captions.jsonl"))]
    assert "test face 2: medium skin tone" in captions and "test face 0" in captions
    image = np.asarray(Image.open(os.path.join(out, "train" if split_of["images/1f600.png"] == "train" else "heldout",
                                               "images", "1f600.png")))  # fmt: skip
    assert image.shape == (64, 64, 3)
    assert tuple(image[0, 0]) == (255, 255, 255)  # transparent -> white
    assert tuple(image[32, 32]) in {(255, 127, 127), (255, 128, 128)}  # half-transparent red over white
    emoji.main(["--out", out, "--tarball", tarball])  # an earlier output of the command is replaced
    assert json.load(open(os.path.join(out, "meta.json"))) == meta


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(version="15.0.0"), "holds emoji-datasource-google@15.0.0, not emoji-datasource-google@16.0.0"),
        (dict(skip="1f605.png"), "1 of 160 images listed in emoji.json are missing"),
        (dict(small="1f602-1f3fd.png"), "1 of 160 images are not 64x64"),
    ],
)
def test_bad_tarballs_are_one_line_errors_with_a_count(tmp_path, kwargs, message):
    tarball = make_tarball(tmp_path / "e.tgz", listing(60), **kwargs)
    with pytest.raises(DataError, match=message) as info:
        emoji.write_dataset(tarball, str(tmp_path / "data"))
    assert "\n" not in str(info.value)
    assert not os.path.exists(tmp_path / "data")  # nothing half-written


def test_command_line_errors(tmp_path, monkeypatch, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    for argv, message in [
        (["--out", str(mine), "--tarball", str(tmp_path / "e.tgz")], "is not an emoji dataset written by this command"),
        (["--out", str(tmp_path / "d"), "--tarball", str(tmp_path / "none.tgz")], "no such file"),
    ]:
        with pytest.raises(SystemExit) as info:
            emoji.main(argv)
        assert info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1
    assert (mine / "notes.txt").read_text() == "keep me"
    monkeypatch.setattr(emoji.shutil, "which", lambda name: None)
    with pytest.raises(SystemExit):
        emoji.main(["--out", str(tmp_path / "d")])
    assert "npm is not installed" in capsys.readouterr().err
