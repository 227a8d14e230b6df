"""Input pipeline: sharding, determinism, resume, named TFDS datasets, tokenizer wiring, preview CLI."""

import io
import json

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from latentdiff.data import input_pipeline, named, preview, shapes
from latentdiff.data.errors import DataError, DataWarning
from latentdiff.data.tokenizer import train_wordpiece
from latentdiff.evaluation import shapes_grader


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def cfg(data_dir):
    c = input_pipeline.default_data_config()
    c.data_dir = data_dir
    c.shapes_num_train = 96
    c.shapes_num_validation = 64
    c.shapes_num_novel = 16
    input_pipeline.prepare(c)
    return c


@pytest.fixture(scope="module")
def tok(cfg):
    return train_wordpiece(input_pipeline.caption_corpus(cfg, "train", 1000), 200, 24)


def _iter(cfg, *, split="train", tokenizer=None, batch=16, index=0, count=1, seed=0, train=True):
    return input_pipeline.make_dataset(
        cfg,
        split=split,
        tokenizer=tokenizer,
        global_batch_size=batch,
        process_index=index,
        process_count=count,
        seed=seed,
        train=train,
    )


def _keys(batches):
    """Identity of each example: its image bytes (shapes images are unique: continuous jitter)."""
    return [img.tobytes() for b in batches for img in b["image"]]


def test_batch_layout(cfg, tok):
    batch = next(_iter(cfg, tokenizer=tok, batch=8))
    assert set(batch) == {"image", "tokens", "caption", "label"}
    assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.float32
    assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0
    assert batch["tokens"].shape == (8, 24) and batch["tokens"].dtype == np.int32
    assert batch["caption"].shape == (8,) and isinstance(batch["caption"][0], str)
    assert np.array_equal(batch["tokens"], tok.encode(list(batch["caption"])))
    # Images arrive unchanged (PNG, native resolution) and still agree with their captions.
    pixels = np.rint((batch["image"] + 1.0) * 127.5).astype(np.uint8)
    assert shapes_grader.grade(pixels, list(batch["caption"]))["all"] == 1.0
    # label = the object's "colour shape" class, which the caption names
    names = shapes.class_names()
    for label, caption in zip(batch["label"], batch["caption"]):
        colour, shape = names[label].split()
        assert colour in caption.split() and shape in caption.split(), (names[label], caption)


def test_eval_shards_are_disjoint_and_cover_the_split(cfg, data_dir):
    shards = [list(_iter(cfg, split="validation", batch=16, index=i, count=2, train=False)) for i in range(2)]
    assert [len(s) for s in shards] == [4, 4]  # 64 examples / 2 processes / 8 per process-batch
    keys = [_keys(s) for s in shards]
    assert not set(keys[0]) & set(keys[1])
    builder = input_pipeline.prepare(cfg)
    reference = {  # every record of the split, decoded independently by TFDS
        (np.asarray(r["image"], np.float32) / 127.5 - 1.0).tobytes() for r in builder.as_data_source(split="validation")
    }
    assert set(keys[0]) | set(keys[1]) == reference and len(reference) == 64


def test_train_shards_partition_each_epoch(cfg):
    epochs = []
    for i in range(2):
        it = _iter(cfg, batch=16, index=i, count=2, seed=3)
        epochs.append(_keys([next(it) for _ in range(6)]))  # 48 examples = one epoch of this shard
    assert len(set(epochs[0])) == 48 and len(set(epochs[1])) == 48
    assert not set(epochs[0]) & set(epochs[1])


def test_same_seed_same_bytes_and_resume(cfg, tok):
    a, b, c = (_iter(cfg, tokenizer=tok, seed=s) for s in (7, 7, 8))
    first_a = [next(a) for _ in range(8)]  # crosses an epoch boundary (96 / 16 = 6 batches)
    first_b = [next(b) for _ in range(8)]
    for x, y in zip(first_a, first_b):
        assert all(np.array_equal(x[k], y[k]) for k in x)
    assert _keys([next(c)]) != _keys(first_a[:1])  # another seed, another order
    state = a.get_state()
    json.dumps(state)  # serialisable
    expected = [next(a) for _ in range(3)]
    resumed = _iter(cfg, tokenizer=tok, seed=7)
    resumed.set_state(state)
    for x in expected:
        y = next(resumed)
        assert all(np.array_equal(x[k], y[k]) for k in x)


def test_eval_pass_is_ordered_and_drops_the_last_partial_batch(cfg):
    it = _iter(cfg, split="validation", batch=24, train=False)
    assert it.num_batches == 2
    first = list(it)
    assert len(first) == 2  # 64 = 2 * 24 + 16 dropped
    again = list(_iter(cfg, split="validation", batch=24, seed=99, train=False))
    assert _keys(first) == _keys(again)  # no shuffle: the seed does not matter


def test_config_errors_are_one_line(cfg):
    bad = ml_collections.ConfigDict(cfg.to_dict())
    bad.name = "imagenet"
    with pytest.raises(DataError, match=r"unknown dataset 'imagenet'; available: shapes, folder, coco_captions"):
        input_pipeline.prepare(bad)
    bad.name = "shapes"
    bad.random_flip = True
    with pytest.raises(DataError, match="random_flip"):
        input_pipeline.prepare(bad)
    with pytest.raises(DataError, match="not a multiple of process_count=2"):
        _iter(cfg, batch=15, count=2)
    with pytest.raises(DataError, match="has no split 'test'; available: train, validation, novel"):
        _iter(cfg, split="test")
    with pytest.raises(DataError, match="fewer than one batch"):
        _iter(cfg, split="novel", batch=32, train=False)
    with pytest.raises(DataError, match="lacks"):
        input_pipeline.prepare(ml_collections.ConfigDict({"name": "shapes"}))


# ----------------------------------------------------------------------------------------- named TFDS datasets


def _png(value: int, size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (value, value, value)).save(buf, format="PNG")
    return buf.getvalue()


def test_feature_mapping_on_in_memory_examples():
    coco = named.resolve_feature_map("coco_captions", "auto", "auto", "auto")
    example = {
        "image": _png(10),
        "image/filename": b"0001.jpg",
        "captions": {"id": np.array([1, 2, 3]), "text": np.array([b"a cat", b"a dog", b"a cow"], dtype=object)},
    }
    picks = {named.map_example(example, coco, (), np.random.default_rng(s))["caption"] for s in range(40)}
    assert picks == {"a cat", "a dog", "a cow"}
    out = named.map_example(example, coco, (), np.random.default_rng(0))
    assert out["label"] is None and out["name"] == "0001.jpg" and out["image"] == example["image"]
    imagenet = named.resolve_feature_map("imagenet2012", "auto", "auto", "auto")
    out = named.map_example(
        {"image": b"x", "label": np.int64(2), "file_name": b"n.JPEG"}, imagenet, ("a", "b", "c"), None
    )
    assert out["label"] == 2 and out["caption"] == "c"  # class name as caption
    assert named.resolve_feature_map("lsun/bedroom", "auto", "auto", "auto").caption_key == ""
    custom = named.resolve_feature_map("imagenet2012", "auto", "", "")  # explicit keys override the table
    assert custom.label_key == "" and custom.image_key == "image"
    assert named.resolve_feature_map("my_ds", "img", "txt", "").image_key == "img"  # any TFDS name, keys given
    with pytest.raises(DataError, match="unknown dataset 'my_ds'"):
        named.resolve_feature_map("my_ds", "auto", "auto", "auto")
    with pytest.raises(DataError, match="no feature 'captions/txt'"):
        named.get_path(example, "captions/txt")


class FakeCoco(tfds.core.GeneratorBasedBuilder):
    """coco_captions-like features, prepared as ArrayRecord without TensorFlow."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3)),
                    "image/filename": tfds.features.Text(),
                    "captions": tfds.features.Sequence({"text": tfds.features.Text(), "id": np.int64}),
                    "label": tfds.features.ClassLabel(names=["cat", "dog"]),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(8), "val": self._generate_examples(4)}

    def _generate_examples(self, n):
        for i in range(n):
            captions = {"text": [f"photo {i} first", f"photo {i} second"], "id": [2 * i, 2 * i + 1]}
            yield i, {"image": _png(20 * i), "image/filename": f"{i}.png", "captions": captions, "label": i % 2}


def test_named_dataset_read_through_the_pipeline(tmp_path):
    FakeCoco(data_dir=str(tmp_path), file_format="array_record").download_and_prepare(file_format="array_record")
    c = input_pipeline.default_data_config()
    c.name, c.data_dir = "fake_coco", str(tmp_path)
    c.image_key, c.caption_key, c.label_key = "image", "captions/text", "label"
    c.random_crop, c.random_flip = True, True
    upscaled = r"image of dataset 'fake_coco' \(40x30\) is smaller than resolution 32; upscaling"
    with pytest.warns(DataWarning, match=upscaled):
        (batch,) = list(_iter(c, split="val", batch=4, train=False))
    assert batch["image"].shape == (4, 32, 32, 3) and batch["label"].dtype == np.int32
    for caption, img, label in zip(batch["caption"], batch["image"], batch["label"]):
        i = int(caption.split()[1])
        assert caption in (f"photo {i} first", f"photo {i} second") and label == i % 2
        assert np.allclose(img, 20 * i / 127.5 - 1.0, atol=1e-6)  # resized (bicubic) solid grey stays exact
    assert sorted(input_pipeline.caption_corpus(c, "train", 100)) == sorted(
        f"photo {i} {w}" for i in range(8) for w in ("first", "second")
    )
    c.name = "coco_captions"
    with pytest.raises(DataError, match=r"not prepared in .*tfds build coco_captions .*--file_format=array_record"):
        input_pipeline.prepare(c)


# ----------------------------------------------------------------------------------------- tokenizer and preview


def test_make_tokenizer_trains_saves_and_reloads(cfg, tmp_path):
    tcfg = ml_collections.ConfigDict({"name_or_path": "", "vocab_size": 300, "max_length": 20})
    save = str(tmp_path / "tokenizer")
    tok = input_pipeline.make_tokenizer(tcfg, cfg, save_dir=save)
    captions = shapes.make_examples(96, 8, "train", 0)[1]
    assert (tok.encode(captions) != tok.hf.convert_tokens_to_ids("[UNK]")).all()
    tcfg.vocab_size = 100  # ignored now: the saved tokenizer wins, so sampling sees the training vocabulary
    again = input_pipeline.make_tokenizer(tcfg, cfg, save_dir=save)
    assert again.hf.get_vocab() == tok.hf.get_vocab()


CONFIG_FILE = """
from latentdiff.data.input_pipeline import default_data_config
import ml_collections

def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.data = default_data_config()
    c.data.data_dir = {data_dir!r}
    c.data.shapes_num_train = 96
    c.data.shapes_num_validation = 64
    c.data.shapes_num_novel = 16
    c.data.resolution = 32 if arg != "big" else 48
    c.tokenizer = ml_collections.ConfigDict(dict(name_or_path="", vocab_size=100, max_length=16))
    return c
"""


def test_preview_writes_a_captioned_grid(cfg, data_dir, tmp_path, capsys):
    config = tmp_path / "shapes_cfg.py"
    config.write_text(CONFIG_FILE.format(data_dir=data_dir))
    out = tmp_path / "preview.png"
    assert preview.main(["--config", f"{config}:tiny", "--out", str(out), "--num", "6"]) == 0
    img = np.asarray(Image.open(out).convert("RGB"))
    side = preview.cell_side(32)  # 32 px enlarged 4x
    assert side == 128 and img.shape[1] == 6 * (side + preview.PAD) + preview.PAD
    assert img.shape[0] > side + 2 * preview.PAD
    text_band = img[preview.PAD + side + 2 : -preview.PAD, preview.PAD : preview.PAD + side]
    assert (text_band < 128).any()  # a caption was drawn under the first image
    assert preview.main(["--config", f"{tmp_path / 'missing.py'}", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: config file") and err.count("\n") == 1


def test_preview_takes_config_overrides_like_train_py(cfg, data_dir, tmp_path, capsys):
    """The own-data workflow previews without a config file of its own: --config.FIELD=VALUE as in train.py."""
    config = tmp_path / "shapes_cfg.py"
    config.write_text(CONFIG_FILE.format(data_dir=data_dir))
    out = tmp_path / "preview.png"
    args = ["--config", f"{config}:tiny", "--out", str(out), "--num", "4"]
    assert preview.main([*args, "--config.data.resolution=48", "--config.data.shapes_num_train=64"]) == 0
    side = preview.cell_side(48)
    assert np.asarray(Image.open(out)).shape[1] == 4 * (side + preview.PAD) + preview.PAD
    capsys.readouterr()  # the data preparation's progress
    assert preview.main([*args, "--config.data.no_such_field=1"]) == 2
    err = capsys.readouterr().err
    assert "unknown config field 'data.no_such_field'" in err and err.count("\n") == 1
    assert preview.main([*args, "--config.data.resolution=big"]) == 2
    err = capsys.readouterr().err
    assert "data.resolution='big': not a int" in err and err.count("\n") == 1


def test_apply_overrides_parses_by_the_field_type():
    from latentdiff.config_utils import ConfigError, apply_overrides

    c = ml_collections.ConfigDict(dict(a=dict(n=1, x=0.5, flag=False, name="s", dims=(1, 2), empty=None)))
    apply_overrides(c, ["a.n=3", "a.x=1e-3", "a.flag=true", "a.name=hello", "a.dims=(4,)", "a.empty=z"])
    assert (c.a.n, c.a.x, c.a.flag, c.a.name, c.a.dims, c.a.empty) == (3, 1e-3, True, "hello", (4,), "z")
    for bad, match in (("a.flag=yes", "not true or false"), ("a.n", "no '='"), ("a.dims=(", "not a tuple")):
        with pytest.raises(ConfigError, match=match):
            apply_overrides(c, [bad])
