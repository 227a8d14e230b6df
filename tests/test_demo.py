"""The embedded default: the shipped demo model (demo/) generates what its captions say, and the recipe that
produced it (`make demo-train`) runs end to end at toy length."""

import itertools
import json
import os

import numpy as np
import pytest

from latentdiff import demo
from latentdiff.data import shapes
from latentdiff.evaluation import shapes_grader

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.join(REPO, "demo")


def test_shipped_demo_model_follows_caption_colour_position_and_size():
    """64 fixed-seed samples of the shipped model, graded from pixels, against issue 8's seen-caption targets for
    colour, position and size (shape, 0.906 on the report's 256 images and 0.887 on another 256, is too close to its
    0.90 target to assert on 64)."""
    from latentdiff.pipeline import Pipeline

    assert os.path.isfile(os.path.join(SHIPPED, "config.json")), (
        "demo/ holds no model: the repository must ship the model that `make demo-train` produced"
    )
    pipe = Pipeline.from_workdir(SHIPPED)
    s = pipe.config.sampling
    _, captions = shapes.make_examples(64, pipe.resolution, "validation", 4321)
    images = pipe(list(captions), sampler=s.sampler, steps=s.steps, guidance=s.guidance, seed=4321, batch_size=64)
    assert images.shape == (64, pipe.resolution, pipe.resolution, 3)
    grades = shapes_grader.grade(images, captions)
    assert grades["num_parsed"] == 64
    assert grades["colour"] >= 0.95, grades
    assert grades["position"] >= 0.90, grades
    assert grades["size"] >= 0.90, grades
    report = json.load(open(os.path.join(SHIPPED, "training_report.json")))
    assert report["command"] == "make demo-train" and report["overrides"] == []


def test_configs_saved_before_later_fields_are_migrated_when_read():
    """demo/config.json predates config.first_stage.dtype and text_encoder.attention_impl: reading it fills them with
    what the run used (config_utils.ADDED_FIELDS, the one migration), and it passes check_config; a field a config
    has is kept as it is."""
    from latentdiff.config_utils import load_workdir_config, migrate_config
    from latentdiff.train.ldm import check_config

    stored = json.load(open(os.path.join(SHIPPED, "config.json")))
    assert "dtype" not in stored["first_stage"] and "attention_impl" not in stored["text_encoder"]
    config = load_workdir_config(SHIPPED)
    check_config(config)
    assert (config.first_stage.dtype, config.text_encoder.attention_impl) == ("", "xla")
    assert config.first_stage.latents == stored["first_stage"]["latents"]  # present: kept
    config.first_stage.dtype = "bfloat16"
    assert migrate_config(config).first_stage.dtype == "bfloat16"


def demo_guidance() -> float:
    from latentdiff.config_utils import load_config

    return load_config(os.path.join(REPO, demo.LDM_CONFIG)).sampling.guidance


@pytest.mark.extended  # ~4 minutes: make test-extended
def test_demo_recipe_runs_end_to_end_at_toy_length(tmp_path):
    data = [
        "data.shapes_num_train=64",
        "data.shapes_num_validation=32",
        "data.shapes_num_novel=32",
        f"data.data_dir={tmp_path / 'tfds'}",
        "data.tokenizer_corpus_examples=64",
        "batch_size=8",
        "num_train_steps=3",
        "checkpoint_every=3",
        "image_every=3",
        "log_every=1",
    ]
    overrides = [f"ae.{o}" for o in [*data, "eval_every=3", "num_eval_batches=1"]]
    overrides += [f"ldm.{o}" for o in [*data, "sampling.steps=3"]]
    workdir, demo_dir = tmp_path / "work", tmp_path / "demo"
    report = demo.train(str(workdir), str(demo_dir), overrides, num=8)
    assert set(report["wall_seconds"]) == {"autoencoder", "latents", "ldm"}
    assert json.load(open(workdir / "latents" / "meta.json"))["num"] == 64  # stage 2 trained on precomputed latents
    scale = f"{demo_guidance():g}"
    for key in (f"seen@{scale}", "seen@1", f"novel@{scale}", "novel@1"):
        assert 0.0 <= report["alignment"][key]["colour"] <= 1.0
        assert report["alignment"][key]["num_images"] == 8
    shipped = json.load(open(demo_dir / "training_report.json"))
    assert shipped["overrides"] == overrides and shipped["images_per_cell"] == 8
    for path in ("config.json", "params/ema.safetensors", "first_stage/params.safetensors", "tokenizer"):
        assert (demo_dir / path).exists(), path
    # `make demo` on what was shipped: grid + report through the same pipeline as sample.py.
    run_report = demo.run(str(demo_dir), str(tmp_path / "out"), num=8)
    assert (tmp_path / "out" / "grid.png").stat().st_size > 0
    assert json.load(open(tmp_path / "out" / "report.json"))["images_per_cell"] == 8
    assert np.isfinite(run_report[f"seen@{scale}"]["colour"])
    # Re-running resumes: both stages are already at their last step, so no training step runs again.
    metrics = [workdir / stage / "metrics.jsonl" for stage in ("autoencoder", "ldm")]
    before = [p.read_text() for p in metrics]
    demo.train(str(workdir), str(demo_dir), overrides, num=8)
    assert [p.read_text() for p in metrics] == before


def test_demo_train_stops_after_a_preempted_stage(tmp_path, monkeypatch, capsys):
    """SIGTERM during stage 1 (its loop returns a state short of num_train_steps after writing its checkpoint): no
    latents are encoded from the half-trained autoencoder, stage 2 does not start, nothing is shipped."""
    import types

    import latentdiff.train

    calls = []

    def preempted_training(config, workdir):
        calls.append(config.stage)
        return types.SimpleNamespace(step=np.int32(2))

    monkeypatch.setattr(latentdiff.train, "train_and_evaluate", preempted_training)
    monkeypatch.setattr(demo, "encode_latents", lambda *a: calls.append("latents"))
    report = demo.train(str(tmp_path / "work"), str(tmp_path / "demo"), ["ae.num_train_steps=5"], num=8)
    assert report == {"stopped": {"stage": "autoencoder", "step": 2}} and calls == ["autoencoder"]
    assert "autoencoder stopped at step 2 of 5 (preempted)" in capsys.readouterr().out
    assert not (tmp_path / "demo").exists()


def test_demo_without_a_model_says_how_to_make_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="run `make demo-train`"):
        demo.run(str(tmp_path / "nothing"), str(tmp_path / "out"), num=8)


def test_make_demo_prints_a_progress_line_at_least_every_10_seconds(tmp_path):
    """`make demo` (demo run) printed nothing for minutes while it compiled and sampled; now every phase says what
    it does and a line comes at least every 10 s. Arrival times of the output lines are measured (--num 4)."""
    import re
    import subprocess
    import sys
    import time

    recipe = re.search(r"^demo:.*\n\t(.+)$", open(os.path.join(REPO, "Makefile")).read(), flags=re.M).group(1)
    assert recipe == "$(VENV)/bin/latentdiff demo run --demo_dir demo --out demo_out"  # what runs below, as make does
    latentdiff = os.path.join(os.path.dirname(sys.executable), "latentdiff")  # the install's console script
    command = [latentdiff, "demo", "run", "--demo_dir", SHIPPED, "--out", str(tmp_path), "--num", "4"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    start = time.monotonic()
    run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    arrivals, lines = [], []
    for line in run.stdout:
        arrivals.append(time.monotonic())
        lines.append(line.rstrip())
    assert run.wait(timeout=900) == 0, "\n".join(lines)
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert max(gaps) <= 10.0, list(zip(gaps, lines[1:]))
    assert arrivals[0] - start <= 30.0  # Python and JAX start-up before the first line (seconds on a loaded machine)
    text = "\n".join(lines)
    assert "sampling the grid: 12 prompts" in text and "scoring novel@1: 4 images" in text
    assert os.path.isfile(tmp_path / "report.json") and os.path.isfile(tmp_path / "grid.png")
