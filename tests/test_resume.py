"""Reliability of `train.py` runs: SIGKILL at any point (also in the middle of an async checkpoint save) and restart
reaches params bit-identical to an uninterrupted run; SIGTERM (preemption) writes a checkpoint, exits 0, and the next
run continues from it.

Every run is a real `train.py` subprocess (stage 2, tiny shrunk LDM, shapes data, async orbax checkpoints) on one CPU
device; the first run fills a persistent XLA compilation cache that the restarts reuse.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from tiny_workdirs import TINY_LDM_OVERRIDES, write_random_first_stage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_STEPS = 10


def train_args(workdir: str, data_dir: str) -> list[str]:
    overrides = TINY_LDM_OVERRIDES | {
        "data.data_dir": data_dir,
        "num_train_steps": NUM_STEPS,
        "checkpoint_every": 2,
        "keep_checkpoints": 3,
    }
    flags = [f"--config.{k}={v}" for k, v in overrides.items()]
    return [sys.executable, "train.py", "--config", "configs/ldm_txt2img_kl8.py:tiny", "--workdir", workdir, *flags]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A stage-2 workdir template holding a random tiny stage-1 export, a data dir and a compilation cache."""
    root = tmp_path_factory.mktemp("resume")
    write_random_first_stage(root / "template" / "first_stage")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    env |= {
        "JAX_COMPILATION_CACHE_DIR": str(root / "jax_cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
    }
    return {"root": root, "data_dir": str(root / "tfds"), "env": env}


def new_workdir(setup: dict, name: str) -> str:
    workdir = str(setup["root"] / name)
    shutil.copytree(setup["root"] / "template", workdir)
    return workdir


class Run:
    """One train.py process; its output goes to workdir/run_N.log."""

    def __init__(self, setup: dict, workdir: str, index: int) -> None:
        self.workdir = workdir
        self.rows_before = len(metric_rows(workdir))
        self.file_before = metrics_file_id(workdir)
        self.start_step = max((int(d) for d in checkpoint_dirs(workdir) if d.isdigit()), default=0)
        self.log_path = os.path.join(workdir, f"run_{index}.log")
        self.proc = subprocess.Popen(
            train_args(workdir, setup["data_dir"]),
            cwd=ROOT,
            env=setup["env"],
            stdout=open(self.log_path, "wb"),
            stderr=subprocess.STDOUT,
        )

    def new_rows(self) -> list[dict]:
        """Rows this run logged. On resume the trainer rewrites metrics.jsonl without the rows a killed run logged
        after its last checkpoint (a new file): then this run's rows are those after its start step."""
        rows = metric_rows(self.workdir)
        if metrics_file_id(self.workdir) != self.file_before:
            return [r for r in rows if r["step"] > self.start_step]
        return rows[self.rows_before :]

    def wait_until(self, condition, what: str, timeout: float = 900.0) -> None:
        deadline = time.time() + timeout
        while not condition():
            if self.proc.poll() is not None:
                raise AssertionError(f"run ended (status {self.proc.returncode}) before {what}:\n{self.log()[-3000:]}")
            if time.time() > deadline:
                self.proc.kill()
                raise AssertionError(f"timed out waiting for {what}:\n{self.log()[-3000:]}")
            time.sleep(0.005)

    def finish(self, timeout: float = 900.0) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"run did not finish:\n{self.log()[-3000:]}") from None

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()


def metric_rows(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


def metrics_file_id(workdir: str) -> int | None:
    path = os.path.join(workdir, "metrics.jsonl")
    return os.stat(path).st_ino if os.path.exists(path) else None


def checkpoint_dirs(workdir: str) -> list[str]:
    path = os.path.join(workdir, "checkpoints")
    return sorted(os.listdir(path)) if os.path.isdir(path) else []


def saved_steps(workdir: str) -> list[int]:
    from latentdiff import checkpoint

    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=100, async_save=False)
    try:
        return ckpt.all_steps()
    finally:
        ckpt.close()


def read_state(workdir: str, step: int) -> dict[str, np.ndarray]:
    import jax

    from latentdiff import checkpoint

    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=100, async_save=False)
    try:
        tree = ckpt.read_numpy(step)
    finally:
        ckpt.close()
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.slow
def test_sigkill_at_three_points_and_sigterm_then_resume_is_bit_identical(setup):
    """Uninterrupted run vs a run killed with SIGKILL at two random steps and once in the middle of an async
    checkpoint save, then stopped with SIGTERM, then finished: the final states (params, EMA, optimizer, counters)
    are bit-identical; the SIGTERM run exits 0 with a checkpoint at the step it stopped, and the next run resumes
    from exactly there."""
    reference = new_workdir(setup, "uninterrupted")
    run = Run(setup, reference, 0)
    assert run.finish() == 0, run.log()[-3000:]
    assert [r["step"] for r in metric_rows(reference)] == list(range(1, NUM_STEPS + 1))

    workdir = new_workdir(setup, "interrupted")
    kill_steps = sorted(random.Random(24).sample(range(2, NUM_STEPS - 1), 2))  # fixed: a failure reproduces
    runs = 0
    for i, k in enumerate(kill_steps):  # SIGKILL once the run has logged step k (anywhere in its step/log/save cycle)
        run = Run(setup, workdir, runs := runs + 1)

        def reached(r: Run = run, k: int = k, need_checkpoint: bool = i > 0) -> bool:
            # The second kill comes after a complete checkpoint exists, so the next run resumes from one.
            done = any(d.isdigit() for d in checkpoint_dirs(workdir)) or not need_checkpoint
            return done and any(row["step"] >= k for row in r.new_rows())

        run.wait_until(reached, f"step {k}")
        run.proc.send_signal(signal.SIGKILL)
        assert run.finish() == -signal.SIGKILL

    # SIGKILL while this run's async save is being written: the half-written checkpoint exists only as a temporary
    # directory, which no later run picks up (and the next run deletes).
    run = Run(setup, workdir, runs := runs + 1)
    run.wait_until(
        lambda: run.new_rows() and any("tmp" in d for d in checkpoint_dirs(workdir)), "an async save in progress"
    )
    run.proc.send_signal(signal.SIGKILL)
    assert run.finish() == -signal.SIGKILL
    partial = [d for d in checkpoint_dirs(workdir) if "tmp" in d]
    complete = saved_steps(workdir)
    assert partial and all(int(d.split(".")[0]) not in complete for d in partial)

    # SIGTERM (preemption): checkpoint at the current step, exit status 0.
    run = Run(setup, workdir, runs := runs + 1)
    run.wait_until(lambda: len(run.new_rows()) >= 1, "a step after restart")
    run.proc.send_signal(signal.SIGTERM)
    assert run.finish() == 0, run.log()[-3000:]
    stopped = run.new_rows()[-1]["step"]
    assert f"checkpoint written at step {stopped}" in run.log()
    if stopped < NUM_STEPS:
        assert max(saved_steps(workdir)) == stopped

        run = Run(setup, workdir, runs := runs + 1)
        assert run.finish() == 0, run.log()[-3000:]
        assert f"resumed from step {stopped} (checkpoint" in run.log()
        assert run.new_rows()[0]["step"] == stopped + 1
    assert not [d for d in checkpoint_dirs(workdir) if "tmp" in d]  # leftovers of the killed save were removed

    want, got = read_state(reference, NUM_STEPS), read_state(workdir, NUM_STEPS)
    assert got.keys() == want.keys()
    for key, value in want.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)
    assert [r["step"] for r in metric_rows(workdir)] == list(range(1, NUM_STEPS + 1))  # each step once, no repeats
    last = {r["step"]: r for r in metric_rows(workdir)}
    assert [last[s]["loss"] for s in range(1, NUM_STEPS + 1)] == [r["loss"] for r in metric_rows(reference)]
