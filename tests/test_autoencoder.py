"""Stage-1 autoencoder modules: sizes against diffusers, posterior against torch.distributions, the quantiser against
diffusers' VectorQuantizer and a numpy EMA reference, mixed precision."""

import diffusers
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
from diffusers.models.autoencoders.vae import VectorQuantizer as TorchVQ

from latentdiff.convert.diffusers_vae import diffusers_config
from latentdiff.nn.autoencoder import (
    EMA_EPS,
    AutoencoderKL,
    DiagonalGaussian,
    VQAutoencoder,
    build_autoencoder,
    last_layer_path,
)
from latentdiff.nn.quantizer import VectorQuantizer


def make_cfg(**overrides) -> ml_collections.ConfigDict:
    base = dict(
        kind="kl",
        in_channels=3,
        out_channels=3,
        resolution=16,
        ch=32,
        ch_mult=(1, 2),
        num_res_blocks=1,
        attn_resolutions=(),
        dropout=0.0,
        z_channels=4,
        double_z=True,
        embed_dim=4,
        n_embed=16,
        beta=0.25,
        ema_codebook=False,
        ema_decay=0.9,
        dtype="float32",
    )
    base.update(overrides)
    return ml_collections.ConfigDict(base)


def random_variables(abstract, seed: int = 0):
    """Random values for an abstract variables tree (jax.eval_shape of init): compiling the real init's RNG is slow
    on CPU. Kernels ~ N(0, 1/fan_in), norm scales 1 + N(0, 0.1), biases N(0, 0.1), codebooks N(0, 0.5); the EMA
    statistics are made consistent (embed_sum = embedding, cluster_size = 1)."""
    rng = np.random.RandomState(seed)

    def fill(path, leaf):
        name = path[-1].key
        if name == "kernel":
            return jnp.asarray(rng.randn(*leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1])), jnp.float32)
        if name == "scale":
            return jnp.asarray(1 + 0.1 * rng.randn(*leaf.shape), jnp.float32)
        if name == "cluster_size":
            return jnp.ones(leaf.shape, jnp.float32)
        scale = 0.5 if name in ("embedding", "embed_sum") else 0.1
        return jnp.asarray(scale * rng.randn(*leaf.shape), jnp.float32)

    out = jax.tree_util.tree_map_with_path(fill, abstract)
    if "vq_stats" in out:
        stats = out["vq_stats"]["quantize"]
        out["vq_stats"]["quantize"] = dict(stats, embed_sum=stats["embedding"])
    return out


def n_params(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def abstract_params(module, cfg):
    x = jnp.zeros((1, cfg.resolution, cfg.resolution, cfg.in_channels))
    args = (x, None, False, False) if cfg.kind == "kl" else (x, False)
    return jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *args))["params"]


def test_kl_f8_paper_param_count_matches_diffusers():
    cfg = make_cfg(resolution=256, ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, z_channels=4, embed_dim=4)
    ours = n_params(abstract_params(build_autoencoder(cfg), cfg))
    assert abs(ours - 83.65e6) / 83.65e6 < 0.01
    torch_model = diffusers.AutoencoderKL(**diffusers_config(cfg))
    assert ours == sum(p.numel() for p in torch_model.parameters())


def test_vq_f4_paper_param_count_matches_diffusers():
    cfg = make_cfg(
        kind="vq", resolution=256, ch=128, ch_mult=(1, 2, 4), num_res_blocks=2, z_channels=3, embed_dim=3,
        double_z=False, n_embed=8192,
    )  # fmt: skip
    params = abstract_params(build_autoencoder(cfg), cfg)
    assert params["quantize"]["embedding"].shape == (8192, 3)
    torch_model = diffusers.VQModel(**diffusers_config(cfg))
    assert n_params(params) == sum(p.numel() for p in torch_model.parameters())


@pytest.fixture(scope="module")
def tiny_kl():
    """One tiny KL model (attention at the 4x4 level) and its params, shared by the tests below."""
    cfg = make_cfg(resolution=8, attn_resolutions=(4,))
    model = build_autoencoder(cfg)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 3))
    variables = random_variables(jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, None, False, False)))
    return cfg, model, variables, x


def test_shapes_and_last_layer_path(tiny_kl):
    _, model, variables, x = tiny_kl
    rec, post = model.apply(variables, x, jax.random.PRNGKey(2), True, False)
    assert rec.shape == (2, 8, 8, 3) and post.mean.shape == (2, 4, 4, 4) and post.kl().shape == (2,)
    assert "down_1_attn_0" in variables["params"]["encoder"] and "up_1_attn_1" in variables["params"]["decoder"]
    assert "down_0_attn_0" not in variables["params"]["encoder"]
    kernel = variables["params"]
    for key in last_layer_path("kl"):
        kernel = kernel[key]
    assert kernel.shape == (3, 3, 32, 3)
    z = model.apply(variables, x, method=AutoencoderKL.encode).mode()
    np.testing.assert_allclose(np.asarray(z), np.asarray(post.mean), atol=1e-6)
    rec_mode = model.apply(variables, z, method=AutoencoderKL.decode)
    rec_call, _ = model.apply(variables, x, None, False, False)
    np.testing.assert_allclose(np.asarray(rec_mode), np.asarray(rec_call), atol=1e-5)
    assert not np.allclose(np.asarray(rec_mode), np.asarray(rec))  # sample_posterior draws z ~ q(z|x)


def test_images_of_wrong_size_or_channels_are_one_line_errors(tiny_kl):
    _, model, variables, x = tiny_kl
    encode = lambda images: jax.eval_shape(lambda: model.apply(variables, images, method=AutoencoderKL.encode))
    encode(x)  # the good shape traces
    for bad in (x[..., :1], jnp.concatenate([x, x[..., :1]], -1), x[:, :7, :7], x[0]):
        with pytest.raises(ValueError, match=r"autoencoder expects images \[B, H, W, 3\] with H and W divisible by 2"):
            encode(bad)


def test_sample_posterior_needs_rng_and_dropout_used_in_train(tiny_kl):
    cfg, _, variables, x = tiny_kl
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    cfg.dropout = 0.5
    model = build_autoencoder(cfg)  # dropout has no params: the same variables apply
    with pytest.raises(ValueError, match="rng"):
        model.apply(variables, x, None, True, False)
    a, _ = model.apply(variables, x, None, False, True, rngs={"dropout": jax.random.PRNGKey(3)})
    b, _ = model.apply(variables, x, None, False, False)
    assert not np.allclose(np.asarray(a), np.asarray(b))


def test_bfloat16_close_to_float32(tiny_kl):
    cfg, model32, params, x = tiny_kl
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    cfg.dtype = "bfloat16"
    model16 = build_autoencoder(cfg)
    abstract16 = jax.eval_shape(lambda: model16.init(jax.random.PRNGKey(0), x, None, False, False))
    assert {a.dtype for a in jax.tree.leaves(abstract16)} == {jnp.dtype("float32")}  # params stay float32
    rec32, post32 = model32.apply(params, x, None, False, False)
    rec16, post16 = model16.apply(params, x, None, False, False)
    assert rec16.dtype == jnp.float32 and post16.mean.dtype == jnp.float32
    rel = float(jnp.linalg.norm(rec16 - rec32) / jnp.linalg.norm(rec32))
    assert 0 < rel < 0.05, rel  # > 0: bf16 compute really happened
    assert float(jnp.linalg.norm(post16.mean - post32.mean) / jnp.linalg.norm(post32.mean)) < 0.05


def test_first_stage_with_compute_dtype(tiny_kl):
    """Stage 2's first_stage.dtype: '' or the model's own dtype keeps the model; 'bfloat16' encodes in bf16 with the
    same (shared, float32) variables, latents float32 and close to the float32 ones; the original is untouched."""
    from latentdiff.first_stage import FirstStage

    cfg, model, variables, x = tiny_kl
    first_stage = FirstStage(config=cfg, module=model, variables=variables)
    assert (
        first_stage.with_compute_dtype("") is first_stage and first_stage.with_compute_dtype("float32") is first_stage
    )
    first_stage16 = first_stage.with_compute_dtype("bfloat16")
    assert (
        first_stage16.config.dtype == "bfloat16"
        and first_stage.config.dtype == "float32"
        and first_stage16.variables is variables
    )
    z32 = first_stage.encode(variables, x, None, False)
    z16 = first_stage16.encode(variables, x, None, False)
    assert z16.dtype == jnp.float32
    rel = float(jnp.linalg.norm(z16 - z32) / jnp.linalg.norm(z32))
    assert 0 < rel < 0.05, rel


def test_diagonal_gaussian_against_torch():
    rng = np.random.RandomState(0)
    moments = rng.randn(3, 4, 4, 6).astype(np.float32) * 2
    moments[0, 0, 0, 3] = 50.0  # clamped to 20
    post = DiagonalGaussian.from_moments(jnp.asarray(moments))
    mean, logvar = moments[..., :3], np.clip(moments[..., 3:], -30, 20)
    assert float(post.logvar.max()) == 20.0
    q = torch.distributions.Normal(torch.from_numpy(mean), torch.from_numpy(np.exp(0.5 * logvar)))
    p = torch.distributions.Normal(torch.zeros(()), torch.ones(()))
    expected = torch.distributions.kl_divergence(q, p).sum(dim=(1, 2, 3)).numpy()
    np.testing.assert_allclose(np.asarray(post.kl()), expected, rtol=1e-5)
    samples = jax.vmap(post.sample)(jax.random.split(jax.random.PRNGKey(0), 4000))
    std = np.exp(0.5 * logvar[1:])
    np.testing.assert_allclose(np.asarray(samples.mean(0))[1:], mean[1:], atol=5 * std.max() / np.sqrt(4000))
    np.testing.assert_allclose(np.asarray(samples.std(0))[1:], std, rtol=0.1)
    assert np.array_equal(np.asarray(post.mode()), mean)


def test_build_errors():
    with pytest.raises(ValueError, match="kind"):
        build_autoencoder(make_cfg(kind="vae"))
    with pytest.raises(ValueError, match="double_z"):
        build_autoencoder(make_cfg(double_z=False))
    with pytest.raises(ValueError, match="double_z"):
        build_autoencoder(make_cfg(kind="vq"))
    with pytest.raises(ValueError, match="dtype"):
        build_autoencoder(make_cfg(dtype="float16"))
    model = build_autoencoder(make_cfg(resolution=15))
    with pytest.raises(ValueError, match="resolution"):
        model.init(jax.random.PRNGKey(0), jnp.zeros((1, 15, 15, 3)), None, False, False)


def _quantizer(legacy_beta: bool, use_ema: bool = False) -> VectorQuantizer:
    return VectorQuantizer(
        n_embed=16, embed_dim=3, beta=0.25, legacy_beta=legacy_beta, use_ema=use_ema, ema_decay=0.9, ema_eps=EMA_EPS
    )


@pytest.mark.parametrize("legacy", [True, False])
def test_quantizer_matches_diffusers_forward_and_gradients(legacy):
    rng = np.random.RandomState(0)
    z = rng.randn(2, 5, 5, 3).astype(np.float32)
    codebook = rng.randn(16, 3).astype(np.float32)
    w = rng.randn(2, 5, 5, 3).astype(np.float32)  # probes the straight-through gradient

    tq = TorchVQ(16, 3, beta=0.25, legacy=legacy)
    with torch.no_grad():
        tq.embedding.weight.copy_(torch.from_numpy(codebook))
    tz = torch.from_numpy(z.transpose(0, 3, 1, 2)).requires_grad_(True)
    tquant, tloss, (_, _, tidx) = tq(tz)
    (tloss + (tquant * torch.from_numpy(w.transpose(0, 3, 1, 2))).sum()).backward()

    q = _quantizer(legacy_beta=legacy)

    def objective(params, z):
        out = q.apply({"params": params}, z, False)
        return out.loss + jnp.sum(out.quantized * w), out

    params = {"embedding": jnp.asarray(codebook)}
    (_, out), (g_params, g_z) = jax.value_and_grad(objective, argnums=(0, 1), has_aux=True)(params, jnp.asarray(z))
    np.testing.assert_array_equal(np.asarray(out.indices).reshape(-1), tidx.numpy().reshape(-1))
    np.testing.assert_allclose(np.asarray(out.quantized), tquant.detach().numpy().transpose(0, 2, 3, 1), atol=1e-6)
    np.testing.assert_allclose(float(out.loss), tloss.item(), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(g_z), tz.grad.numpy().transpose(0, 2, 3, 1), atol=1e-5)
    np.testing.assert_allclose(np.asarray(g_params["embedding"]), tq.embedding.weight.grad.numpy(), atol=1e-5)

    idx = np.asarray(out.indices).reshape(-1)
    brute = np.argmin(((z.reshape(-1, 1, 3) - codebook[None]) ** 2).sum(-1), axis=1)
    np.testing.assert_array_equal(idx, brute)
    freq = np.bincount(brute, minlength=16) / brute.size
    nz = freq[freq > 0]
    np.testing.assert_allclose(float(out.perplexity), np.exp(-(nz * np.log(nz)).sum()), rtol=1e-5)
    np.testing.assert_allclose(float(out.usage), (freq > 0).mean())


def test_quantizer_paper_convention_puts_beta_on_commitment():
    rng = np.random.RandomState(1)
    z = jnp.asarray(rng.randn(4, 3).astype(np.float32))
    codebook = jnp.asarray(rng.randn(16, 3).astype(np.float32))
    q = _quantizer(legacy_beta=False)
    grad_z = jax.grad(lambda z: q.apply({"params": {"embedding": codebook}}, z, False).loss)(z)
    e = np.asarray(codebook)[np.argmin(((np.asarray(z)[:, None] - np.asarray(codebook)[None]) ** 2).sum(-1), 1)]
    np.testing.assert_allclose(np.asarray(grad_z), 0.25 * 2 * (np.asarray(z) - e) / z.size, rtol=1e-5)


def test_quantizer_ema_update_matches_numpy_reference():
    rng = np.random.RandomState(2)
    z = rng.randn(2, 4, 4, 3).astype(np.float32)
    q = _quantizer(legacy_beta=False, use_ema=True)
    variables = q.init(jax.random.PRNGKey(0), jnp.asarray(z), True)
    assert "params" not in variables  # the EMA codebook is not a gradient-trained param
    stats = jax.tree.map(np.asarray, variables["vq_stats"])
    np.testing.assert_array_equal(stats["embedding"], stats["embed_sum"])

    out, mutated = q.apply(variables, jnp.asarray(z), True, mutable=["vq_stats"])
    # numpy reference of the VQ-VAE-2 EMA update
    flat = z.reshape(-1, 3)
    idx = np.argmin(((flat[:, None] - stats["embedding"][None]) ** 2).sum(-1), 1)
    counts = np.bincount(idx, minlength=16).astype(np.float32)
    sums = np.zeros((16, 3), np.float32)
    np.add.at(sums, idx, flat)
    cluster = 0.9 * stats["cluster_size"] + 0.1 * counts
    embed_sum = 0.9 * stats["embed_sum"] + 0.1 * sums
    n = cluster.sum()
    smoothed = (cluster + EMA_EPS) / (n + 16 * EMA_EPS) * n
    new = mutated["vq_stats"]
    np.testing.assert_allclose(np.asarray(new["cluster_size"]), cluster, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(new["embed_sum"]), embed_sum, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(new["embedding"]), embed_sum / smoothed[:, None], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(out.indices).reshape(-1), idx)
    e = stats["embedding"][idx]
    np.testing.assert_allclose(float(out.loss), 0.25 * ((flat - e) ** 2).mean(), rtol=1e-5)
    # no update without update_ema or without a mutable collection
    _, same = q.apply(variables, jnp.asarray(z), False, mutable=["vq_stats"])
    np.testing.assert_array_equal(np.asarray(same["vq_stats"]["embedding"]), stats["embedding"])


def test_vq_autoencoder_roundtrip_and_ema_mutable():
    cfg = make_cfg(kind="vq", resolution=8, double_z=False, z_channels=3, embed_dim=3, ema_codebook=True)
    model = build_autoencoder(cfg)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 3))
    variables = random_variables(jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, False)))
    (rec, q), mutated = model.apply(variables, x, True, mutable=["vq_stats"])
    assert rec.shape == x.shape and q.indices.shape == (2, 4, 4) and 0 < float(q.usage) <= 1
    assert not np.allclose(mutated["vq_stats"]["quantize"]["embedding"], variables["vq_stats"]["quantize"]["embedding"])
    h = model.apply(variables, x, method=VQAutoencoder.encode)
    dec = model.apply(variables, h, method=VQAutoencoder.decode)
    rec_eval, _ = model.apply(variables, x, False)
    np.testing.assert_allclose(np.asarray(dec), np.asarray(rec_eval), atol=1e-5)
