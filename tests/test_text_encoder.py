"""Text encoder against diffusers' LDMBertModel, CompVis keys against diffusers' own CompVis->LDMBert converter."""

import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig, LDMBertModel
from diffusers.pipelines.stable_diffusion.convert_from_ckpt import convert_ldm_bert_checkpoint
from torch import nn

from latentdiff.convert.diffusers_text import convert_bert, convert_bert_compvis, export_bert, export_bert_compvis
from latentdiff.convert.key_tables import ConversionError
from latentdiff.convert.weight_files import to_numpy_state_dict
from latentdiff.nn.text_encoder import build_text_encoder, init_tokens, null_label


def text_cfg(**overrides) -> ml_collections.ConfigDict:
    cfg = dict(
        kind="bert",
        vocab_size=100,
        max_length=16,
        width=32,
        depth=2,
        num_heads=2,
        head_dim=8,
        mlp_ratio=4,
        num_classes=0,
        dtype="float32",
        remat=False,
        attention_impl="xla",
    )
    cfg.update(overrides)
    return ml_collections.ConfigDict(cfg)


TINY_BERT = dict(
    vocab_size=100,
    max_position_embeddings=16,
    encoder_layers=2,
    encoder_ffn_dim=128,
    encoder_attention_heads=2,
    head_dim=8,
    d_model=32,
)


@pytest.fixture(scope="module")
def bert():
    torch.manual_seed(0)
    model = LDMBertModel(LDMBertConfig(**TINY_BERT)).eval()
    with torch.no_grad():  # biases start at 0 and norms at 1: perturb everything
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model, to_numpy_state_dict(model.state_dict())


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(0).integers(0, 100, size=(3, 12)).astype(np.int64)


def test_matches_ldmbert(bert, tokens):
    model, sd = bert
    module, params = convert_bert(sd, text_cfg())
    with torch.no_grad():
        ref = model(torch.from_numpy(tokens))[0].numpy()
    out = np.asarray(jax.jit(module.apply)(params, jnp.asarray(tokens, jnp.int32)))
    assert out.shape == (3, 12, 32)
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-4)

    remat = build_text_encoder(text_cfg(remat=True))
    np.testing.assert_allclose(np.asarray(jax.jit(remat.apply)(params, jnp.asarray(tokens))), out, atol=1e-6)
    bf16 = build_text_encoder(text_cfg(dtype="bfloat16"))
    out_bf16 = np.asarray(jax.jit(bf16.apply)(params, jnp.asarray(tokens)))
    assert out_bf16.dtype == np.float32 and np.abs(out_bf16 - out).mean() < 0.05


def test_export_round_trip(bert):
    _, sd = bert
    _, params = convert_bert(sd, text_cfg())
    back = export_bert(params, text_cfg())
    assert set(back) == set(sd) - {"to_logits.weight", "to_logits.bias"}
    for k, v in back.items():
        np.testing.assert_array_equal(v, sd[k], err_msg=k)


# The CompVis BERTEmbedder module tree (x-transformers TransformerWrapper + Encoder), only as far as its weights go:
# every layer is [norm, module, residual]; attention ('a') and feed-forward ('f') layers alternate.
class _Attention(nn.Module):
    def __init__(self, dim, heads, dim_head):
        super().__init__()
        inner = heads * dim_head
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, inner, bias=False) for _ in range(3))
        self.to_out = nn.Linear(inner, dim)


class _FeedForward(nn.Module):
    def __init__(self, dim, mult):
        super().__init__()
        self.net = nn.Sequential(
            nn.Sequential(nn.Linear(dim, dim * mult), nn.GELU()), nn.Dropout(0.0), nn.Linear(dim * mult, dim)
        )


class _AbsolutePositionalEmbedding(nn.Module):
    def __init__(self, dim, max_len):
        super().__init__()
        self.emb = nn.Embedding(max_len, dim)


class _Layers(nn.Module):
    def __init__(self, dim, depth, heads, dim_head, mult):
        super().__init__()
        self.layers = nn.ModuleList()
        for _ in range(depth):
            self.layers.append(nn.ModuleList([nn.LayerNorm(dim), _Attention(dim, heads, dim_head), nn.Identity()]))
            self.layers.append(nn.ModuleList([nn.LayerNorm(dim), _FeedForward(dim, mult), nn.Identity()]))


class _TransformerWrapper(nn.Module):
    def __init__(self, vocab, max_len, dim, depth, heads, dim_head, mult):
        super().__init__()
        self.token_emb = nn.Embedding(vocab, dim)
        self.pos_emb = _AbsolutePositionalEmbedding(dim, max_len)
        self.attn_layers = _Layers(dim, depth, heads, dim_head, mult)
        self.norm = nn.LayerNorm(dim)
        self.to_logits = nn.Linear(dim, vocab)


class _BERTEmbedder(nn.Module):
    def __init__(self):
        super().__init__()
        self.transformer = _TransformerWrapper(100, 16, 32, 2, 2, 8, 4)


def test_compvis_keys_agree_with_diffusers_converter(bert):
    _, sd = bert
    cfg = text_cfg()
    _, params = convert_bert(sd, cfg)
    compvis = export_bert_compvis(params, cfg)
    compvis["cond_stage_model.transformer.to_logits.weight"] = sd["to_logits.weight"]
    compvis["cond_stage_model.transformer.to_logits.bias"] = sd["to_logits.bias"]
    compvis["model.diffusion_model.out.2.bias"] = np.zeros(4, np.float32)  # another model's key: skipped

    embedder = _BERTEmbedder()
    prefix = "cond_stage_model."
    embedder.load_state_dict(
        {k[len(prefix) :]: torch.tensor(np.array(v)) for k, v in compvis.items() if k.startswith(prefix)}
    )
    rebuilt = convert_ldm_bert_checkpoint(embedder, LDMBertConfig(**TINY_BERT))
    for k, v in to_numpy_state_dict(rebuilt.state_dict()).items():
        np.testing.assert_array_equal(v, sd[k], err_msg=k)

    _, params2 = convert_bert_compvis(compvis, cfg)
    jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_mismatched_keys_raise(bert):
    _, sd = bert
    bad = {k: v for k, v in sd.items() if k not in ("model.layers.1.fc2.bias", "to_logits.weight")}
    bad["model.layers.2.fc1.weight"] = np.zeros((128, 32), np.float32)
    with pytest.raises(ConversionError) as err:
        convert_bert(bad, text_cfg())
    msg = str(err.value)
    assert "missing source key 'model.layers.1.fc2.bias'" in msg
    assert "unexpected source key 'model.layers.2.fc1.weight'" in msg
    assert "to_logits" not in msg  # ignored on purpose, present or not
    with pytest.raises(ConversionError, match="shape mismatch"):
        convert_bert(sd, text_cfg(mlp_ratio=2))
    with pytest.raises(ConversionError, match="prefix"):
        convert_bert_compvis(sd, text_cfg())


def test_paper_size_matches_ldmbert_without_to_logits():
    cfg = text_cfg(vocab_size=30522, max_length=77, width=1280, depth=32, num_heads=8, head_dim=64)
    module = build_text_encoder(cfg)
    shapes = jax.eval_shape(module.init, jax.random.key(0), init_tokens(cfg, 1))
    count = int(sum(np.prod(x.shape) for x in jax.tree.leaves(shapes)))
    assert abs(count - 543e6) / 543e6 < 0.01
    with torch.device("meta"):
        ref = LDMBertModel(LDMBertConfig())  # the paper's defaults: 32 layers, d 1280, 8 x 64 heads, ffn 5120
    assert count == sum(p.numel() for p in ref.parameters()) - sum(p.numel() for p in ref.to_logits.parameters())


def test_class_embedder_and_errors():
    cfg = text_cfg(kind="class", num_classes=5, width=8)
    module = build_text_encoder(cfg)
    labels = jnp.array([0, 4, null_label(cfg)])
    params = module.init(jax.random.key(0), labels)
    table = params["params"]["embedding"]["embedding"]
    assert table.shape == (6, 8) and null_label(cfg) == 5
    out = module.apply(params, labels)
    assert out.shape == (3, 1, 8)
    np.testing.assert_array_equal(out[:, 0], table[np.array([0, 4, 5])])

    with pytest.raises(ValueError, match="kind='class'"):
        null_label(text_cfg())
    with pytest.raises(ValueError, match=re.escape("kind must be 'bert' or 'class'")):
        build_text_encoder(text_cfg(kind="gpt"))
    with pytest.raises(ValueError, match=re.escape("missing fields ['remat']")):
        build_text_encoder({k: v for k, v in text_cfg().items() if k != "remat"})
    bert = build_text_encoder(text_cfg())
    with pytest.raises(ValueError, match="max_length=16"):
        jax.eval_shape(bert.init, jax.random.key(0), jnp.zeros((1, 17), jnp.int32))


@pytest.mark.parametrize("kind", ["bert", "clip"])
@pytest.mark.parametrize("remat", [False, True])
def test_scanned_blocks_equal_the_blocks_applied_one_by_one(remat, kind):
    """The encoder (both variants: the paper's BERT-style and SD's CLIP) runs its identical blocks as one lax.scan
    over stacked params; values and gradients must equal applying block_0 .. block_{depth-1} in turn (the param tree
    keeps one entry per block)."""
    from latentdiff.nn.attention import layer_norm
    from latentdiff.nn.text_encoder import TextBlock

    cfg = text_cfg(depth=3, remat=remat, kind=kind, width=16)  # CLIP: num_heads · head_dim = width
    enc = build_text_encoder(cfg)
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 100)
    params = enc.init(jax.random.key(0), tokens)["params"]
    assert sorted(k for k in params if k.startswith("block_")) == ["block_0", "block_1", "block_2"]

    def one_by_one(p):
        x = p["token_emb"]["embedding"][tokens] + p["pos_emb"]["embedding"][None, :16]
        for i in range(3):
            x = TextBlock(kind, 2, 8, 4, jnp.float32).apply({"params": p[f"block_{i}"]}, x)
        return nn_layer_norm(p["final_norm"], x)

    def nn_layer_norm(norm_params, x):
        import flax.linen as fnn

        class Final(fnn.Module):
            @fnn.compact
            def __call__(self, x):
                return layer_norm(x, "final_norm")

        return Final().apply({"params": {"final_norm": norm_params}}, x)

    scanned = enc.apply({"params": params}, tokens)
    np.testing.assert_allclose(scanned, one_by_one(params), atol=1e-5)
    probe = jax.random.normal(jax.random.key(2), scanned.shape)
    g_scan = jax.grad(lambda p: jnp.sum(enc.apply({"params": p}, tokens) * probe))(params)
    g_ref = jax.grad(lambda p: jnp.sum(one_by_one(p) * probe))(params)
    for a, b in zip(jax.tree.leaves(g_scan), jax.tree.leaves(g_ref), strict=True):
        np.testing.assert_allclose(a, b, atol=4e-6 * float(np.abs(b).max()) + 1e-6)  # f32 sums of ~1e3 terms
