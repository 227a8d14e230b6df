"""No lost work (issue 24): a bad step never reaches a checkpoint, a damaged checkpoint falls back to the previous
one, one run per workdir, the workdir's record is never overwritten, every step is logged once after a resume, and
config numbers are checked before anything is written.

The loop tests drive `loop.run` with a one-parameter task (the loop's code paths, in seconds); the stage tests use
the real dispatcher with the tiny configs, refused before anything is built.
"""

import json
import logging
import os
import re
import shutil
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from latentdiff import checkpoint, config_utils, parallel
from latentdiff import workdir as workdir_lib
from latentdiff.config_blocks import run_block
from latentdiff.train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@flax.struct.dataclass
class ToyState:
    step: jax.Array
    w: jax.Array
    nonfinite_count: jax.Array
    nonfinite_streak: jax.Array


class CountingIterator:
    """Batches {'x': [2]} numbered by position; its position is checkpointed (get_state / set_state)."""

    def __init__(self) -> None:
        self.position = 0

    def __next__(self) -> dict:
        self.position += 1
        return {"x": np.full((2,), float(self.position), np.float32)}

    def get_state(self) -> dict:
        return {"position": self.position}

    def set_state(self, state: dict) -> None:
        self.position = int(state["position"])


def toy_task(bad_from: int | None = None) -> loop.Task:
    """w <- w - 0.1 * mean(x); from step `bad_from` on the loss is NaN (the update is then skipped)."""

    def init_state(rng):
        zero = jnp.zeros((), jnp.int32)
        return ToyState(step=zero, w=jnp.zeros((), jnp.float32), nonfinite_count=zero, nonfinite_streak=zero)

    def step_fn(state, batch, rng, constants):
        loss = jnp.mean(batch["x"]) * state.w
        if bad_from is not None:
            loss = jnp.where(state.step + 1 >= bad_from, jnp.nan, loss)
        finite = jnp.isfinite(loss)
        w = jnp.where(finite, state.w - 0.1 * jnp.mean(batch["x"]), state.w)
        new = state.replace(
            step=state.step + 1,
            w=w,
            nonfinite_count=state.nonfinite_count + (~finite).astype(jnp.int32),
            nonfinite_streak=jnp.where(finite, 0, state.nonfinite_streak + 1),
        )
        return new, loop.scalar_metrics(loss=jnp.where(finite, loss, 0.0), w=w)

    return loop.Task(init_state=init_state, step_for=lambda step: step_fn, batch_keys=("x",))


def toy_config(steps: int, **overrides) -> object:
    config = run_block(batch_size=2, num_train_steps=steps, seed=0)
    config.mesh.data = 1
    config.checkpoint_every = config.log_every = 1
    config.image_every = config.eval_every = 1000
    config.async_checkpointing = False
    config.progress_bar = False
    config.keep_checkpoints = 10
    config.max_consecutive_nonfinite = 3
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def run_toy(workdir, steps: int, bad_from: int | None = None, **overrides):
    mesh = parallel.make_mesh({"data": 1, "fsdp": 1}, jax.devices()[:1])
    return loop.run(toy_config(steps, **overrides), str(workdir), toy_task(bad_from), CountingIterator, mesh)


def ckpt_names(workdir) -> list[str]:
    return sorted(os.listdir(os.path.join(workdir, "checkpoints")))


def metric_steps(workdir) -> list[int]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line)["step"] for line in f]


# ------------------------------------------------------------------------------------------ 2. bad steps


def test_no_checkpoint_during_a_nonfinite_streak_and_the_suspect_is_set_aside(tmp_path):
    """Updates from step 5 are NaN: checkpoints 1..4 are written, none during the streak; the stop sets aside the
    state the streak started from (step 4) and names step 3 as the last good one; a rerun resumes from it."""
    work = tmp_path / "w"
    with pytest.raises(loop.NonFiniteError) as stop:
        run_toy(work, 10, bad_from=5)
    message = str(stop.value)
    assert "steps 5..7" in message and "set aside nonfinite-4" in message
    assert "last good checkpoint is step 3" in message and f"--workdir {work}" in message
    assert ckpt_names(work) == ["1", "2", "3", "nonfinite-4"]
    state = run_toy(work, 6)  # with the cause removed: resumes from step 3, not from the suspect
    assert int(state.step) == 6 and int(state.nonfinite_streak) == 0
    assert ckpt_names(work) == ["1", "2", "3", "4", "5", "6", "nonfinite-4"]
    assert metric_steps(work) == [1, 2, 3, 4, 5, 6]  # the failed run's rows after step 3 were dropped on resume


def test_config_numbers_are_checked_before_anything_is_written(tmp_path):
    from latentdiff.train import train_and_evaluate

    base = config_utils.load_config(os.path.join(ROOT, "configs/autoencoder_kl_f8.py:tiny"))
    cases = {
        "optim.lr": (1e6, "optim.lr=1000000.0 is out of range (0, 1]"),
        "optim.b1": (1.5, "optim.b1=1.5 is out of range"),
        "batch_size": (0, "batch_size=0 is out of range [1, inf)"),
        "checkpoint_every": (0, "checkpoint_every=0 is out of range [1, inf)"),
        "keep_checkpoints": (0, "keep_checkpoints=0 is out of range [1, inf)"),
    }
    for field, (value, expected) in cases.items():
        config = base.copy_and_resolve_references()
        section, _, name = field.rpartition(".")
        setattr(config[section] if section else config, name, value)
        with pytest.raises(config_utils.ConfigError, match=re.escape(expected)):
            train_and_evaluate(config, str(tmp_path / "w"))
    for value in (float("nan"), float("inf"), -1.0):
        config = base.copy_and_resolve_references()
        config.optim.lr = value
        with pytest.raises(config_utils.ConfigError, match=r"optim\.lr"):
            train_and_evaluate(config, str(tmp_path / "w"))
    config = base.copy_and_resolve_references()
    config.loss.kl_weight = float("nan")  # any float anywhere, table or not
    with pytest.raises(config_utils.ConfigError, match=r"loss\.kl_weight is nan"):
        train_and_evaluate(config, str(tmp_path / "w"))
    assert not (tmp_path / "w").exists()


# ------------------------------------------------------------------------------------------ 4. damaged checkpoints


def _truncate_data_files(step_dir: str) -> None:
    for root, _, files in os.walk(os.path.join(step_dir, "state")):
        for name in files:
            path = os.path.join(root, name)
            if "ocdbt" in root or name.startswith("d") or "manifest" in name:
                with open(path, "r+b") as f:
                    f.truncate(max(os.path.getsize(path) // 3, 1))


def _delete_data_files(step_dir: str) -> None:
    state = os.path.join(step_dir, "state")
    data_dirs = [n for n in os.listdir(state) if n == "d" or n.startswith("ocdbt.process_")]
    assert data_dirs, f"no data directory in {state}"
    for name in data_dirs:
        shutil.rmtree(os.path.join(state, name))


def _remove_commit_markers(step_dir: str) -> None:
    """A copy (rsync, gsutil) that missed orbax's commit markers: the checkpoint may be incomplete."""
    markers = [os.path.join(r, n) for r, _, files in os.walk(step_dir) for n in files if n == "commit_success.txt"]
    assert markers
    for path in markers:
        os.remove(path)


def _delete_metadata(step_dir: str) -> None:
    os.remove(os.path.join(step_dir, "state", "_METADATA"))


def _damage_iterator_state(step_dir: str) -> None:
    data_dir = os.path.join(step_dir, "data")
    for name in os.listdir(data_dir):
        with open(os.path.join(data_dir, name), "w") as f:
            f.write('{"process_count": 1, "processes": [{"posit')


DAMAGE = {
    "truncated data files": _truncate_data_files,
    "deleted data files": _delete_data_files,
    "missing metadata": _delete_metadata,
    "damaged iterator state": _damage_iterator_state,
    "no commit marker": _remove_commit_markers,
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_newest_checkpoint_falls_back_to_the_previous(tmp_path, caplog, damage):
    work = tmp_path / "w"
    run_toy(work, 3)
    expected_w = float(run_toy(tmp_path / "reference", 2).w)
    DAMAGE[damage](os.path.join(work, "checkpoints", "3"))
    with caplog.at_level(logging.WARNING, logger="latentdiff"):
        state = run_toy(work, 3, num_train_steps=2)  # nothing to train: just the restore
    assert int(state.step) == 2 and float(state.w) == pytest.approx(expected_w)
    assert "checkpoint" in caplog.text and "/3 is damaged" in caplog.text
    assert ckpt_names(work) == ["1", "2", "damaged-3"]  # kept, renamed aside, never picked again


def test_no_usable_checkpoint_is_one_line(tmp_path):
    work = tmp_path / "w"
    run_toy(work, 2)
    for step in ("1", "2"):
        _delete_metadata(os.path.join(work, "checkpoints", step))
    with pytest.raises(checkpoint.CheckpointDamagedError, match=r"no usable checkpoint in .*\(2 damaged"):
        run_toy(work, 3)


def test_a_config_mismatch_does_not_fall_back(tmp_path):
    """A checkpoint that does not fit the config is the config's problem: stop, do not hide it by falling back."""
    work = tmp_path / "w"
    run_toy(work, 2)
    mesh = parallel.make_mesh({"data": 1, "fsdp": 1}, jax.devices()[:1])
    task = toy_task()
    init = task.init_state
    task.init_state = lambda rng: init(rng).replace(w=jnp.zeros((3,), jnp.float32))
    with pytest.raises(checkpoint.CheckpointMismatchError, match="does not match the current config"):
        loop.run(toy_config(3), str(work), task, CountingIterator, mesh)
    assert ckpt_names(work) == ["1", "2"]


# ------------------------------------------------------------------------------------------ 3. the workdir


def test_second_run_on_a_workdir_is_refused_and_a_stale_lock_is_taken_over(tmp_path, caplog):
    work = str(tmp_path / "w")
    code = (
        "import sys; from latentdiff import workdir\n"
        "try:\n"
        "    with workdir.exclusive_run(sys.argv[1]): pass\n"
        "except workdir.WorkdirBusyError as e: print(e); sys.exit(7)\n"
    )
    with workdir_lib.exclusive_run(work):
        holder = open(os.path.join(work, workdir_lib.LOCK_FILE)).read()
        assert f"pid {os.getpid()}" in holder
        other = subprocess.run([sys.executable, "-c", code, work], capture_output=True, text=True, timeout=600)
        assert other.returncode == 7, other.stderr
        assert "in use by another training run" in other.stdout and f"pid {os.getpid()}" in other.stdout
    assert not os.path.exists(os.path.join(work, workdir_lib.LOCK_FILE))  # released on exit
    # a run killed with SIGKILL leaves its lock file (the kernel drops the lock itself): reported and taken over
    killed = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"from latentdiff import atomic_files, workdir; import time\nwith workdir.exclusive_run({work!r}):\n"
            f"    with atomic_files.replacing({work!r} + '/metrics.jsonl') as tmp, open(tmp, 'w') as f:\n"
            "        f.write('half'); f.flush(); print('locked', flush=True); time.sleep(600)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert killed.stdout.readline().strip() == "locked"
    killed.kill()
    killed.wait(timeout=300)
    with caplog.at_level(logging.WARNING, logger="latentdiff"), workdir_lib.exclusive_run(work):
        pass
    assert f"pid {killed.pid}" in caplog.text and "did not exit cleanly" in caplog.text
    assert sorted(os.listdir(work)) == [] and f"metrics.jsonl.tmp.{killed.pid}" in caplog.text  # its temporary too
    with pytest.raises(ValueError):  # an exception inside the run still releases the lock
        with workdir_lib.exclusive_run(work):
            raise ValueError
    with workdir_lib.exclusive_run(work):
        pass


def test_sigterm_while_a_program_writes_leaves_no_temporary(tmp_path):
    """A command-line program stopped by SIGTERM outside the train loop (encoding latents, sampling, a second SIGTERM
    after a preempted stage) unwinds: exit 143, its half-written temporary removed, the target untouched."""
    target = str(tmp_path / "mean.npy")
    code = (
        "import sys, time\nfrom latentdiff import atomic_files, errors\n"
        "def main():\n"
        "    with atomic_files.replacing(sys.argv[1]) as tmp, open(tmp, 'w') as f:\n"
        "        f.write('half'); f.flush(); print('writing', flush=True); time.sleep(600)\n"
        "errors.run_cli(main)\n"
    )
    run = subprocess.Popen(
        [sys.executable, "-c", code, target], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert run.stdout.readline().strip() == "writing"
    assert os.listdir(tmp_path) == [f"mean.npy.tmp.{run.pid}"]
    run.terminate()
    _, stderr = run.communicate(timeout=300)
    assert run.returncode == 143 and "stopped by SIGTERM" in stderr, stderr
    assert os.listdir(tmp_path) == []


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    from latentdiff import atomic_files

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    (tmp_path / "sub").mkdir()
    names = [f"a.json.tmp.{dead_pid}", f"sub/shard.npz.tmp.{dead_pid}.npz", f"b.json.tmp.{os.getpid()}", "c.tmp.x"]
    for name in names:
        (tmp_path / name).write_text("half")
    removed = atomic_files.remove_stale(str(tmp_path))
    assert sorted(os.path.relpath(p, tmp_path) for p in removed) == sorted(names[:2])
    assert sorted(os.listdir(tmp_path)) == [names[2], "c.tmp.x", "sub"]


def test_config_history_keeps_the_original(tmp_path):
    work = str(tmp_path / "w")
    config = config_utils.load_config(os.path.join(ROOT, "configs/autoencoder_kl_f8.py:tiny"))
    workdir_lib.record_config(config, work, 0)
    original = open(os.path.join(work, "config.json")).read()
    workdir_lib.record_config(config, work, 100)  # unchanged: no entry
    changed = config.copy_and_resolve_references()
    changed.optim.lr = 1e-4
    workdir_lib.record_config(changed, work, 200)
    assert open(os.path.join(work, "config.json")).read() == original
    with open(os.path.join(work, workdir_lib.HISTORY_FILE)) as f:
        entries = [json.loads(line) for line in f]
    assert [e["step"] for e in entries] == [0, 200]
    assert entries[1]["changes"] == {"optim.lr": [0.001, 0.0001]} and entries[1]["config"]["optim"]["lr"] == 1e-4


def test_another_stage_or_model_on_a_workdir_is_refused_before_anything_is_written(tmp_path):
    from latentdiff.train import train_and_evaluate

    work = tmp_path / "w"
    ldm = config_utils.load_config(os.path.join(ROOT, "configs/ldm_txt2img_kl8.py:tiny"))
    workdir_lib.record_config(ldm, str(work), 0)
    before = {p: (work / p).read_bytes() for p in os.listdir(work)}
    ae = config_utils.load_config(os.path.join(ROOT, "configs/autoencoder_kl_f8.py:tiny"))
    with pytest.raises(ValueError, match="holds a 'ldm' run but the config is stage 'autoencoder'"):
        train_and_evaluate(ae, str(work))
    bigger = ldm.copy_and_resolve_references()
    bigger.unet.model_channels = 64
    bigger.unet.remat = True  # an implementation field alone would be allowed
    with pytest.raises(ValueError, match=r"another model \(unet.model_channels = 32, the config says 64\)"):
        train_and_evaluate(bigger, str(work))
    assert {p: (work / p).read_bytes() for p in os.listdir(work)} == before


def test_malformed_workdir_json_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text('{"stage": "ldm",')
    with pytest.raises(config_utils.ConfigError, match=r"config.json \(the workdir's config\) is not valid JSON"):
        config_utils.load_workdir_config(str(tmp_path))


# ------------------------------------------------------------------------------------------ 5. inputs first


def test_sampling_flags_and_outputs_are_checked_before_the_model_loads(tmp_path):
    """The workdir has a config but no checkpoint: each error must come from the checks, not from loading."""
    from latentdiff import sample_cli

    work = tmp_path / "w"
    workdir_lib.record_config(
        config_utils.load_config(os.path.join(ROOT, "configs/ldm_txt2img_kl8.py:tiny")), str(work), 0
    )
    a_file = tmp_path / "file.png"
    a_file.write_bytes(b"x")
    base = ["--workdir", str(work), "--prompt", "a red circle"]
    cases = [
        (["--out", str(a_file)], "--out .* is an existing file"),
        (["--out", str(a_file / "sub")], "is a file, not a directory"),
        (["--guidance", "nan"], "--guidance must be a finite number"),
        (["--guidance", "inf"], "--guidance must be a finite number"),
        (["--eta", "nan"], "--eta must be in"),
        (["--steps", "0"], "--steps must be between 1 and the model's 1000"),
        (["--steps", "5000"], "--steps must be between 1 and the model's 1000"),
        (["--n", "0"], "--n must be >= 1"),
    ]
    for extra, expected in cases:
        with pytest.raises(ValueError, match=expected):
            sample_cli.run(sample_cli.parse_args([*base, *extra]))
    with pytest.raises(FileNotFoundError, match="no stage-1 autoencoder"):  # checks pass: only then the model loads
        sample_cli.run(sample_cli.parse_args([*base, "--out", str(tmp_path / "out")]))
    assert not (tmp_path / "out").exists()


def test_fid_outputs_are_checked_before_reading_images(tmp_path):
    from latentdiff.evaluation import fid

    a_file = tmp_path / "f"
    a_file.write_text("x")
    with pytest.raises(SystemExit) as stop:
        fid.main(["--generated", "/nonexistent", "--reference", "/nonexistent", "--json", str(a_file / "r.json")])
    assert "--json" in str(stop.value) and "is a file, not a directory" in str(stop.value)


def test_eval_numbers_are_checked_before_the_model_loads(tmp_path):
    from latentdiff.evaluation import alignment, txt2img

    work = tmp_path / "w"
    workdir_lib.record_config(
        config_utils.load_config(os.path.join(ROOT, "configs/ldm_txt2img_kl8.py:tiny")), str(work), 0
    )
    base = ["--workdir", str(work), "--reference", "tfds:coco_captions/validation"]
    for extra, expected in [
        (["--guidance", "nan"], "--guidance must be a finite number"),
        (["--num", "1"], "--num must be >= 2"),
        (["--shard_size", "0"], "--shard_size must be >= 1"),
        (["--steps", "2000"], "--steps must be between 1 and the model's 1000"),
    ]:
        with pytest.raises(ValueError, match=expected):
            txt2img.run(txt2img.parse_args([*base, *extra]))
    with pytest.raises(ValueError, match="--eta must be in"):
        alignment.run(alignment.parse_args(["--workdir", str(work), "--eta", "-0.5"]))


def test_pytorch_files_without_pytorch_are_one_line(tmp_path, monkeypatch, capsys):
    """Reading a .pth needs torch (never needed to train or sample): without it, one line naming the fix, for every
    reader of PyTorch files (they share convert.weight_files.import_torch)."""
    from latentdiff.convert import inception_weights, lpips_weights
    from latentdiff.convert.key_tables import ConversionError
    from latentdiff.convert.weight_files import read_weights

    pth = tmp_path / "weights.pth"
    pth.write_bytes(b"not a zip: a pickle would follow")
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    for read in (inception_weights.read_state_dict, lpips_weights.load_torch_state_dict, read_weights):
        with pytest.raises(ConversionError, match=r"weights\.pth \(a PyTorch pickle file\) needs PyTorch"):
            read(str(pth))
    with pytest.raises(SystemExit) as exit_info:
        inception_weights.main(["--src", str(pth), "--out", str(tmp_path / "out.safetensors")])
    assert "needs PyTorch: `pip install torch`" in str(exit_info.value) and "\n" not in str(exit_info.value)


def test_an_output_under_a_filesystem_that_refuses_writes_is_one_line_before_any_work(tmp_path):
    """os.access says yes to root for /proc (and read-only mounts); the parent is probed by creating (and removing)
    an empty directory, so `--out /proc/x` fails before a model loads, not after the images are generated."""
    from latentdiff.errors import UserError
    from latentdiff.output_paths import check_output_dir, check_output_file

    for check in (check_output_dir, check_output_file):
        with pytest.raises(UserError, match=r"--out '/proc/x/y': cannot .* pass a writable path"):
            check("/proc/x/y", "--out")
    check_output_dir(str(tmp_path / "a" / "b"), "--out")  # a writable parent passes and nothing is left in it
    assert os.listdir(tmp_path) == []
