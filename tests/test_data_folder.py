"""Local folder datasets: manifests, sidecar captions, labels, corrupt / small images, user errors."""

import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from latentdiff.data import input_pipeline
from latentdiff.data.errors import DataError, DataWarning

COLOURS = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220), "yellow": (230, 230, 20)}


def _save(path, size, colour, fmt=None, mode="RGB"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img = Image.new("RGB", size, colour).convert(mode)
    img.save(path, format=fmt)


def _jpeg_bytes(size, colour):
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _config(folder, data_dir, **overrides):
    c = input_pipeline.default_data_config()
    c.name = "folder"
    c.folder = str(folder)
    c.data_dir = str(data_dir)
    c.resolution = 32
    c.eval_split = "train"
    for k, v in overrides.items():
        setattr(c, k, v)
    return c


def _one_pass(cfg, batch, split="train"):
    it = input_pipeline.make_dataset(
        cfg, split=split, tokenizer=None, global_batch_size=batch, process_index=0, process_count=1, seed=0, train=False
    )
    return list(it)


@pytest.fixture()
def photo_folder(tmp_path):
    """Four good images (PNG, JPEG, RGBA PNG, a small PNG), a corrupt and a truncated file, a missing manifest row."""
    root = tmp_path / "photos"
    _save(str(root / "a.png"), (48, 40), COLOURS["red"])
    _save(str(root / "sub" / "b.jpg"), (40, 40), COLOURS["green"], fmt="JPEG")
    _save(str(root / "c.png"), (40, 60), COLOURS["blue"], mode="RGBA")
    _save(str(root / "small.png"), (16, 16), COLOURS["yellow"])
    (root / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    (root / "trunc.jpg").write_bytes(_jpeg_bytes((64, 64), (1, 2, 3))[:300])
    rows = [
        {"file": "a.png", "caption": "a red image", "label": "cat"},
        {"file": "sub/b.jpg", "caption": "a green image", "label": "dog"},
        {"file_name": "c.png", "text": "a blue image", "label": "cat"},
        {"file": "small.png", "caption": "a yellow image", "label": "dog"},
        {"file": "bad.png", "caption": "corrupt", "label": "cat"},
        {"file": "trunc.jpg", "caption": "truncated", "label": "dog"},
        {"file": "missing.png", "caption": "not there", "label": "cat"},
    ]
    (root / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root


def test_jsonl_folder_skips_corrupt_files_and_upscales_small_ones(photo_folder, tmp_path):
    cfg = _config(photo_folder, tmp_path / "tfds")
    with pytest.warns(DataWarning) as record:
        input_pipeline.prepare(cfg)
    messages = [str(w.message) for w in record]
    assert any("bad.png" in m and "skipping unreadable image" in m for m in messages)
    assert any("trunc.jpg" in m and "skipping unreadable image" in m for m in messages)
    assert any("skipped 2 of 6 images" in m for m in messages)
    assert any("missing.png" in m for m in messages)
    with pytest.warns(DataWarning, match=r"small\.png \(16x16\) is smaller than resolution 32"):
        batches = _one_pass(cfg, 4)
    assert len(batches) == 1
    batch = batches[0]
    assert batch["image"].shape == (4, 32, 32, 3) and batch["image"].dtype == np.float32
    assert batch["label"].dtype == np.int32
    names = input_pipeline.prepare(cfg).info.features["label"].names
    assert names == ["cat", "dog"]
    by_caption = {c: (img, names[label]) for c, img, label in zip(batch["caption"], batch["image"], batch["label"])}
    assert set(by_caption) == {"a red image", "a green image", "a blue image", "a yellow image"}
    for caption, (img, _) in by_caption.items():
        colour = np.array(COLOURS[caption.split()[1]]) / 127.5 - 1.0
        assert np.abs(img.reshape(-1, 3).mean(0) - colour).max() < 0.05, caption  # JPEG: nearly exact
    assert [by_caption[c][1] for c in ("a red image", "a green image", "a blue image", "a yellow image")] == [
        "cat",
        "dog",
        "cat",
        "dog",
    ]
    input_pipeline.prepare(cfg)  # idempotent: prepared data is reused


def test_csv_manifest_without_labels_and_validation_split(tmp_path):
    root = tmp_path / "csvset"
    lines = ["file,caption"]
    for i in range(6):
        _save(str(root / f"im{i}.png"), (32, 32), (i * 40, 0, 0))
        lines.append(f'im{i}.png,"picture {i}, red level {i * 40}"')
    (root / "captions.csv").write_text("\n".join(lines) + "\n")
    cfg = _config(root, tmp_path / "tfds", folder_num_validation=2, eval_split="validation")
    train = _one_pass(cfg, 4, "train")
    val = _one_pass(cfg, 2, "validation")
    assert "label" not in train[0]
    captions = sorted([*train[0]["caption"], *val[0]["caption"]])
    assert captions == sorted(f"picture {i}, red level {i * 40}" for i in range(6))
    for batch in (*train, *val):  # pixels match the caption's red level (exact: PNG, no resize)
        for caption, img in zip(batch["caption"], batch["image"]):
            red = int(caption.rsplit(" ", 1)[1])
            assert np.allclose(img[..., 0], red / 127.5 - 1.0) and np.allclose(img[..., 1:], -1.0)


def test_missing_validation_split_names_the_field_that_makes_it(tmp_path):
    """Stage 1 evaluates on 'validation'; a folder without a held-out share says which field holds one out."""
    root = tmp_path / "few"
    for i in range(3):
        _save(str(root / f"im{i}.png"), (32, 32), COLOURS["red"])
        (root / f"im{i}.txt").write_text(f"red {i}")
    cfg = _config(root, tmp_path / "tfds", eval_split="validation")
    with pytest.raises(DataError) as err:
        _one_pass(cfg, 2, "validation")
    message = str(err.value)
    assert "\n" not in message and "no split 'validation'" in message
    assert "--config.data.folder_num_validation=N" in message


def test_sidecar_captions_with_subfolder_labels(tmp_path):
    root = tmp_path / "side"
    for label, colour in (("cats", "red"), ("dogs", "blue")):
        for i in range(2):
            _save(str(root / label / f"{i}.png"), (40, 36), COLOURS[colour])
            (root / label / f"{i}.txt").write_text(f"{colour} {label} {i}\n")
    _save(str(root / "dogs" / "nocaption.png"), (40, 36), COLOURS["green"])
    cfg = _config(root, tmp_path / "tfds")
    with pytest.warns(DataWarning, match="nocaption.png"):
        batch = _one_pass(cfg, 4)[0]
    names = input_pipeline.prepare(cfg).info.features["label"].names
    assert names == ["cats", "dogs"]
    for caption, label in zip(batch["caption"], batch["label"]):
        assert caption.split()[1] == names[label]


def test_folder_user_errors_are_one_line(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="holds no images"):
        input_pipeline.prepare(_config(empty, tmp_path / "tfds"))
    with pytest.raises(DataError, match="does not exist"):
        input_pipeline.prepare(_config(tmp_path / "nope", tmp_path / "tfds"))
    uncaptioned = tmp_path / "uncaptioned"
    _save(str(uncaptioned / "x.png"), (32, 32), COLOURS["red"])
    with pytest.raises(DataError, match=r"no captions in .*captions\.jsonl or captions\.csv") as err:
        input_pipeline.prepare(_config(uncaptioned, tmp_path / "tfds"))
    assert "\n" not in str(err.value)
    (uncaptioned / "captions.jsonl").write_text('{"file": "x.png", "caption": "ok"}\n{not json\n')
    with pytest.raises(DataError, match=r"captions\.jsonl:2: not valid JSON"):
        input_pipeline.prepare(_config(uncaptioned, tmp_path / "tfds"))
    (uncaptioned / "captions.jsonl").write_text('{"file": "x.png", "words": "no caption field"}\n')
    with pytest.raises(DataError, match="no caption / text field"):
        input_pipeline.prepare(_config(uncaptioned, tmp_path / "tfds"))
    with pytest.raises(DataError, match=r"data\.folder is empty"):
        input_pipeline.prepare(_config("", tmp_path / "tfds"))


def test_preprocess_crops_and_flips():
    """Centre crop of a wide image keeps its middle; random crops move; a flip mirrors."""
    stripes = np.zeros((32, 96, 3), np.uint8)
    stripes[:, :32, 0] = 255
    stripes[:, 32:64, 1] = 255
    stripes[:, 64:, 2] = 255
    img = Image.fromarray(stripes)
    rng = np.random.default_rng(0)
    centre = input_pipeline.preprocess_image(img, 32, False, False, rng, "stripes")
    assert centre.shape == (32, 32, 3) and np.array_equal(centre, stripes[:, 32:64] / 127.5 - 1.0)
    ramp = Image.fromarray(np.broadcast_to(np.arange(96, dtype=np.uint8)[None, :, None], (32, 96, 3)).copy())
    offsets = {
        round((input_pipeline.preprocess_image(ramp, 32, True, False, rng, "r")[0, 0, 0] + 1) * 127.5)
        for _ in range(20)
    }
    assert len(offsets) > 5 and min(offsets) >= 0 and max(offsets) <= 64
    half = np.zeros((32, 32, 3), np.uint8)
    half[:, :16] = 255
    flips = [
        input_pipeline.preprocess_image(Image.fromarray(half), 32, False, True, rng, "h")[0, 0, 0] for _ in range(20)
    ]
    assert {float(v) for v in flips} == {1.0, -1.0}


def _labelled_folder(root, rows):
    """A captions.jsonl folder of solid-colour images: rows of (file, caption, label or None, red level)."""
    lines = []
    for file, caption, label, red in rows:
        _save(str(root / file), (32, 32), (red, 0, 0))
        lines.append(json.dumps({"file": file, "caption": caption} | ({"label": label} if label else {})))
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_heldout_folder_is_its_own_split_with_shared_label_ids(tmp_path):
    """data.folder_heldout: a second folder prepared as split 'heldout' beside 'train' and 'validation'; its label
    names join the training folder's (it may lack some and add others), so one id means one category everywhere."""
    train = _labelled_folder(tmp_path / "train", [
        (f"t{i}.png", f"train {i}", ("cat", "dog")[i % 2], 10 * i) for i in range(6)
    ])  # fmt: skip
    heldout = _labelled_folder(tmp_path / "heldout", [
        ("h0.png", "held cat", "cat", 200), ("h1.png", "held emu", "emu", 210)
    ])  # fmt: skip
    cfg = _config(train, tmp_path / "tfds", folder_num_validation=2, folder_heldout=str(heldout))
    names = input_pipeline.prepare(cfg).info.features["label"].names
    assert names == ["cat", "dog", "emu"]
    (held,) = _one_pass(cfg, 2, "heldout")
    assert sorted(zip(held["caption"], held["label"].tolist())) == [("held cat", 0), ("held emu", 2)]
    for caption, img in zip(held["caption"], held["image"]):  # the held-out folder's own pixels
        assert np.allclose(img[..., 0], (200 if caption == "held cat" else 210) / 127.5 - 1.0)
    seen = [c for split, n in (("train", 4), ("validation", 2)) for c in _one_pass(cfg, n, split)[0]["caption"]]
    assert sorted(seen) == sorted(f"train {i}" for i in range(6))
    for batch in _one_pass(cfg, 4, "train"):  # labels of the training folder keep their names
        for caption, label in zip(batch["caption"], batch["label"].tolist()):
            assert names[label] == ("cat", "dog")[int(caption.split()[1]) % 2]


def test_heldout_folder_user_errors_are_one_line(tmp_path):
    train = _labelled_folder(tmp_path / "train", [(f"t{i}.png", f"t {i}", "cat", 0) for i in range(3)])
    unlabelled = _labelled_folder(tmp_path / "plain", [("p.png", "plain", None, 0)])
    cases = [
        (_config(train, tmp_path / "tfds", folder_heldout=str(train)), "hold out a separate folder"),
        (_config(train, tmp_path / "tfds", folder_heldout=str(unlabelled)), "label both folders' images or neither"),
        (_config(train, tmp_path / "tfds", folder_heldout=str(tmp_path / "nope")), "does not exist"),
    ]
    for cfg, message in cases:
        with pytest.raises(DataError, match=message) as err:
            input_pipeline.prepare(cfg)
        assert "\n" not in str(err.value)
    shapes_cfg = input_pipeline.default_data_config()
    shapes_cfg.folder_heldout = str(train)
    with pytest.raises(DataError, match=r"is for data\.name='folder'"):
        input_pipeline.check_data_config(shapes_cfg)
    assert not os.path.exists(tmp_path / "tfds" / "latentdiff_folder")  # nothing prepared by a refused config
