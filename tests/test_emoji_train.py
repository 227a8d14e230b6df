"""`latentdiff emoji-train` (latentdiff/emoji_train.py): the recipe's helpers, its one-line errors, and (extended
tier) the whole recipe at toy length on a small emoji-like tarball: data, both stages, classifier, report, grid."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_emoji_data import listing, make_tarball

from latentdiff import emoji_train


def test_encode_batch_divides_the_training_split():
    assert emoji_train.largest_divisor(3300, 128) == 110  # 3420 emoji - 120 validation: no image dropped
    assert emoji_train.largest_divisor(97, 128) == 97
    assert emoji_train.largest_divisor(997, 128) == 1  # a prime above the limit: one image per batch


def test_grid_prompts_take_one_base_emoji_per_category_then_the_made_up_ones():
    captions = ["cat face", "dog: dark skin tone", "dog", "apple", "pear"]
    labels = np.array([0, 1, 1, 2, 2])
    prompts = emoji_train.grid_prompts(captions, labels)
    assert prompts[:3] == ["cat face", "dog", "apple"] and prompts[3:] == list(emoji_train.GRID_MADE_UP)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--guidances", "0.5"], "--guidances must be one or more scales >= 1"),
        (["--classifier_steps", "0"], "--classifier_steps >= 1"),
        (["--lpips_weights", "/nonexistent/lpips.safetensors"], "no such file (fetch: latentdiff fetch-lpips-weights)"),
        (["--override", "stage3.x=1"], "expected ae.FIELD=VALUE or ldm.FIELD=VALUE"),
        (["--out", "/proc/version"], "is an existing file; pass a directory"),
    ],
)
def test_bad_arguments_are_one_line_errors(tmp_path, capsys, argv, message):
    make_tarball(tmp_path / "e.tgz", listing(30))
    base = ["--workdir", str(tmp_path / "w"), "--data", str(tmp_path / "d"), "--tarball", str(tmp_path / "e.tgz")]
    with pytest.raises(SystemExit) as exit_info:
        emoji_train.main([*base, "--out", str(tmp_path / "o"), *argv])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and message in err and "\n" not in err
    assert not (tmp_path / "w").exists()  # refused before anything trained


@pytest.mark.extended  # ~5 minutes alone on 2 cores: make test-extended
def test_emoji_recipe_runs_end_to_end_at_toy_length(tmp_path):
    tarball = make_tarball(tmp_path / "e.tgz", listing(60))
    run = ["num_train_steps=2", "checkpoint_every=2", "image_every=2", "log_every=1", "batch_size=8",
           f"data.data_dir={tmp_path / 'tfds'}", "data.folder_num_validation=8"]  # fmt: skip
    overrides = [f"ae.{o}" for o in [*run, "eval_every=2", "num_eval_batches=1"]]
    overrides += [f"ldm.{o}" for o in [*run, "evaluation.steps=2", "evaluation.num_images=8"]]
    argv = ["--workdir", str(tmp_path / "w"), "--data", str(tmp_path / "d"), "--tarball", tarball,
            "--out", str(tmp_path / "o"), "--guidances", "1", "2", "--classifier_steps", "3"]  # fmt: skip
    for o in overrides:
        argv += ["--override", o]
    report = emoji_train.train(emoji_train.parse_args(argv))
    assert set(report["wall_seconds"]) == {"autoencoder", "latents", "ldm", "report"}
    assert json.load(open(tmp_path / "d" / "meta.json"))["images"]["train"] > 0
    assert set(report["validation"]) == {"1", "2"} and report["chosen_guidance"] in (1.0, 2.0)
    held = report[f"heldout@{report['chosen_guidance']:g}"]
    assert 0.0 <= held["category"]["accuracy"] <= 1.0 and held["kid_subset"] >= 2 and np.isfinite(held["fid"])
    assert held["memorisation"]["generated_median"] >= 0.0  # toy images: every held-out one duplicates a training one
    s1 = report["stage1"]
    assert s1["latent"] == "16x16x3" and s1["bicubic_side"] == 16 and np.isfinite(s1["psnr"])
    assert (tmp_path / "o" / "grid.png").stat().st_size > 0
    assert json.load(open(tmp_path / "o" / "report.json"))["overrides"] == overrides
    # Re-running resumes: both stages are at their last step, the classifier is reused, no training step runs again.
    logs = [tmp_path / "w" / stage / "metrics.jsonl" for stage in ("autoencoder", "ldm")]
    before = [p.read_text() for p in logs]
    emoji_train.train(emoji_train.parse_args(argv))
    assert [p.read_text() for p in logs] == before
