"""Full fine-tuning (config.init_from, latentdiff/train/finetune.py) from the shipped demo model, a workdir in the
converted format (params/ema.safetensors), as models converted from diffusers / CompVis / SD v1 are: the run starts
from its weights with a fresh optimizer, adopts its first stage, tokenizer and scale factor, keeps frozen parts
fixed, and refuses a base of another model in one line."""

from __future__ import annotations

import filecmp
import json
import os

import jax
import numpy as np
import pytest
from tiny_workdirs import shrink_data

from latentdiff.config_utils import load_config, load_workdir_config
from latentdiff.errors import UserError
from latentdiff.workdir import load_converted_params, restore_stage2_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "demo")


def demo_finetune_config(tmp_path, steps: int):
    config = load_config(os.path.join(ROOT, "configs/ldm_txt2img_kl8.py:demo"))
    shrink_data(config, tmp_path / "tfds", num_train=64, num_validation=16, num_novel=16)
    config.data.resolution = 32  # the demo's resolution
    config.init_from = DEMO
    config.batch_size = 8
    config.num_train_steps = steps
    config.log_every = config.checkpoint_every = steps
    config.eval_every = config.image_every = 10**9
    config.optim.warmup_steps = 0
    config.optim.lr = 1e-3
    return config


def test_finetuning_the_demo_starts_from_its_weights_and_keeps_the_text_encoder_frozen(tmp_path):
    from latentdiff.train import train_and_evaluate

    config = demo_finetune_config(tmp_path, steps=2)
    config.freeze = ("cond",)
    workdir = str(tmp_path / "ft")
    state = train_and_evaluate(config, workdir)
    base = load_converted_params(DEMO, load_workdir_config(DEMO), use_ema=True)
    params = jax.device_get(state.params)
    jax.tree.map(np.testing.assert_array_equal, params["cond"], base["params"]["cond"])  # frozen: exactly the base
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.ema_params)["cond"], base["params"]["cond"])
    moved = jax.tree.leaves(
        jax.tree.map(lambda a, b: float(np.abs(a - b).max()), params["unet"], base["params"]["unet"])
    )
    assert max(moved) > 0 and max(moved) < 0.05  # two small steps away from the base, not a fresh init
    assert int(jax.device_get(state.opt_state.count)) == 2  # a fresh optimizer, not the base's
    assert float(state.scale_factor) == pytest.approx(base["scale_factor"])  # latents scaled as the base's
    for name in ("first_stage/params.safetensors", "tokenizer/tokenizer.json"):
        assert filecmp.cmp(os.path.join(DEMO, name), os.path.join(workdir, name), shallow=False), name
    restored = restore_stage2_params(workdir, load_workdir_config(workdir))
    assert restored["step"] == 2 and json.load(open(os.path.join(workdir, "config.json")))["init_from"] == DEMO
    # a trained workdir (checkpoints) as the base: its newest EMA and params, scale factor read from its checkpoint
    again = demo_finetune_config(tmp_path, steps=1)
    again.init_from = workdir
    again.optim.lr = 1e-12  # one step that barely moves: the start is the base's live params
    state2 = train_and_evaluate(again, str(tmp_path / "ft2"))
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), jax.device_get(state2.params), restored["params"]
    )
    assert float(state2.scale_factor) == pytest.approx(float(restored["scale_factor"]))


def test_a_base_of_another_model_or_a_bad_freeze_is_one_line(tmp_path):
    from latentdiff.train import train_and_evaluate

    config = demo_finetune_config(tmp_path, steps=1)
    config.unet.model_channels = 32
    with pytest.raises(UserError, match=r"holds another model: unet\.model_channels = 64 there, 32 here") as err:
        train_and_evaluate(config, str(tmp_path / "a"))
    assert "\n" not in str(err.value)
    config = demo_finetune_config(tmp_path, steps=1)
    config.freeze = ("unet", "cond")
    with pytest.raises(UserError, match="not all: then nothing trains"):
        train_and_evaluate(config, str(tmp_path / "b"))
    config = demo_finetune_config(tmp_path, steps=1)
    config.init_from = str(tmp_path / "d")
    with pytest.raises(UserError, match="is the run's own --workdir"):
        train_and_evaluate(config, str(tmp_path / "d"))
    config = demo_finetune_config(tmp_path, steps=1)
    config.init_from = str(tmp_path / "nowhere")
    with pytest.raises(UserError, match="is not a directory"):
        train_and_evaluate(config, str(tmp_path / "c"))
