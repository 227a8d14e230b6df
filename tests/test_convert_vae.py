"""Weight conversion of stage-1 autoencoders: tiny random diffusers AutoencoderKL / VQModel (weights perturbed so every
GroupNorm scale and bias is non-trivial) converted and compared numerically; CompVis key layout; strict key checks."""

import re

import diffusers
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch

from latentdiff.convert.diffusers_vae import (
    convert_vae,
    convert_vae_compvis,
    convert_vq,
    diffusers_config,
    export_vae,
)
from latentdiff.convert.key_tables import ConversionError
from latentdiff.convert.weight_files import to_numpy_state_dict
from latentdiff.nn.autoencoder import AutoencoderKL, VQAutoencoder

ATOL = 1e-4


def make_cfg(kind: str) -> ml_collections.ConfigDict:
    vq = kind == "vq"
    return ml_collections.ConfigDict(
        dict(
            kind=kind,
            in_channels=3,
            out_channels=3,
            resolution=16,
            ch=32,
            ch_mult=(1, 2),
            num_res_blocks=1,
            attn_resolutions=(8,),  # attention blocks in level 1 (8x8) too, not only in the middle
            dropout=0.0,
            z_channels=3 if vq else 4,
            double_z=not vq,
            embed_dim=3 if vq else 4,
            n_embed=32,
            beta=0.25,
            ema_codebook=False,
            ema_decay=0.99,
            dtype="float32",
        )
    )


def perturbed(model: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy().transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def kl():
    cfg = make_cfg("kl")
    torch.manual_seed(0)
    tmodel = perturbed(diffusers.AutoencoderKL(**diffusers_config(cfg)))
    sd = to_numpy_state_dict(tmodel.state_dict())
    module, params = convert_vae(sd, cfg)
    return cfg, tmodel, sd, module, params


@pytest.fixture(scope="module")
def vq():
    cfg = make_cfg("vq")
    torch.manual_seed(0)
    tmodel = perturbed(diffusers.VQModel(**diffusers_config(cfg)))
    sd = to_numpy_state_dict(tmodel.state_dict())
    module, params = convert_vq(sd, cfg)
    return cfg, tmodel, sd, module, params


def test_block_out_channels_are_ch_times_ch_mult(kl):
    cfg, tmodel, sd, _, params = kl
    assert tuple(tmodel.config.block_out_channels) == (32, 64) == tuple(cfg.ch * m for m in cfg.ch_mult)
    assert sd["encoder.down_blocks.1.resnets.0.conv1.weight"].shape == (64, 32, 3, 3)
    assert params["encoder"]["down_1_block_0"]["conv1"]["kernel"].shape == (3, 3, 32, 64)


def test_kl_matches_diffusers(kl):
    _, tmodel, _, module, params = kl
    x = np.random.RandomState(0).randn(2, 3, 16, 16).astype(np.float32)
    with torch.no_grad():
        dist = tmodel.encode(torch.from_numpy(x)).latent_dist
        dec = tmodel.decode(dist.mean).sample
    variables = {"params": params}
    post = module.apply(variables, jnp.asarray(x.transpose(0, 2, 3, 1)), method=AutoencoderKL.encode)
    np.testing.assert_allclose(np.asarray(post.mean), nhwc(dist.mean), atol=ATOL)
    np.testing.assert_allclose(np.asarray(post.logvar), nhwc(dist.logvar), atol=ATOL)
    np.testing.assert_allclose(np.asarray(post.kl()), dist.kl().numpy(), rtol=1e-4)
    rec = module.apply(variables, jnp.asarray(nhwc(dist.mean)), method=AutoencoderKL.decode)
    np.testing.assert_allclose(np.asarray(rec), nhwc(dec), atol=ATOL)
    assert np.abs(nhwc(dec)).max() > 0.5  # not a trivially small output


def test_vq_matches_diffusers(vq):
    _, tmodel, _, module, params = vq
    x = np.random.RandomState(1).randn(2, 3, 16, 16).astype(np.float32)
    with torch.no_grad():
        h = tmodel.encode(torch.from_numpy(x)).latents
        quant, tloss, (_, _, idx) = tmodel.quantize(h)
        dec = tmodel.decode(h).sample
    variables = {"params": params}
    ours_h = module.apply(variables, jnp.asarray(x.transpose(0, 2, 3, 1)), method=VQAutoencoder.encode)
    np.testing.assert_allclose(np.asarray(ours_h), nhwc(h), atol=ATOL)
    legacy = module.clone(legacy_beta=True)  # diffusers' default loss convention
    q = legacy.apply(variables, jnp.asarray(nhwc(h)), method=VQAutoencoder.quantize_latent)
    np.testing.assert_array_equal(np.asarray(q.indices).reshape(-1), idx.numpy().reshape(-1))
    np.testing.assert_allclose(np.asarray(q.quantized), nhwc(quant), atol=ATOL)
    np.testing.assert_allclose(float(q.loss), tloss.item(), rtol=1e-4)
    rec = module.apply(variables, jnp.asarray(nhwc(h)), method=VQAutoencoder.decode)
    np.testing.assert_allclose(np.asarray(rec), nhwc(dec), atol=ATOL)
    assert len(np.unique(idx.numpy())) > 1


def to_compvis(sd: dict[str, np.ndarray], n_levels: int) -> dict[str, np.ndarray]:
    """diffusers keys -> CompVis keys (written independently of the converter's table)."""
    out = {}
    for key, value in sd.items():
        k = key
        k = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", k)
        k = re.sub(r"encoder\.down_blocks\.(\d+)\.attentions\.", r"encoder.down.\1.attn.", k)
        k = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", k)
        flip = lambda m: f"decoder.up.{n_levels - 1 - int(m.group(1))}.{m.group(2)}."
        k = re.sub(r"decoder\.up_blocks\.(\d+)\.(resnets|attentions|upsamplers\.0)\.", flip, k)
        k = k.replace(".resnets.", ".block.").replace(".attentions.", ".attn.").replace(".upsamplers.0.", ".upsample.")
        k = k.replace("mid_block.block.0.", "mid.block_1.").replace("mid_block.block.1.", "mid.block_2.")
        k = k.replace("mid_block.attn.0.", "mid.attn_1.")
        k = k.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        k = k.replace(".group_norm.", ".norm.").replace(".to_out.0.", ".proj_out.")
        k = re.sub(r"\.to_([qkv])\.", r".\1.", k)
        if re.search(r"\.(q|k|v|proj_out)\.weight$", k):
            value = value[:, :, None, None]  # CompVis uses 1x1 convs
        out[k] = value
    return out


@pytest.mark.parametrize("which", ["kl", "vq"])
def test_compvis_keys_convert_to_same_params(which, kl, vq):
    cfg, _, sd, _, params = {"kl": kl, "vq": vq}[which]
    compvis = {f"first_stage_model.{k}": v for k, v in to_compvis(sd, len(cfg.ch_mult)).items()}
    assert "first_stage_model.decoder.up.1.upsample.conv.weight" in compvis
    assert "first_stage_model.encoder.mid.attn_1.q.weight" in compvis
    compvis["model.diffusion_model.input_blocks.0.0.weight"] = np.zeros((1,), np.float32)  # other LDM parts
    compvis["first_stage_model.loss.logvar"] = np.zeros((), np.float32)  # training-loss modules
    _, params2 = convert_vae_compvis(compvis, cfg)
    jax.tree.map(np.testing.assert_array_equal, params, params2)


def test_extra_and_missing_keys_raise(kl):
    cfg, _, sd, _, _ = kl
    extra = dict(sd, **{"encoder.bogus.weight": np.zeros((3,), np.float32)})
    with pytest.raises(ConversionError, match=r"encoder\.bogus\.weight"):
        convert_vae(extra, cfg)
    missing = {k: v for k, v in sd.items() if k != "decoder.mid_block.attentions.0.to_k.bias"}
    with pytest.raises(ConversionError, match=r"decoder\.mid_block\.attentions\.0\.to_k\.bias"):
        convert_vae(missing, cfg)
    wrong = ml_collections.ConfigDict(cfg.to_dict())
    wrong.ch_mult = (1, 1)
    with pytest.raises(ConversionError, match="shape mismatch"):
        convert_vae(sd, wrong)
    with pytest.raises(ValueError, match="kind"):
        convert_vq(sd, cfg)
    with pytest.raises(ConversionError, match="prefix"):
        convert_vae_compvis(sd, cfg)


def test_vq_ema_codebook_rejected(vq):
    cfg, _, sd, _, _ = vq
    ema = ml_collections.ConfigDict(cfg.to_dict())
    ema.ema_codebook = True
    with pytest.raises(ValueError, match="ema_codebook"):
        convert_vq(sd, ema)


@pytest.mark.parametrize("which", ["kl", "vq"])
def test_export_roundtrip_loads_into_diffusers(which, kl, vq):
    cfg, _, sd, _, params = {"kl": kl, "vq": vq}[which]
    exported = export_vae(params, cfg)
    assert set(exported) == set(sd)
    for key, value in sd.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)
    fresh = (diffusers.AutoencoderKL if which == "kl" else diffusers.VQModel)(**diffusers_config(cfg))
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)


def test_deprecated_diffusers_attention_names(kl):
    cfg, _, sd, _, params = kl
    old_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    legacy = {}
    for key, value in sd.items():
        for new, old in old_names.items():
            key = re.sub(rf"(\.attentions\.\d+)\.{re.escape(new)}\.", rf"\1.{old}.", key)
        legacy[key] = value
    assert "encoder.mid_block.attentions.0.query.weight" in legacy
    _, params2 = convert_vae(legacy, cfg)
    jax.tree.map(np.testing.assert_array_equal, params, params2)
