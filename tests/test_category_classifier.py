"""The category classifier (latentdiff/evaluation/category.py): it learns categories of a synthetic labelled folder
set (a coloured disc, square or cross at a random place: the shape is the category), reports held-out accuracy,
round-trips its weights file, and refuses bad input in one line."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageDraw

from latentdiff.errors import UserError
from latentdiff.evaluation import category

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CATEGORIES = ("Crosses", "Discs", "Squares")


def write_folder(path, per_category: int, seed: int, categories=CATEGORIES, labelled: bool = True) -> str:
    rng = np.random.default_rng(seed)
    os.makedirs(path / "images")
    rows = []
    for name in categories:
        for i in range(per_category):
            img = Image.new("RGB", (32, 32), "white")
            draw = ImageDraw.Draw(img)
            colour = tuple(int(c) for c in rng.integers(0, 200, 3))
            r, cx, cy = int(rng.integers(6, 9)), int(rng.integers(10, 22)), int(rng.integers(10, 22))
            box = (cx - r, cy - r, cx + r, cy + r)
            if name == "Discs":
                draw.ellipse(box, fill=colour)
            elif name == "Squares":
                draw.rectangle(box, fill=colour)
            else:
                draw.rectangle((cx - r, cy - 2, cx + r, cy + 2), fill=colour)
                draw.rectangle((cx - 2, cy - r, cx + 2, cy + r), fill=colour)
            file = f"images/{name}_{i}.png"
            img.save(path / file)
            rows.append({"file": file, "caption": name.lower(), **({"label": name} if labelled else {})})
    (path / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("category")
    return {
        "train": write_folder(root / "train", 48, 0),
        "heldout": write_folder(root / "heldout", 16, 1),
        "out": str(root / "classifier.safetensors"),
    }


def args_for(folders, *extra):
    return category.parse_args(
        ["--train", folders["train"], "--heldout", folders["heldout"], "--out", folders["out"], "--resolution", "32",
         "--width", "16", "--steps", "300", "--batch_size", "32", *extra]
    )  # fmt: skip


def test_learns_the_categories_and_round_trips_its_weights(folders):
    report = category.run(args_for(folders))
    assert report["categories"] == 3 and report["train_images"] == 144 and report["heldout_images"] == 48
    assert report["heldout_accuracy"] >= 0.9 and report["heldout_balanced_accuracy"] >= 0.9, report
    params, names, resolution = category.load_classifier(folders["out"])
    assert names == CATEGORIES and resolution == 32
    images, labels, _ = category.read_labelled_folder(folders["heldout"], 32)
    assert category.accuracy(params, images, labels) == report["heldout_accuracy"]
    chance = category.accuracy(params, np.full_like(images, 255), labels)  # blank images: one class at best
    assert chance <= 1 / 3 + 1e-6


def test_heldout_labels_are_matched_by_name_not_by_id(tmp_path):
    labels = np.asarray([0, 1, 1], np.int32)
    assert category.relabel(labels, ("Discs", "Squares"), CATEGORIES, "h").tolist() == [1, 2, 2]
    with pytest.raises(UserError, match="categories the training split lacks: Stars"):
        category.relabel(labels, ("Discs", "Stars"), CATEGORIES, "h")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"heldout": "unlabelled"}, "has no labels"),
        ({"out": "classifier.npz"}, "must name a .safetensors file"),
        ({"steps": "0"}, "--steps and --batch_size must be >= 1"),
        ({"lr": "nan"}, "--lr must be a positive number"),
        ({"out": "missing_dir/file/x.safetensors", "blocker": True}, "--out"),
    ],
)
def test_bad_input_is_one_line(folders, tmp_path, change, message):
    paths = dict(folders)
    if change.get("heldout") == "unlabelled":
        paths["heldout"] = write_folder(tmp_path / "unlabelled", 2, 3, labelled=False)
    if "out" in change:
        paths["out"] = str(tmp_path / change["out"])
    if change.get("blocker"):
        (tmp_path / "missing_dir").write_text("a file where a directory must be")
    flags = [f"--{k}={v}" for k, v in change.items() if k in ("steps", "lr")]
    latentdiff = os.path.join(os.path.dirname(sys.executable), "latentdiff")  # the install's console script
    command = [latentdiff, "eval", "category", "--train", paths["train"], "--heldout", paths["heldout"],
               "--out", paths["out"], "--steps", "1", "--resolution", "32", *flags]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.stderr[-2000:]


def test_load_refuses_other_files(tmp_path):
    with pytest.raises(UserError, match="no category classifier"):
        category.load_classifier(str(tmp_path / "missing.safetensors"))
    from latentdiff import params_io

    params_io.save_params(str(tmp_path / "other.safetensors"), {"w": np.zeros(2, np.float32)}, {"format": "x"})
    with pytest.raises(UserError, match="not a category classifier"):
        category.load_classifier(str(tmp_path / "other.safetensors"))


def test_batches_weigh_every_category_equally():
    labels = np.asarray([0] * 90 + [2] * 9 + [3], np.int32)  # category 1 absent
    p = category.balanced_pick_probabilities(labels, 4)
    np.testing.assert_allclose(p.sum(), 1.0, rtol=1e-6)
    np.testing.assert_allclose([p[labels == k].sum() for k in (0, 2, 3)], [1 / 3] * 3, rtol=1e-6)
