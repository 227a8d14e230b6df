"""Every PIL mode a user may have is converted to 8-bit RGB correctly or refused, never silently turned into
something else (issue 24 #5): one conversion (imaging.to_rgb8) used by sampling inputs, folder datasets and FID dirs."""

import json
import os
import warnings

import numpy as np
import pytest
from PIL import Image

from latentdiff import imaging
from latentdiff.data import input_pipeline
from latentdiff.data.errors import DataError, DataWarning
from latentdiff.errors import UserError
from latentdiff.evaluation import references

RAMP = np.arange(64, dtype=np.float64).reshape(8, 8) / 63.0  # 0..1 greyscale ramp [8, 8]


def grey8(values01: np.ndarray) -> np.ndarray:
    return np.repeat(np.round(values01 * 255).astype(np.uint8)[..., None], 3, axis=-1)


def test_16bit_greyscale_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "g16.png"
    Image.fromarray(np.round(RAMP * 65535).astype(np.uint16)).save(path)  # a real 16-bit PNG
    with Image.open(path) as img:
        pixels, notes = imaging.to_rgb8(img)
    np.testing.assert_array_equal(pixels, grey8(RAMP))  # PIL's convert('RGB') would clip almost all to 255
    assert notes == ["16-bit"]


def test_float_greyscale_in_unit_range_is_scaled_and_hdr_is_refused():
    pixels, notes = imaging.to_rgb8(Image.fromarray(RAMP.astype(np.float32), mode="F"))
    np.testing.assert_array_equal(pixels, grey8(RAMP))
    assert notes == ["float"]
    with pytest.raises(UserError, match=r"float pixels in \[0, 400\]"):
        imaging.to_rgb8(Image.fromarray((RAMP * 400).astype(np.float32), mode="F"))


def test_transparency_is_composited_onto_white_and_opaque_alpha_dropped():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 255
    rgba[0, 0, 3] = 0  # one transparent pixel
    pixels, notes = imaging.to_rgb8(Image.fromarray(rgba, "RGBA"))
    assert (
        notes == ["transparent"] and pixels[0, 0].tolist() == [255, 255, 255] and pixels[1, 1].tolist() == [200, 0, 0]
    )
    rgba[0, 0, 3] = 255
    pixels, notes = imaging.to_rgb8(Image.fromarray(rgba, "RGBA"))
    assert notes == [] and (pixels == [200, 0, 0]).all()
    palette = Image.fromarray(rgba[..., :3]).convert("P")
    palette.info["transparency"] = palette.getpixel((0, 0))
    assert imaging.to_rgb8(palette)[1] == ["transparent"]


def test_palette_cmyk_and_exif_rotation():
    rgb = np.zeros((2, 3, 3), np.uint8)
    rgb[0, 0] = (255, 0, 0)
    assert (imaging.to_rgb8(Image.fromarray(rgb).convert("P"))[0] == rgb).all()
    cmyk = Image.new("CMYK", (2, 2), (0, 255, 255, 0))  # pure red in CMYK
    assert imaging.to_rgb8(cmyk)[0][0, 0].tolist() == [255, 0, 0]
    rotated = Image.fromarray(rgb)
    exif = rotated.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    rotated.info["exif"] = exif.tobytes()
    pixels, notes = imaging.to_rgb8(Image.open(_roundtrip_jpeg(rotated, exif)))
    assert notes == ["EXIF-rotated"] and pixels.shape == (3, 2, 3)


def _roundtrip_jpeg(img: Image.Image, exif) -> str:
    import tempfile

    path = os.path.join(tempfile.mkdtemp(), "r.jpg")
    img.save(path, exif=exif, quality=100)
    return path


def test_unsupported_mode_is_refused_by_name():
    with pytest.raises(UserError, match="image mode 'LAB' is not supported"):
        imaging.to_rgb8(Image.new("LAB", (2, 2)))


def test_sampling_input_reads_16bit_correctly(tmp_path):
    path = tmp_path / "g16.png"
    Image.fromarray(np.round(RAMP * 65535).astype(np.uint16)).save(path)
    np.testing.assert_array_equal(imaging.read_image(str(path), "--init_image"), grey8(RAMP))
    Image.new("LAB", (2, 2)).save(tmp_path / "lab.tif")
    with pytest.raises(UserError, match=r"--init_image .*lab\.tif.*'LAB' is not supported"):
        imaging.read_image(str(tmp_path / "lab.tif"), "--init_image")


def test_fid_image_dir_uses_the_same_conversion(tmp_path):
    Image.fromarray(np.round(RAMP * 65535).astype(np.uint16)).save(tmp_path / "a.png")
    groups, skipped = references.load_image_dir(str(tmp_path))
    assert skipped == 0 and np.array_equal(groups[0][0], grey8(RAMP))


def _folder_config(folder, data_dir):
    c = input_pipeline.default_data_config()
    c.name, c.folder, c.data_dir, c.resolution, c.eval_split = "folder", str(folder), str(data_dir), 8, "train"
    return c


def test_folder_dataset_converts_with_a_count_and_refuses_an_unreadable_folder(tmp_path):
    root = tmp_path / "photos"
    root.mkdir()
    Image.fromarray(np.round(RAMP * 65535).astype(np.uint16)).save(root / "g16.png")
    rgba = np.full((8, 8, 4), 255, np.uint8)
    rgba[..., 3] = 0
    Image.fromarray(rgba, "RGBA").save(root / "clear.png")
    Image.fromarray(grey8(RAMP)).save(root / "plain.png")
    rows = [{"file": f, "caption": f} for f in ("g16.png", "clear.png", "plain.png")]
    (root / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = list(
            input_pipeline.make_dataset(
                _folder_config(root, tmp_path / "tfds"),
                split="train",
                tokenizer=None,
                global_batch_size=3,
                process_index=0,
                process_count=1,
                seed=0,
                train=False,
            )
        )
    messages = [str(w.message) for w in caught if issubclass(w.category, DataWarning)]
    assert any("1 16-bit, 1 transparent" in m for m in messages), messages
    by_name = {str(c): img for batch in batches for c, img in zip(batch["caption"], batch["image"])}  # caption = file
    assert np.allclose(by_name["g16.png"], by_name["plain.png"], atol=1 / 127.5 + 1e-6)  # same picture, [-1, 1]
    assert np.allclose(by_name["clear.png"], 1.0)  # transparent -> white
    # a folder where no image is readable: one line, and no prepared dataset left behind
    bad = tmp_path / "bad"
    bad.mkdir()
    for i in range(3):
        (bad / f"x{i}.png").write_bytes(b"not a png")
        (bad / f"x{i}.txt").write_text("caption")
    with pytest.raises(DataError, match=r"none of the 3 images of split 'train' .* is readable"):
        input_pipeline.prepare(_folder_config(bad, tmp_path / "tfds_bad"))
    left = os.listdir(tmp_path / "tfds_bad") if (tmp_path / "tfds_bad").exists() else []
    assert [name for name in left if name != input_pipeline.PREPARE_LOCK] == []  # no dataset, only the lock file
