"""The built-in shapes dataset: rendering, captions, novel split, analytic grader, TFDS builder."""

import io
import time

import numpy as np
import pytest
from PIL import Image, ImageDraw

from latentdiff.data import shapes
from latentdiff.evaluation import shapes_grader


@pytest.fixture(scope="module")
def train32():
    return shapes.make_examples(512, 32, "train", 0)


def _noise(shape, seed):
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


@pytest.mark.parametrize("resolution", [32, 64])
def test_grader_scores_dataset_images(resolution, train32):
    images, captions = train32 if resolution == 32 else shapes.make_examples(512, resolution, "train", 0)
    assert images.shape == (512, resolution, resolution, 3) and images.dtype == np.uint8
    scores = shapes_grader.grade(images, captions)
    for attr in ("colour", "shape", "size", "position", "background", "all"):
        assert scores[attr] >= 0.99, (attr, scores)
    assert scores["num_parsed"] == 512


def test_grader_shape_is_robust_to_faint_pixel_noise(train32):
    """4 levels of Gaussian noise (invisible) must not change the verdicts: with a thresholded mask, a boundary row
    half covered by an edge split at random and turned ~4% of squares into circles (a decoder's error does the same)."""
    multi_object = shapes.make_examples(128, 64, "train", 2, max_objects=3)
    for seed, (images, captions) in ((3, train32), (4, multi_object)):
        noisy = images.astype(np.float32) + np.random.default_rng(seed).normal(0.0, 4.0, images.shape)
        scores = shapes_grader.grade(np.clip(noisy, 0, 255) / 127.5 - 1.0, captions)
        assert min(scores[a] for a in ("colour", "shape", "size", "position", "all")) >= 0.99, scores


def test_grader_on_novel_and_multi_object_images():
    images, captions = shapes.make_examples(256, 32, "novel", 1)
    scores = shapes_grader.grade(images, captions)
    assert min(scores[a] for a in ("colour", "shape", "size", "position", "all")) >= 0.99, scores
    images, captions = shapes.make_examples(128, 64, "train", 2, max_objects=3)
    assert any(" and " in c for c in captions)
    scores = shapes_grader.grade(images, captions)
    assert min(scores[a] for a in ("colour", "shape", "size", "position", "all")) >= 0.99, scores


def test_grader_near_chance_on_noise_and_shuffled_captions(train32):
    images, captions = train32
    noise = shapes_grader.grade(_noise(images.shape, 1), captions)
    assert noise["all"] <= 0.6
    # Chance: 8 colours, 3 shapes, 9 positions, 2 sizes.
    assert noise["colour"] <= 0.25 and noise["shape"] <= 0.55 and noise["position"] <= 0.25 and noise["size"] <= 0.65
    perm = np.random.default_rng(2).permutation(len(captions))
    shuffled = shapes_grader.grade(images, [captions[i] for i in perm])
    assert shuffled["all"] <= 0.6
    assert shuffled["colour"] <= 0.25 and shuffled["shape"] <= 0.55 and shuffled["position"] <= 0.25
    # Float images in [-1, 1] (the pipeline's range) grade like their uint8 originals.
    as_float = images[:64].astype(np.float32) / 127.5 - 1.0
    assert shapes_grader.grade(as_float, captions[:64])["all"] == 1.0


def _pil_scene(shape: str, colour: str, box: tuple[int, int, int, int], bg: str, size: int = 64) -> np.ndarray:
    """An independent rendering with PIL's ImageDraw (box = left, top, right, bottom in pixels)."""
    img = Image.new("RGB", (size, size), shapes.BACKGROUND_COLOURS[bg])
    draw = ImageDraw.Draw(img)
    fill = shapes.OBJECT_COLOURS[colour]
    left, top, right, bottom = box
    if shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "circle":
        draw.ellipse(box, fill=fill)
    else:
        draw.polygon([((left + right) / 2, top), (right, bottom), (left, bottom)], fill=fill)
    return np.asarray(img)


@pytest.mark.parametrize(
    "shape,colour,box,bg,right,wrong",
    [
        (
            "circle",
            "red",
            (3, 3, 23, 23),
            "white",
            "a small red circle at the top left",
            "a big blue square at the bottom right",
        ),
        (
            "square",
            "blue",
            (14, 14, 50, 50),
            "black",
            "a big blue square in the middle on a black background",
            "a small red triangle at the top left on a white background",
        ),
        (
            "triangle",
            "green",
            (24, 40, 44, 60),
            "gray",
            "a little green triangle at the bottom, gray background",
            "a large orange circle at the top, black background",
        ),
        (
            "circle",
            "yellow",
            (26, 13, 62, 49),
            "black",
            "a large yellow circle on the right",
            "a tiny pink square on the left",
        ),
    ],
)
def test_grader_on_independently_drawn_images(shape, colour, box, bg, right, wrong):
    image = _pil_scene(shape, colour, box, bg)[None]
    scores = shapes_grader.grade(image, [right])
    assert scores["all"] == 1.0, scores
    scores = shapes_grader.grade(image, [wrong])
    for attr in ("colour", "shape", "size", "position", "background"):
        assert scores.get(attr, 0.0) == 0.0, (attr, scores)
    assert scores["all"] == 0.0


def test_parse_caption_hand_written():
    spec = shapes_grader.parse_caption("In the upper right: a TINY pink triangle against a grey background")
    assert spec.background == "gray"
    assert spec.objects == (shapes_grader.ObjectSpec(colour="pink", shape="triangle", size="small", position=(0, 2)),)
    spec = shapes_grader.parse_caption("a big square in cyan in the lower middle and a small red circle on the left")
    assert [o.colour for o in spec.objects] == ["cyan", "red"]
    assert [o.position for o in spec.objects] == [(2, 1), (1, 0)]
    assert [o.size for o in spec.objects] == ["large", "small"]
    spec = shapes_grader.parse_caption("a blue circle")  # position and size not mentioned: not graded
    assert spec.objects[0].position is None and spec.objects[0].size is None
    image = _pil_scene("circle", "blue", (3, 3, 23, 23), "white")[None]
    scores = shapes_grader.grade(image, ["a blue circle"])
    assert set(scores) == {"colour", "shape", "all", "num_images", "num_parsed"} and scores["all"] == 1.0


def test_captions_state_every_attribute(train32):
    _, captions = train32
    assert len(set(captions)) > 300  # varied wording
    for caption in captions:
        (obj,) = shapes_grader.parse_caption(caption).objects
        assert None not in (obj.colour, obj.shape, obj.size, obj.position), caption
    assert sum("background" in c for c in captions) > 50


def test_novel_split_holds_out_colour_shape_pairs():
    novel = set(shapes.NOVEL_PAIRS)
    for split in ("train", "validation"):
        layout = shapes.sample_layout(1000, split, 0, 2)
        seen = {
            (shapes.COLOUR_NAMES[c], shapes.SHAPES[s])
            for c, s, p in zip(layout.colour.ravel(), layout.shape.ravel(), layout.present.ravel())
            if p
        }
        assert not seen & novel and len(seen) == 8 * 3 - len(novel)
    _, captions = shapes.make_examples(300, 32, "novel", 0)
    pairs = {(o.colour, o.shape) for c in captions for o in shapes_grader.parse_caption(c).objects}
    assert pairs == novel


def test_make_examples_is_deterministic_and_fast():
    a_img, a_cap = shapes.make_examples(64, 32, "train", 5)
    b_img, b_cap = shapes.make_examples(64, 32, "train", 5)
    assert np.array_equal(a_img, b_img) and a_cap == b_cap
    c_img, _ = shapes.make_examples(64, 32, "train", 6)
    d_img, _ = shapes.make_examples(64, 32, "validation", 5)
    assert not np.array_equal(a_img, c_img) and not np.array_equal(a_img, d_img)
    start = time.perf_counter()
    shapes.make_examples(512, 32, "train", 0)
    assert time.perf_counter() - start < 3.0  # ~0.2 s on one idle core; generous for a loaded CI machine
    with pytest.raises(ValueError, match="unknown shapes split 'test'"):
        shapes.make_examples(4, 32, "test", 0)


def test_rendered_pixels_match_layout_geometry():
    """Box centres of squares/circles carry the object colour; image corners the background (no grader involved)."""
    layout = shapes.sample_layout(200, "train", 3, 1)
    images = shapes.render(layout, 64, 0, 200)
    for i in range(200):
        corner = images[i, 0, 0]
        assert tuple(corner) == shapes.BACKGROUND_COLOURS[shapes.BACKGROUND_NAMES[layout.background[i]]]
        y, x = int(layout.cy[i, 0] * 64), int(layout.cx[i, 0] * 64)
        if layout.shape[i, 0] != 2:
            assert tuple(images[i, y, x]) == shapes.OBJECT_COLOURS[shapes.COLOUR_NAMES[layout.colour[i, 0]]]


def test_tfds_builder_matches_make_examples(tmp_path, capfd):
    import tensorflow_datasets as tfds

    from latentdiff.data import tfds_builders

    config = tfds_builders.shapes_config(32, 24, 8, 8, 1, 0)
    other = tfds_builders.shapes_config(64, 24, 8, 8, 1, 0)
    assert config.name != other.name  # two resolutions never share a directory
    builder = tfds_builders.LatentdiffShapes(config=config, data_dir=str(tmp_path), file_format="array_record")
    builder.download_and_prepare(file_format="array_record")
    out, err = capfd.readouterr()
    # what it generates and where (TFDS said "Downloading ... Unknown size" and nothing of where)
    assert "Downloading" not in out + err and "Unknown size" not in out + err
    assert (
        f"preparing the built-in shapes dataset (24 train, 8 validation, 8 novel images of 32 px) in {tmp_path}" in err
    )
    assert "--config.data.data_dir=DIR or $TFDS_DATA_DIR" in err
    source = builder.as_data_source(split="validation")
    stored = sorted((r["caption"].decode(), np.asarray(r["image"]).tobytes()) for r in source)
    images, captions = shapes.make_examples(8, 32, "validation", 0)
    assert stored == sorted(zip(captions, (im.tobytes() for im in images)))
    raw = builder.as_data_source(split="novel", decoders={"image": tfds.decode.SkipDecoding()})
    assert Image.open(io.BytesIO(raw[0]["image"])).format == "PNG"
    assert {s: builder.info.splits[s].num_examples for s in ("train", "validation", "novel")} == {
        "train": 24,
        "validation": 8,
        "novel": 8,
    }
