"""README "Train on a Cloud TPU pod": every command checked as far as this machine allows. Shell blocks and the
commands run on the workers parse (`bash -n`); the pre-flight command runs up to the compiler (its config, topology,
mesh and batch checks, the programs built from abstract shapes); each train.py command's flags parse against its
config (every overridden field exists) and its mesh and batch fit the slice it is launched on."""

import os
import re
import shlex
import subprocess
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from latentdiff.tools.preflight import cli as preflight_cli
from latentdiff.tools.preflight.report import ProgramReport

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLICE_CHIPS = {"v5p-128": 64}


def tpu_section() -> str:
    text = open(os.path.join(ROOT, "README.md")).read()
    start = text.index("## Train on a Cloud TPU pod")
    return text[start : text.index("\n## ", start + 1)]


def bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", tpu_section(), flags=re.S)


def worker_commands() -> list[str]:
    """The `&&`-separated commands inside each gcloud ... --command='...' (continuations joined)."""
    out = []
    for quoted in re.findall(r"--command='(.*?)'", "\n".join(bash_blocks()), flags=re.S):
        out += [c.strip() for c in quoted.replace("\\\n", " ").split("&&") if c.strip()]
    return out


def local_commands() -> list[str]:
    """The section's commands that run on the user's machine (latentdiff ..., one per line after joining)."""
    joined = "\n".join(bash_blocks()).replace("\\\n", " ")
    return [line.strip() for line in joined.splitlines() if line.strip().startswith("latentdiff ")]


def test_shell_blocks_and_worker_commands_parse():
    blocks = bash_blocks()
    assert len(blocks) >= 2
    for block in blocks:
        subprocess.run(["bash", "-n"], input=block, text=True, check=True)
    worker_commands = re.findall(r"--command='(.*?)'", "\n".join(blocks), flags=re.S)
    assert len(worker_commands) >= 3
    for cmd in worker_commands:
        subprocess.run(["bash", "-n"], input=cmd, text=True, check=True)
    slices = set(re.findall(r"--accelerator-type=(\S+)", "\n".join(blocks)))
    assert slices <= set(SLICE_CHIPS), slices


def test_preflight_command_runs_up_to_the_compiler(monkeypatch, capsys):
    cmds = [c for c in local_commands() if c.startswith("latentdiff preflight ")]
    assert cmds
    compiled = []

    def no_compile(program, capacity):
        compiled.append(program.name)
        return ProgramReport(program.name, program.batch, program.state, 1, 0, 0, 0, 0.0, 0.0, 0.0, 1.0, 0.0,
                                       capacity)  # fmt: skip

    monkeypatch.setattr(preflight_cli, "compile_program", no_compile)
    monkeypatch.chdir(ROOT)
    for cmd in cmds:
        argv = shlex.split(cmd)[2:]
        assert preflight_cli.run(preflight_cli.parse_args(argv)) == 0
    assert compiled == ["train"] * len(cmds)
    assert "v5p:4x4x4 (64 devices" in capsys.readouterr().out


@pytest.mark.parametrize("index", [0, 1])
def test_train_commands_parse_and_fit_the_slice(index, monkeypatch):
    cmds = [c for c in worker_commands() if c.startswith("python train.py")]
    assert len(cmds) == 2
    argv = shlex.split(cmds[index])[1:]  # train.py ARGS (argv[0] = the script, as absl expects)
    monkeypatch.chdir(ROOT)
    values = flags.FlagValues()
    holder = config_flags.DEFINE_config_file(
        "config", None, "config", flag_values=values, lock_config=True, sys_argv=argv
    )  # sys_argv: which --config.FIELD overrides to define
    flags.DEFINE_string("workdir", None, "workdir", flag_values=values)
    values(argv)  # absl parses argv[1:]
    config = holder.value
    assert values.workdir.startswith("/mnt/gcs/")
    chips = SLICE_CHIPS["v5p-128"]
    data, fsdp = config.mesh.data, config.mesh.fsdp
    if data == -1:
        data = chips // fsdp
    assert data * fsdp == chips
    assert config.batch_size % (data * fsdp) == 0
    assert config.distributed.num_processes == -1


def test_fetch_lpips_weights_takes_out():
    assert "latentdiff fetch-lpips-weights --out weights" in worker_commands()
    latentdiff = os.path.join(os.path.dirname(sys.executable), "latentdiff")  # the console script of the install
    out = subprocess.run([latentdiff, "fetch-lpips-weights", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--out" in out.stdout


def test_a_url_workdir_is_refused_with_the_mount_advice():
    from latentdiff.config_utils import load_config, load_workdir_config
    from latentdiff.train import train_and_evaluate

    config = load_config(os.path.join(ROOT, "configs/autoencoder_kl_f8.py:tiny"))
    with pytest.raises(ValueError, match="gcsfuse"):
        train_and_evaluate(config, "gs://bucket/ae")
    with pytest.raises(ValueError, match="mounted path"):
        load_workdir_config("gs://bucket/ldm")
