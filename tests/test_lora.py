"""LoRA adapters (latentdiff/lora.py) against closed forms, and their diffusers layout (convert/diffusers_lora.py)
against diffusers + peft: a tiny SD-v1-style UNet converted to ours, random adapters exported and loaded by
diffusers' load_lora_adapter give the same UNet output as ours merged (and after diffusers fuses them); a LoRA made
by peft inside diffusers, saved by diffusers, imports to the same output; keys we cannot map are listed."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
from test_convert_unet import CASES

from latentdiff import lora
from latentdiff.convert import diffusers_lora
from latentdiff.convert.diffusers_unet import convert_unet
from latentdiff.convert.key_tables import ConversionError
from latentdiff.convert.weight_files import to_numpy_state_dict
from latentdiff.errors import UserError


def test_merge_is_w_plus_scaled_a_b_and_a_fresh_adapter_changes_nothing():
    rng = np.random.default_rng(0)
    params = {"blk": {"attn": {"to_q": {"kernel": rng.normal(size=(6, 5)), "bias": np.ones(5)}},
                      "stack": {"to_q": {"kernel": rng.normal(size=(3, 6, 5))}}},
              "other": {"kernel": rng.normal(size=(5, 5))}}  # fmt: skip
    paths = lora.adapted_paths(params, ["to_q"], "the test model")
    assert paths == [("blk", "attn", "to_q"), ("blk", "stack", "to_q")]
    adapters = lora.init_adapters(jax.random.key(0), params, paths, rank=2)
    a = adapters["blk"]["attn"]["to_q"]["lora_a"]
    assert a.shape == (6, 2) and float(jnp.abs(a).max()) <= 1 / np.sqrt(6) and float(jnp.abs(a).max()) > 0
    assert adapters["blk"]["stack"]["to_q"]["lora_b"].shape == (3, 2, 5)
    same = lora.merge(params, adapters, 3.0)  # B = 0: nothing changes
    np.testing.assert_allclose(same["blk"]["attn"]["to_q"]["kernel"], params["blk"]["attn"]["to_q"]["kernel"])
    adapters = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), adapters)
    merged = lora.merge(params, adapters, 0.5)
    for where in ("attn", "stack"):
        pair = adapters["blk"][where]["to_q"]
        want = params["blk"][where]["to_q"]["kernel"] + 0.5 * np.matmul(pair["lora_a"], pair["lora_b"])
        np.testing.assert_allclose(merged["blk"][where]["to_q"]["kernel"], want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(merged["other"]["kernel"], params["other"]["kernel"])
    assert lora.rank_of(adapters) == 2 and lora.num_params(adapters) == 6 * 2 + 2 * 5 + 3 * (6 * 2 + 2 * 5)


def test_bad_targets_and_ranks_are_one_line_errors():
    params = {"attn1": {"to_q": {"kernel": np.zeros((4, 4))}}, "norm": {"scale": np.zeros(4)}}
    with pytest.raises(UserError, match="LoRA targets to_z, norm match no dense layer of the UNet") as err:
        lora.adapted_paths(params, ["to_q", "to_z", "norm"], "the UNet")
    assert "\n" not in str(err.value)
    for rank in (0, -2):
        with pytest.raises(UserError, match=r"lora\.rank must be a positive integer"):
            lora.init_adapters(jax.random.key(0), params, [("attn1", "to_q")], rank)
    with pytest.raises(UserError, match="exceeds the smaller side"):
        lora.init_adapters(jax.random.key(0), params, [("attn1", "to_q")], 5)
    assert lora.expand_targets(["attention", "to_q", "proj_in"]) == ("to_q", "to_k", "to_v", "to_out", "proj_in")


def _diffusers_unet(name: str):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    model = UNet2DConditionModel(**CASES[name][0]).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model, ml_collections.ConfigDict(CASES[name][1])


def _inputs(cfg):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 16, 16, cfg.in_channels)).astype(np.float32)
    t = np.array([3, 917], np.int64)
    ctx = rng.standard_normal((2, 5, cfg.context_dim)).astype(np.float32)
    return x, t, ctx


def _torch_out(model, x, t, ctx):
    with torch.no_grad():
        out = model(
            torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t), encoder_hidden_states=torch.from_numpy(ctx)
        )
    return out.sample.numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize("name", ["crossattn"])
def test_exported_adapters_give_diffusers_the_same_unet_output(name):
    model, cfg = _diffusers_unet(name)
    module, variables = convert_unet(to_numpy_state_dict(model.state_dict()), cfg)
    base = variables["params"]
    paths = lora.adapted_paths(base, ["attention", "projections", "feed_forward"], "the UNet")
    adapters = lora.init_adapters(jax.random.key(1), base, paths, rank=4)
    rng = np.random.default_rng(2)
    adapters = jax.tree.map(lambda a: jnp.asarray(0.2 * rng.standard_normal(a.shape), jnp.float32), adapters)
    scale = 8.0 / 4 * 0.7  # alpha 8, rank 4, lora_scale 0.7
    x, t, ctx = _inputs(cfg)
    ours = np.asarray(jax.jit(module.apply)({"params": lora.merge(base, adapters, scale)}, x, t, ctx, None))
    plain = np.asarray(jax.jit(module.apply)(variables, x, t, ctx, None))
    assert np.abs(ours - plain).mean() > 1e-2  # the adapters matter
    state_dict = diffusers_lora.export_unet_lora(adapters, cfg, scale)
    assert len(state_dict) == 2 * len(paths)
    model.load_lora_adapter({k: torch.from_numpy(v) for k, v in state_dict.items()}, prefix="unet", adapter_name="ours")
    np.testing.assert_allclose(_torch_out(model, x, t, ctx), ours, atol=1e-4, rtol=1e-4)  # unmerged (peft layers)
    model.fuse_lora()
    np.testing.assert_allclose(_torch_out(model, x, t, ctx), ours, atol=1e-4, rtol=1e-4)  # merged into the weights
    # and back: the diffusers layout imports to adapters with the scale folded in
    back = diffusers_lora.import_unet_lora(state_dict, cfg)
    again = np.asarray(jax.jit(module.apply)({"params": lora.merge(base, back, 1.0)}, x, t, ctx, None))
    np.testing.assert_allclose(again, ours, atol=1e-5, rtol=1e-5)


def test_a_lora_trained_in_diffusers_imports_to_the_same_output(tmp_path):
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    model, cfg = _diffusers_unet("crossattn")
    module, variables = convert_unet(to_numpy_state_dict(model.state_dict()), cfg)
    config = LoraConfig(r=4, lora_alpha=6, target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in"])
    model.add_adapter(config)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.2 * torch.randn_like(p))
    StableDiffusionPipeline.save_lora_weights(
        str(tmp_path), unet_lora_layers=get_peft_model_state_dict(model), unet_lora_adapter_metadata=config.to_dict()
    )
    state_dict, scale = diffusers_lora.read_lora_file(str(tmp_path))
    assert scale == 6 / 4  # lora_alpha / r from diffusers' adapter metadata
    adapters = diffusers_lora.import_unet_lora(state_dict, cfg, scale)
    x, t, ctx = _inputs(cfg)
    ours = np.asarray(
        jax.jit(module.apply)({"params": lora.merge(variables["params"], adapters, 1.0)}, x, t, ctx, None)
    )
    np.testing.assert_allclose(ours, _torch_out(model, x, t, ctx), atol=1e-4, rtol=1e-4)
    unmapped = {
        "lora_unet_down_blocks_0_x.lora_down.weight": np.zeros((4, 4)),  # kohya names
        "unet.no_such_block.to_q.lora_A.weight": np.zeros((4, 4)),
        "unet.down_blocks.0.resnets.0.conv1.lora_A.weight": np.zeros((4, 32, 3, 3)),  # 3x3 convs take no adapters
    }
    with pytest.raises(ConversionError, match="3 LoRA key") as err:
        diffusers_lora.import_unet_lora({**state_dict, **unmapped}, cfg)
    assert "lora_unet_down_blocks_0_x.lora_down.weight" in str(err.value) and "\n" not in str(err.value)
    name = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    wrong_rank = {**state_dict, f"{name}.lora_B.weight": np.zeros((32, 3), np.float32)}
    with pytest.raises(ConversionError, match="of one rank r"):
        diffusers_lora.import_unet_lora(wrong_rank, cfg)
    (tmp_path / "damaged.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ConversionError, match="not a readable LoRA safetensors file"):
        diffusers_lora.read_lora_file(str(tmp_path / "damaged.safetensors"))


def test_sample_with_a_diffusers_lora_file_on_the_demo_model(tmp_path, capsys):
    """`latentdiff sample --lora FILE --lora_scale s`: the file's adapters merged into the shipped demo model change
    its images; scale 0 gives the base model's images exactly; a file with keys we cannot map is one line."""
    from PIL import Image

    from latentdiff import sample_cli
    from latentdiff.config_utils import load_workdir_config
    from latentdiff.workdir import abstract_stage2

    config = load_workdir_config("demo")
    unet_params = abstract_stage2(config)["unet"]
    paths = lora.adapted_paths(unet_params, ["attention"], "the demo UNet")
    adapters = lora.init_adapters(jax.random.key(0), unet_params, paths, rank=4)
    rng = np.random.default_rng(0)
    adapters = jax.tree.map(lambda a: jnp.asarray(0.3 * rng.standard_normal(a.shape), jnp.float32), adapters)
    file = str(tmp_path / "lora.safetensors")
    diffusers_lora.write_lora_file(file, diffusers_lora.export_unet_lora(adapters, config.unet, 1.0))

    def sample(out: str, *extra: str) -> np.ndarray:
        argv = ["--workdir", "demo", "--prompt", "a red circle at the top left", "--steps", "5", "--out", out]
        sample_cli.main([*argv, *extra])
        (png,) = [p for p in (tmp_path / out).rglob("*.png") if "grid" not in p.name]
        return np.asarray(Image.open(png))

    base = sample(str(tmp_path / "base"))
    off = sample(str(tmp_path / "off"), "--lora", file, "--lora_scale", "0")
    on = sample(str(tmp_path / "on"), "--lora", file)
    np.testing.assert_array_equal(off, base)
    assert np.abs(on.astype(int) - base.astype(int)).mean() > 2.0
    bad = str(tmp_path / "bad.safetensors")
    diffusers_lora.write_lora_file(bad, {"text_encoder.layers.0.q_proj.lora_A.weight": np.zeros((4, 8), np.float32)})
    with pytest.raises(SystemExit):
        sample_cli.main(["--workdir", "demo", "--prompt", "x", "--out", str(tmp_path / "x"), "--lora", bad])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "map to no module of this UNet" in err and "text_encoder.layers.0.q_proj" in err
    with pytest.raises(SystemExit):
        sample_cli.main(["--workdir", "demo", "--prompt", "x", "--out", str(tmp_path / "y"), "--lora_scale", "0.5"])
    assert "--lora_scale needs --lora FILE" in capsys.readouterr().err
