"""UNet: paper-scale size (eval_shape only) against diffusers, timestep embedding, remat/bf16/dropout, input checks."""

import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.embeddings import get_timestep_embedding

from latentdiff import generation
from latentdiff.nn.attention import SpatialTransformer
from latentdiff.nn.unet import (
    RematResBlock,
    ResBlock,
    build_unet,
    heads_for,
    init_inputs,
    timestep_embedding,
    validate_context,
)


def unet_cfg(**overrides) -> ml_collections.ConfigDict:
    cfg = dict(
        in_channels=4,
        out_channels=4,
        model_channels=32,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(1, 2),
        num_heads=4,
        num_head_channels=-1,
        transformer_depth=1,
        context_dim=8,
        num_classes=3,
        dropout=0.1,
        use_linear_proj=False,
        dtype="float32",
        remat=False,
        attention_impl="xla",
    )
    cfg.update(overrides)
    return ml_collections.ConfigDict(cfg)


PAPER = dict(
    model_channels=320,
    channel_mult=(1, 2, 4, 4),
    num_res_blocks=2,
    attention_resolutions=(4, 2, 1),
    num_heads=8,
    transformer_depth=1,
    context_dim=1280,
    num_classes=0,
    dropout=0.0,
    dtype="bfloat16",
    remat=True,
)


def n_params(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def test_paper_unet_size_matches_paper_and_diffusers():
    cfg = unet_cfg(**PAPER)
    module = build_unet(cfg)
    shapes = jax.eval_shape(module.init, jax.random.key(0), **init_inputs(cfg, 1, 32, 77))
    count = n_params(shapes)
    assert abs(count - 872e6) / 872e6 < 0.01
    with torch.device("meta"):  # nothing allocated
        ref = UNet2DConditionModel(
            sample_size=32,
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=1280,
            attention_head_dim=8,
        )
    assert count == sum(p.numel() for p in ref.parameters())


@pytest.mark.parametrize("dim", [32, 33])
def test_timestep_embedding_matches_diffusers(dim):
    t = np.array([0, 1, 17, 999], np.int64)
    ref = get_timestep_embedding(torch.from_numpy(t), dim, flip_sin_to_cos=True, downscale_freq_shift=0).numpy()
    np.testing.assert_allclose(np.asarray(timestep_embedding(jnp.asarray(t), dim)), ref, atol=1e-5)


def random_params(shapes, seed: int):
    """Random params shaped like `shapes` (from eval_shape), no init compile: norms near 1, kernels ~ 1/sqrt(fan_in)."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        noise = rng.standard_normal(leaf.shape).astype(np.float32)
        name = path[-1].key
        if name == "scale":
            return jnp.asarray(1.0 + 0.1 * noise)
        if name == "bias":
            return jnp.asarray(0.1 * noise)
        return jnp.asarray(noise / np.sqrt(max(1, int(np.prod(leaf.shape[:-1])))))

    return jax.tree_util.tree_map_with_path(draw, shapes)


def test_remat_bf16_dropout_and_class_conditioning():
    # One level (fewer ops to compile) of 64 channels: with 32 channels GroupNorm(32) would erase the time embedding.
    small = dict(model_channels=64, channel_mult=(1,), attention_resolutions=(1,))
    cfg = unet_cfg(**small)
    inputs = init_inputs(cfg, 2, 8, 3)
    rng = np.random.default_rng(0)
    inputs["x"] = jnp.asarray(rng.standard_normal(inputs["x"].shape), jnp.float32)
    inputs["context"] = jnp.asarray(rng.standard_normal(inputs["context"].shape), jnp.float32)
    inputs["t"] = jnp.array([5, 700])
    module = build_unet(cfg)
    shapes = jax.eval_shape(module.init, jax.random.key(0), **inputs)
    params = random_params(shapes, 1)

    def train_out(m, params, y):
        return m.apply(params, **{**inputs, "y": y}, train=True, rngs={"dropout": jax.random.key(3)})

    fp32 = jax.jit(lambda p, y: (module.apply(p, **{**inputs, "y": y}), train_out(module, p, y)))
    ev, tr = fp32(params, jnp.array([0, 2]))
    ev_other_y, _ = fp32(params, jnp.array([1, 2]))
    assert not np.allclose(ev[0], ev_other_y[0], atol=1e-3)  # the label reaches the output
    np.testing.assert_allclose(ev[1], ev_other_y[1], atol=1e-6)  # and only its own sample's
    assert not np.allclose(ev, tr, atol=1e-3)  # dropout is active in training only

    remat = build_unet(unet_cfg(remat=True, **small))
    assert jax.tree.structure(jax.eval_shape(remat.init, jax.random.key(0), **inputs)) == jax.tree.structure(params)
    tr_r = jax.jit(lambda p, y: train_out(remat, p, y))(params, jnp.array([0, 2]))
    np.testing.assert_allclose(tr_r, tr, atol=1e-5)  # same function, same dropout masks

    bf16 = build_unet(unet_cfg(dtype="bfloat16", dropout=0.0, **small))
    ev_b = jax.jit(lambda p: bf16.apply(p, **{**inputs, "y": jnp.array([0, 2])}))(params)
    assert ev_b.dtype == jnp.float32
    assert np.abs(ev_b - ev).mean() < 0.03 * np.abs(ev).mean()

    # The sampler casts kernels to bf16 once (generation.params_for_compute): the same output, bit for bit.
    cast = generation.params_for_compute(params, bf16.dtype)
    leaves = jax.tree.leaves(cast)
    assert {x.dtype for x in leaves if x.ndim >= 2} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in leaves if x.ndim < 2} == {jnp.dtype(jnp.float32)}
    ev_cast = jax.jit(lambda p: bf16.apply(p, **{**inputs, "y": jnp.array([0, 2])}))(cast)
    np.testing.assert_array_equal(ev_cast, ev_b)
    assert generation.params_for_compute(params, module.dtype) is params


@pytest.mark.parametrize("block", ["res", "transformer"])
def test_remat_gradients_match(block):
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 32))
    if block == "res":
        args = (x, jax.random.normal(jax.random.key(2), (2, 16)), False)
        make = lambda remat: (RematResBlock if remat else ResBlock)(64, 0.0, jnp.float32)
    else:
        args = (x, jax.random.normal(jax.random.key(1), (2, 3, 8)))
        make = lambda remat: SpatialTransformer(4, 8, 1, jnp.float32, "xla", remat)
    params = random_params(jax.eval_shape(lambda: make(False).init(jax.random.key(3), *args)), 4)
    loss = lambda p, m: jnp.sum(m.apply(p, *args) ** 2)
    grads = []
    for remat in (False, True):
        module = make(remat)
        grads.append(jax.jit(jax.grad(lambda p, m=module: loss(p, m)))(params))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), *grads)


def test_cudnn_only_for_sequence_lengths_its_backward_supports(monkeypatch):
    from latentdiff.nn import attention as attention_module

    assert attention_module.kernel_for("cudnn", 1024, 1024) == "cudnn"
    assert attention_module.kernel_for("cudnn", 1024, 77) == "xla"  # cross-attention to 77 text tokens
    assert attention_module.kernel_for("cudnn", 16, 16) == "xla"  # 4x4 feature map
    assert attention_module.kernel_for("xla", 1024, 1024) == "xla"
    seen = []
    monkeypatch.setattr(attention_module.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(
        attention_module.jax.nn, "dot_product_attention", lambda q, k, v, implementation: seen.append(implementation)
    )
    q = jnp.zeros((1, 64, 2, 8), jnp.bfloat16)
    attention_module.attention(q, q, q, "cudnn")
    attention_module.attention(q, q[:, :7], q[:, :7], "cudnn")
    assert seen == ["cudnn", "xla"]


def test_heads_for():
    assert heads_for(320, 8, -1) == (8, 40)
    assert heads_for(512, -1, 32) == (16, 32)


def test_bad_inputs_and_configs_raise_clear_errors():
    cfg = unet_cfg()
    module = build_unet(cfg)
    good = init_inputs(cfg, 2, 8, 3)
    shape_of = lambda **kw: jax.eval_shape(lambda: module.init(jax.random.key(0), **{**good, **kw}))
    shape_of()  # the good inputs trace
    with pytest.raises(ValueError, match="context_dim=8"):
        shape_of(context=jnp.zeros((2, 3, 16)))
    with pytest.raises(ValueError, match="pass context"):
        shape_of(context=None)
    with pytest.raises(ValueError, match="num_classes=3"):
        shape_of(y=None)
    with pytest.raises(ValueError, match="divisible by 2"):
        shape_of(x=jnp.zeros((2, 7, 7, 4)))
    with pytest.raises(ValueError, match="in_channels"):
        shape_of(x=jnp.zeros((2, 8, 8, 5)))
    with pytest.raises(ValueError, match=re.escape("unet.context_dim=8 != text_encoder.width=16")):
        validate_context(cfg, {"width": 16})
    validate_context(cfg, {"width": 8})
    with pytest.raises(ValueError, match="no text encoder"):
        validate_context(cfg, None)
    with pytest.raises(ValueError, match=re.escape("missing fields ['remat']")):
        build_unet({k: v for k, v in cfg.items() if k != "remat"})
    with pytest.raises(ValueError, match=re.escape("unknown fields ['typo']")):
        build_unet({**cfg, "typo": 1})
    with pytest.raises(ValueError, match=re.escape("exactly one of unet.num_heads")):
        build_unet(unet_cfg(num_head_channels=8))
    with pytest.raises(ValueError, match="multiples of 32"):
        build_unet(unet_cfg(model_channels=48))
    with pytest.raises(ValueError, match=re.escape("needs unet.dtype='bfloat16'")):
        build_unet(unet_cfg(attention_impl="cudnn"))
    if jax.default_backend() != "gpu":
        cudnn = build_unet(unet_cfg(attention_impl="cudnn", dtype="bfloat16"))
        with pytest.raises(ValueError, match="needs a CUDA GPU"):
            jax.eval_shape(lambda: cudnn.init(jax.random.key(0), **good))
