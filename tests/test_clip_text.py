"""The Flax CLIP text encoder (Stable Diffusion v1's conditioning model) against transformers' CLIPTextModel, and its
weight converter (HF layouts with and without 'text_model.', CompVis FrozenCLIPEmbedder keys, export)."""

import jax
import ml_collections
import numpy as np
import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel

from latentdiff.convert.diffusers_clip import (
    COMPVIS_PREFIX,
    clip_config,
    convert_clip,
    convert_clip_compvis,
    export_clip,
    hf_clip_config,
)
from latentdiff.convert.key_tables import ConversionError
from latentdiff.convert.weight_files import to_numpy_state_dict
from latentdiff.nn.text_encoder import build_text_encoder

HF = dict(
    vocab_size=100,
    hidden_size=32,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=16,
    bos_token_id=98,
    eos_token_id=99,
    pad_token_id=99,
)


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    model = CLIPTextModel(CLIPTextConfig(**HF)).eval()
    with torch.no_grad():  # biases start at 0 and norms at 1: move every weight
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    sd = to_numpy_state_dict(model.state_dict())
    cfg = ml_collections.ConfigDict(clip_config(model.config.to_dict()))
    module, params = convert_clip(sd, cfg)
    return model, sd, cfg, module, params, jax.jit(module.apply)


def tokens(length: int) -> np.ndarray:
    """Two captions as SD tokenizes them: BOS, words, EOS, then EOS padding."""
    rng = np.random.default_rng(0)
    out = np.full((2, length), HF["pad_token_id"], np.int64)
    for row, n in enumerate((5, length - 2)):
        out[row, 0] = HF["bos_token_id"]
        out[row, 1 : n + 1] = rng.integers(0, 98, n)
        out[row, n + 1] = HF["eos_token_id"]
    return out


@pytest.mark.parametrize("length", [16, 10])
def test_matches_transformers(clip, length):
    model, _, cfg, _, params, apply = clip
    ids = tokens(length)
    with torch.no_grad():
        ref = model(torch.from_numpy(ids)).last_hidden_state.numpy()
    out = np.asarray(apply(params, ids.astype(np.int32)))
    assert out.shape == (2, length, cfg.width)
    assert np.abs(ref).mean() > 0.3
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-4)


def test_attention_is_causal(clip):
    *_, params, apply = clip
    ids = tokens(16).astype(np.int32)
    changed = ids.copy()
    changed[:, 6:] = 7
    a, b = np.asarray(apply(params, ids)), np.asarray(apply(params, changed))
    np.testing.assert_array_equal(a[:, :6], b[:, :6])
    assert np.abs(a[:, 6:] - b[:, 6:]).max() > 1e-2


def test_key_layouts_and_export_round_trip(clip):
    _, sd, cfg, _, params, _ = clip
    assert not any(k.startswith("text_model.") for k in sd)  # transformers 5 saves without the prefix
    hf4 = {"text_model." + k: v for k, v in sd.items()}
    hf4["text_model.embeddings.position_ids"] = np.arange(16)[None]  # carried by older files, ignored
    _, params_hf4 = convert_clip(hf4, cfg)
    jax.tree.map(np.testing.assert_array_equal, params_hf4, params)

    exported = export_clip(params, cfg)
    assert set(exported) == {"text_model." + k for k in sd}
    for k, v in sd.items():
        np.testing.assert_array_equal(exported["text_model." + k], v, err_msg=k)

    compvis = export_clip(params, cfg, COMPVIS_PREFIX)
    compvis["model.diffusion_model.conv_in.weight"] = np.zeros(3, np.float32)  # other models' keys are skipped
    _, params_cv = convert_clip_compvis(compvis, cfg)
    jax.tree.map(np.testing.assert_array_equal, params_cv, params)

    loaded = CLIPTextModel(CLIPTextConfig(**hf_clip_config(cfg, bos_token_id=98, eos_token_id=99, pad_token_id=99)))
    missing, unexpected = loaded.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
    assert not missing and not unexpected


def test_bad_weights_and_configs_raise(clip):
    _, sd, cfg, *_ = clip
    bad = dict(sd)
    del bad["encoder.layers.1.mlp.fc2.bias"]
    bad["encoder.layers.0.extra.weight"] = np.zeros(2, np.float32)
    with pytest.raises(ConversionError) as err:
        convert_clip(bad, cfg)
    assert "missing source key 'encoder.layers.1.mlp.fc2.bias'" in str(err.value)
    assert "unexpected source key 'encoder.layers.0.extra.weight'" in str(err.value)

    shuffled = {"text_model." + k: v for k, v in sd.items()}
    shuffled["text_model.embeddings.position_ids"] = np.arange(16)[None, ::-1].copy()
    with pytest.raises(ConversionError, match="position"):
        convert_clip(shuffled, cfg)

    with pytest.raises(ConversionError, match="shape mismatch"):
        convert_clip(sd, ml_collections.ConfigDict({**cfg.to_dict(), "mlp_ratio": 2}))
    with pytest.raises(ConversionError, match="hidden_act"):
        clip_config({**HF, "hidden_act": "gelu"})
    with pytest.raises(ValueError, match="num_heads \\* head_dim == width"):
        build_text_encoder({**cfg.to_dict(), "head_dim": 4})
    with pytest.raises(ConversionError, match="prefix"):
        convert_clip_compvis(sd, cfg)
