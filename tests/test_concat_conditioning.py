"""Concat conditioning (latentdiff/conditioning.py) for the inpainting and super-resolution LDMs, and a few training
steps of configs/ldm_inpaint.py:tiny and configs/ldm_sr4.py:tiny."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from tiny_workdirs import shrink_data, train_tiny_kl_f4

from latentdiff import conditioning
from latentdiff.config_utils import load_config
from latentdiff.first_stage import FirstStage, abstract_autoencoder_variables
from latentdiff.nn.autoencoder import build_autoencoder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def first_stage():
    """A random KL-f4 autoencoder at 16 px (params from eval_shape + numpy: no jitted init)."""
    config = load_config(os.path.join(ROOT, "configs/autoencoder_kl_f4.py:tiny")).autoencoder
    config.resolution = 16
    config.ch = 32
    abstract = abstract_autoencoder_variables(config)
    rng = np.random.default_rng(0)
    variables = jax.tree.map(lambda s: jnp.asarray(0.1 * rng.standard_normal(s.shape), s.dtype), abstract)
    return FirstStage(config=config, module=build_autoencoder(config), variables=variables)


def images(batch, size, seed=0):
    return jnp.asarray(np.random.default_rng(seed).uniform(-1, 1, (batch, size, size, 3)), jnp.float32)


def test_concat_channels():
    assert conditioning.concat_channels("none", 4) == 0
    assert conditioning.concat_channels("inpaint", 4) == 5
    assert conditioning.concat_channels("inpaint", 3) == 4
    assert conditioning.concat_channels("sr", 4) == 3
    with pytest.raises(ValueError, match=r"conditioning\.concat must be one of"):
        conditioning.concat_channels("depth", 4)


def test_make_concat_shapes_and_zero_mask_is_the_plain_encoding(first_stage):
    x = images(2, 16)
    mask = conditioning.random_masks(jax.random.key(0), 2, 16, 16)
    make = jax.jit(
        lambda v, x, m, lr: (
            conditioning.make_concat("inpaint", first_stage=first_stage, first_stage_variables=v, scale_factor=0.5,
                                     latent_hw=(4, 4), image=x, mask=m),
            conditioning.make_concat("sr", first_stage=first_stage, first_stage_variables=v, scale_factor=0.5,
                                     latent_hw=(4, 4), low_res=lr),
        )
    )  # fmt: skip
    inpaint, sr = make(first_stage.variables, x, mask, conditioning.low_res_from_image(x, 4))
    assert inpaint.shape == (2, 4, 4, 5) and sr.shape == (2, 4, 4, 3)

    zero, _ = make(first_stage.variables, x, jnp.zeros_like(mask), x[:, ::4, ::4])
    plain = 0.5 * first_stage.encode(first_stage.variables, x, None, False)
    np.testing.assert_allclose(np.asarray(zero[..., :4]), np.asarray(plain), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(zero[..., 4]), 0.0)

    # the mask channel is the area average of the mask over each 4x4 block (numpy reference)
    m = np.asarray(mask)[..., 0]
    np.testing.assert_allclose(np.asarray(inpaint[..., 4]), m.reshape(2, 4, 4, 4, 4).mean(axis=(2, 4)), atol=1e-6)
    # the masked image is what gets encoded: a full mask encodes a grey (zero) image
    full, _ = make(first_stage.variables, x, jnp.ones_like(mask), x[:, ::4, ::4])
    grey = 0.5 * first_stage.encode(first_stage.variables, jnp.zeros_like(x), None, False)
    np.testing.assert_allclose(np.asarray(full[..., :4]), np.asarray(grey), atol=1e-5)

    with pytest.raises(ValueError, match="mask must be"):
        conditioning.make_concat("inpaint", first_stage=first_stage, first_stage_variables=first_stage.variables,
                                 scale_factor=1.0, latent_hw=(4, 4), image=x, mask=mask[:, :8])  # fmt: skip
    with pytest.raises(ValueError, match="no concat input"):
        conditioning.make_concat(
            "none",
            first_stage=first_stage,
            first_stage_variables=first_stage.variables,
            scale_factor=1.0,
            latent_hw=(4, 4),
        )


def test_sr_low_res_matches_torch_antialiased_bicubic_and_is_resized_to_the_latent_grid(first_stage):
    x = images(2, 32, seed=1) * 0.9  # away from the clip at ±1
    low = conditioning.low_res_from_image(x, 4)
    assert low.shape == (2, 8, 8, 3)
    ref = torch.nn.functional.interpolate(
        torch.from_numpy(np.array(x)).permute(0, 3, 1, 2), size=(8, 8), mode="bicubic", antialias=True,
        align_corners=False,
    ).permute(0, 2, 3, 1).numpy()  # fmt: skip
    np.testing.assert_allclose(np.asarray(low), np.clip(ref, -1, 1), atol=2e-3)
    assert conditioning.low_res_from_image(images(1, 64), 4).shape == (1, 16, 16, 3)
    with pytest.raises(ValueError, match="divisible by the SR factor"):
        conditioning.low_res_from_image(images(1, 30), 4)

    # a low-resolution input of another size is bicubic-resized to the latent grid (torch as the reference)
    lr = images(2, 8, seed=2)
    sr = conditioning.make_concat("sr", first_stage=first_stage, first_stage_variables=first_stage.variables,
                                  scale_factor=1.0, latent_hw=(4, 4), low_res=lr)  # fmt: skip
    ref = torch.nn.functional.interpolate(
        torch.from_numpy(np.array(lr)).permute(0, 3, 1, 2), size=(4, 4), mode="bicubic", antialias=True,
        align_corners=False,
    ).permute(0, 2, 3, 1).numpy()  # fmt: skip
    assert sr.shape == (2, 4, 4, 3)
    np.testing.assert_allclose(np.asarray(sr), ref, atol=0.05)
    same = conditioning.make_concat("sr", first_stage=first_stage, first_stage_variables=first_stage.variables,
                                    scale_factor=1.0, latent_hw=(8, 8), low_res=lr)  # fmt: skip
    np.testing.assert_array_equal(np.asarray(same), np.asarray(lr))  # same size: used as is


def test_random_masks_deterministic_binary_and_varied():
    masks = jax.jit(conditioning.random_masks, static_argnums=(1, 2, 3))
    a = np.asarray(masks(jax.random.key(3), 64, 32, 48))
    b = np.asarray(masks(jax.random.key(3), 64, 32, 48))
    c = np.asarray(masks(jax.random.key(4), 64, 32, 48))
    assert a.shape == (64, 32, 48, 1) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert set(np.unique(a)) == {0.0, 1.0}
    area = a.mean(axis=(1, 2, 3))
    assert (area > 0).all() and (area < 1).all()  # every mask has a hole and something kept
    assert area.min() < 0.1 and area.max() > 0.3  # small and large holes
    rect = np.array([_is_rectangle(m[..., 0]) for m in a])
    assert 0.2 < rect.mean() < 0.8  # a mix of rectangles and strokes


def _is_rectangle(m):
    rows, cols = np.nonzero(m.any(axis=1))[0], np.nonzero(m.any(axis=0))[0]
    return bool(m[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all())


def test_check_config_requires_the_concat_input_channels():
    from latentdiff.train.ldm import check_config

    config = load_config(os.path.join(ROOT, "configs/ldm_inpaint.py:tiny"))
    check_config(config)
    assert config.unet.in_channels == 9
    config.unet.in_channels = 4
    with pytest.raises(ValueError) as err:
        check_config(config)
    assert "\n" not in str(err.value) and "--config.unet.in_channels=9" in str(err.value)
    sr = load_config(os.path.join(ROOT, "configs/ldm_sr4.py:tiny"))
    check_config(sr)
    sr.unet.in_channels = 4
    with pytest.raises(ValueError, match="in_channels=7"):
        check_config(sr)


@pytest.fixture(scope="module")
def ae_workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("concat")
    train_tiny_kl_f4(root / "ae", root / "tfds", steps=1, num_validation=16)
    return root


@pytest.mark.parametrize("spec", ["configs/ldm_inpaint.py:tiny", "configs/ldm_sr4.py:tiny"])
def test_three_training_steps_of_the_tiny_config(ae_workdir, spec):
    from latentdiff.train import train_and_evaluate

    config = load_config(os.path.join(ROOT, spec))
    shrink_data(config, ae_workdir / "tfds", num_train=64, num_validation=16, num_novel=16)
    config.first_stage.workdir = str(ae_workdir / "ae")
    config.unet.model_channels = 32
    config.unet.channel_mult = (1,)
    config.unet.attention_resolutions = (1,)
    config.batch_size = 8
    config.num_train_steps = 3
    config.log_every = config.checkpoint_every = 3
    work = ae_workdir / spec.split("/")[1].replace(".py:", "_")
    state = train_and_evaluate(config, str(work))
    assert int(state.step) == 3 and int(state.nonfinite_count) == 0
    rows = [json.loads(line) for line in open(work / "metrics.jsonl")]
    assert rows[-1]["step"] == 3 and np.isfinite(rows[-1]["loss"])
    assert os.listdir(work / "checkpoints") == ["3"]
    kernel = state.params["unet"]["conv_in"]["kernel"]
    assert kernel.shape[2] == config.unet.in_channels  # the UNet takes z_t and the concat input

    # the checkpoint restores (the empty 'cond' params of text_encoder.kind 'none' included)
    from latentdiff import workdir as workdir_lib

    restored = workdir_lib.restore_stage2_params(str(work), config)
    assert restored["step"] == 3
    np.testing.assert_array_equal(restored["params"]["unet"]["conv_in"]["kernel"], np.asarray(kernel))
