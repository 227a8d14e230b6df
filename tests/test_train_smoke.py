"""End-to-end smoke tests of both stages, the pipeline and the CLIs, at toy size (real code paths, tiny models)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from tiny_workdirs import shrink_data

from latentdiff.config_utils import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = dict(num_train=128, num_validation=32, num_novel=32)


def write_random_lpips_weights(path) -> str:
    """A random VGG16 + LPIPS weights file in our format (linear heads non-negative, as LPIPS requires)."""
    import jax

    from latentdiff.convert.lpips_weights import save_lpips_params
    from latentdiff.nn.lpips import abstract_lpips_params

    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: (0.05 * rng.standard_normal(a.shape)).astype(np.float32), abstract_lpips_params())
    params["lin"] = jax.tree.map(np.abs, params["lin"])
    save_lpips_params(params, str(path), source="test: random")
    return str(path)


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
    """A stage-1 workdir trained 6 steps (GAN switched on at step 3) and a stage-2 workdir trained 4 steps on it."""
    from latentdiff.train import train_and_evaluate

    root = tmp_path_factory.mktemp("smoke")
    ae = load_config(os.path.join(ROOT, "configs/autoencoder_kl_f8.py:tiny"))
    shrink_data(ae, root / "tfds", **DATA)
    ae.autoencoder.resolution = 16
    ae.autoencoder.ch = 32
    ae.autoencoder.ch_mult = (1, 1)
    ae.discriminator.ndf = 8
    ae.batch_size = 8
    ae.num_train_steps = 6
    ae.loss.disc_start = 3
    ae.log_every = ae.eval_every = ae.image_every = ae.checkpoint_every = 3
    ae.num_eval_batches = 1
    assert ae.loss.perceptual_weight == 0  # LPIPS is still reported: by evaluation.lpips_weights
    ae.evaluation.lpips_weights = write_random_lpips_weights(root / "lpips.safetensors")
    train_and_evaluate(ae, str(root / "ae"))

    ldm = load_config(os.path.join(ROOT, "configs/ldm_txt2img_kl8.py:tiny"))
    shrink_data(ldm, root / "tfds", **DATA)
    ldm.first_stage.workdir = str(root / "ae")
    ldm.first_stage.dtype = "bfloat16"  # the frozen encoder in bf16 (as on accelerators); the model stays float32
    ldm.unet.model_channels = 32
    ldm.unet.channel_mult = (1,)
    ldm.unet.attention_resolutions = (1,)
    ldm.unet.num_heads = 2
    ldm.unet.context_dim = ldm.text_encoder.width = 16
    ldm.text_encoder.depth = 1
    ldm.text_encoder.num_heads = 2
    ldm.text_encoder.head_dim = 8
    ldm.batch_size = 8
    ldm.num_train_steps = 4
    ldm.log_every = ldm.image_every = ldm.checkpoint_every = 2
    ldm.sampling.steps = 3
    train_and_evaluate(ldm, str(root / "ldm"))
    return root


def test_stage1_outputs(workdirs):
    ae = workdirs / "ae"
    assert sorted(os.listdir(ae / "checkpoints")) == ["3", "6"]
    rows = [json.loads(line) for line in open(ae / "metrics.jsonl")]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [3, 6]
    assert train_rows[0]["disc_loss"] == 0.0 and train_rows[1]["disc_loss"] > 0.0  # GAN from disc_start
    assert train_rows[1]["d_weight"] > 0.0
    assert all(np.isfinite(r["loss"]) for r in train_rows)
    assert json.load(open(ae / "eval.json"))["step"] == 6
    evaluations = [r for r in rows if "eval/psnr" in r]
    assert [r["step"] for r in evaluations] == [3, 6] and all(np.isfinite(r["eval/psnr"]) for r in evaluations)
    assert all(r["eval/lpips"] > 0 for r in evaluations)  # by evaluation.lpips_weights: no perceptual loss here
    assert Image.open(ae / "images" / "recon_0000006.png").size[0] > 0
    # stage 2 only read this workdir: nothing of its own written here (its first stage copy is in ldm/first_stage)
    assert sorted(os.listdir(ae)) == [
        "checkpoints",
        "config.json",
        "config_history.jsonl",
        "eval.json",
        "images",
        "metrics.jsonl",
        "tensorboard",
    ]


def test_stage2_outputs_and_pipeline(workdirs):
    from latentdiff.pipeline import Pipeline

    ldm = workdirs / "ldm"
    assert {"config.json", "tokenizer", "first_stage", "checkpoints", "images"} <= set(os.listdir(ldm))
    rows = [json.loads(line) for line in open(ldm / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [2, 4]
    assert json.load(open(ldm / "config.json"))["first_stage"]["dtype"] == "bfloat16"
    assert json.load(open(ldm / "first_stage" / "autoencoder.json"))["dtype"] == "float32"  # the export as trained
    assert all(k in rows[-1] for k in ("loss", "loss_t0000", "loss_t0750", "grad_norm", "ema_decay", "lr"))
    pipe = Pipeline.from_workdir(str(ldm))
    assert pipe.step == 4 and pipe.scale_factor > 0
    a = pipe(["a red circle", "a blue square"], sampler="ddim", steps=3, guidance=2.0, seed=3)
    b = pipe(["a red circle"], sampler="ddim", steps=3, guidance=2.0, seed=3)
    assert a.shape == (2, 16, 16, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a[:1], b)  # image i depends on (seed, i, prompt), not on the batch
    c = pipe(["a red circle"], sampler="dpmpp2m", steps=3, guidance=1.0, seed=3)
    assert c.shape == (1, 16, 16, 3)


def run_cli(*args, cwd=ROOT):
    env = dict(os.environ, LATENTDIFF_DEBUG="")
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=900)


def test_sample_cli_writes_images_with_metadata(workdirs, tmp_path):
    out = tmp_path / "samples"
    result = run_cli("sample.py", "--workdir", str(workdirs / "ldm"), "--prompt", "a red circle", "--n", "2",
                     "--steps", "2", "--out", str(out))  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(os.listdir(out)) == ["00000.png", "00001.png", "grid", "samples.json"]
    text = Image.open(out / "00001.png").text
    assert text["prompt"] == "a red circle" and text["steps"] == "2" and text["checkpoint_step"] == "4"
    manifest = json.load(open(out / "samples.json"))
    assert manifest["images"] == ["00000.png", "00001.png"] and manifest["conditions"] == ["a red circle"] * 2
    assert manifest["run"]["steps"] == "2" and manifest["run"]["checkpoint_step"] == "4"
    # a second run into the same folder replaces the first one's set instead of mixing with it
    again = run_cli("sample.py", "--workdir", str(workdirs / "ldm"), "--prompt", "a blue square", "--n", "1",
                    "--steps", "2", "--out", str(out))  # fmt: skip
    assert again.returncode == 0, again.stderr[-2000:]
    assert sorted(os.listdir(out)) == ["00000.png", "grid", "samples.json"] and "replacing" in again.stdout
    assert json.load(open(out / "samples.json"))["conditions"] == ["a blue square"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--n", "0"], "--n must be >= 1"),
        (["--steps", "5000"], "--steps must be between 1"),
        (["--guidance", "-1"], "--guidance must be a finite number >= 0"),
        (["--prompt_file", "EMPTY"], "has no prompts"),
        (["--prompt_file", "LATIN1"], "is not UTF-8"),
    ],
)
def test_sample_cli_bad_input_is_one_line(workdirs, tmp_path, extra, message):
    (tmp_path / "EMPTY").write_text("\n\n")
    (tmp_path / "LATIN1").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    extra = [str(tmp_path / e) if e in ("EMPTY", "LATIN1") else e for e in extra]
    prompt = [] if "--prompt_file" in extra else ["--prompt", "a red circle"]
    result = run_cli("sample.py", "--workdir", str(workdirs / "ldm"), *prompt, *extra, "--out", str(tmp_path / "o"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1], result.stderr[-1500:]
    assert "Traceback" not in result.stderr


def test_sample_cli_workdir_without_checkpoint(tmp_path, workdirs):
    empty = tmp_path / "w"
    empty.mkdir()
    result = run_cli("sample.py", "--workdir", str(empty), "--prompt", "x")
    assert result.returncode == 2 and "config.json" in result.stderr and "Traceback" not in result.stderr


def test_train_cli_config_errors_are_one_line(tmp_path):
    base = ["train.py", "--config", "configs/ldm_txt2img_kl8.py:tiny", "--workdir", str(tmp_path / "w")]
    unknown = run_cli(*base, "--config.unet.no_such_field=3")
    assert unknown.returncode != 0 and "no_such_field" in unknown.stderr and "Traceback" not in unknown.stderr
    wrong_type = run_cli(*base, "--config.batch_size=abc")
    assert wrong_type.returncode != 0 and "batch_size" in wrong_type.stderr and "Traceback" not in wrong_type.stderr
    missing = run_cli(*base)  # first_stage.workdir is required
    assert missing.returncode == 2 and "first_stage.workdir" in missing.stderr and "Traceback" not in missing.stderr
    bad_dtype = run_cli(*base, "--config.first_stage.workdir=x", "--config.first_stage.dtype=float16")
    assert bad_dtype.returncode != 0 and "first_stage.dtype must be" in bad_dtype.stderr
    assert "Traceback" not in bad_dtype.stderr
    variant = run_cli("train.py", "--config", "configs/ldm_txt2img_kl8.py:huge", "--workdir", str(tmp_path / "w"))
    assert variant.returncode != 0 and "unknown variant" in variant.stderr


def test_stage2_resume_continues_from_checkpoint(workdirs, tmp_path):
    """Re-running with the same workdir and a larger num_train_steps continues at the saved step."""
    import shutil

    from latentdiff.config_utils import load_workdir_config
    from latentdiff.train import train_and_evaluate

    work = tmp_path / "ldm"
    shutil.copytree(workdirs / "ldm", work)
    config = load_workdir_config(str(work))
    config.num_train_steps = 6
    state = train_and_evaluate(config, str(work))
    assert int(state.step) == 6
    steps = [json.loads(line)["step"] for line in open(work / "metrics.jsonl")]
    assert steps == [2, 4, 6]


def test_encode_tool_reports_scale_factor(workdirs, tmp_path):
    from latentdiff.encode_cli import encode_split

    meta = encode_split(str(workdirs / "ae"), str(tmp_path / "lat"), "validation", 16, 8, 0)
    mean = np.load(tmp_path / "lat" / "mean.npy", mmap_mode="r")  # one memory-mappable .npy per array
    logvar = np.load(tmp_path / "lat" / "logvar.npy", mmap_mode="r")
    assert mean.shape == (16, 8, 8, 4) and logvar.shape == (16, 8, 8, 4)
    assert meta["num"] == 16 and meta["latent_shape"] == [8, 8, 4] and meta["format"] == "npy"
    assert abs(meta["scale_factor"] * meta["latent_std"] - 1.0) < 1e-6
    assert len(open(tmp_path / "lat" / "captions.jsonl").read().splitlines()) == 16
