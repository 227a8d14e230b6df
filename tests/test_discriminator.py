"""PatchGAN discriminator: output geometry, taming's init, and parity with the same net built in torch by hand
(train mode with running-stat updates, then eval mode)."""

import jax
import jax.numpy as jnp
import numpy as np
import torch
from torch import nn as tnn

from latentdiff.convert.key_tables import inverse_conv_kernel
from latentdiff.nn.discriminator import NLayerDiscriminator


def disc(ndf: int = 8, n_layers: int = 3, use_batchnorm: bool = True, dtype=jnp.float32) -> NLayerDiscriminator:
    return NLayerDiscriminator(in_channels=3, ndf=ndf, n_layers=n_layers, use_batchnorm=use_batchnorm, dtype=dtype)


def test_patch_logits_are_30x30_for_256_inputs():
    model = disc(ndf=64, n_layers=3)
    x = jnp.zeros((2, 256, 256, 3))
    out = jax.eval_shape(lambda: model.init_with_output(jax.random.PRNGKey(0), x, False)[0])
    assert out.shape == (2, 30, 30, 1)
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, False))
    shapes = {k: v["kernel"].shape for k, v in variables["params"].items() if k.startswith("conv")}
    assert shapes == {
        "conv_0": (4, 4, 3, 64),
        "conv_1": (4, 4, 64, 128),
        "conv_2": (4, 4, 128, 256),
        "conv_3": (4, 4, 256, 512),
        "conv_4": (4, 4, 512, 1),
    }
    assert "bias" not in variables["params"]["conv_1"] and "bias" in variables["params"]["conv_4"]


def random_variables(abstract, seed: int = 0):
    """Random values for jax.eval_shape(init) (compiling the real init's RNG is slow on CPU); non-trivial BN stats."""
    rng = np.random.RandomState(seed)

    def fill(path, leaf):
        name = path[-1].key
        if name == "kernel":
            return jnp.asarray(rng.randn(*leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1])), jnp.float32)
        if name in ("scale", "var"):
            return jnp.asarray(1 + 0.1 * rng.rand(*leaf.shape), jnp.float32)
        return jnp.asarray(0.1 * rng.randn(*leaf.shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(fill, abstract)


def torch_patchgan(ndf: int, n_layers: int) -> tnn.Sequential:
    """taming-transformers NLayerDiscriminator with BatchNorm, written out by hand."""
    layers = [tnn.Conv2d(3, ndf, 4, 2, 1), tnn.LeakyReLU(0.2, True)]
    mult = 1
    for n in range(1, n_layers):
        prev, mult = mult, min(2**n, 8)
        layers += [tnn.Conv2d(ndf * prev, ndf * mult, 4, 2, 1, bias=False), tnn.BatchNorm2d(ndf * mult)]
        layers += [tnn.LeakyReLU(0.2, True)]
    prev, mult = mult, min(2**n_layers, 8)
    layers += [tnn.Conv2d(ndf * prev, ndf * mult, 4, 1, 1, bias=False), tnn.BatchNorm2d(ndf * mult)]
    layers += [tnn.LeakyReLU(0.2, True), tnn.Conv2d(ndf * mult, 1, 4, 1, 1)]
    return tnn.Sequential(*layers)


def load_into_torch(net: tnn.Sequential, variables) -> None:
    params, stats = variables["params"], variables["batch_stats"]
    convs = [m for m in net if isinstance(m, tnn.Conv2d)]
    norms = [m for m in net if isinstance(m, tnn.BatchNorm2d)]
    with torch.no_grad():
        for i, conv in enumerate(convs):
            conv.weight.copy_(torch.from_numpy(inverse_conv_kernel(np.asarray(params[f"conv_{i}"]["kernel"])).copy()))
            if conv.bias is not None:
                conv.bias.copy_(torch.from_numpy(np.array(params[f"conv_{i}"]["bias"])))
        for i, norm in enumerate(norms, start=1):
            norm.weight.copy_(torch.from_numpy(np.array(params[f"norm_{i}"]["scale"])))
            norm.bias.copy_(torch.from_numpy(np.array(params[f"norm_{i}"]["bias"])))
            norm.running_mean.copy_(torch.from_numpy(np.array(stats[f"norm_{i}"]["mean"])))
            norm.running_var.copy_(torch.from_numpy(np.array(stats[f"norm_{i}"]["var"])))


def test_matches_torch_in_train_and_eval_modes():
    model = disc(ndf=8, n_layers=3)
    rng = np.random.RandomState(0)
    x1 = rng.randn(4, 64, 64, 3).astype(np.float32)
    x2 = rng.randn(4, 64, 64, 3).astype(np.float32) * 0.5 + 0.2
    variables = random_variables(jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.asarray(x1), False)))
    net = torch_patchgan(8, 3)
    load_into_torch(net, variables)
    to_torch = lambda a: torch.from_numpy(a.transpose(0, 3, 1, 2).copy())

    net.train()
    with torch.no_grad():
        t_train = net(to_torch(x1)).numpy().transpose(0, 2, 3, 1)
    out, mutated = model.apply(variables, jnp.asarray(x1), True, mutable=["batch_stats"])
    assert out.shape == (4, 6, 6, 1)
    np.testing.assert_allclose(np.asarray(out), t_train, atol=1e-4)
    norms = [m for m in net if isinstance(m, tnn.BatchNorm2d)]
    for i, norm in enumerate(norms, start=1):
        np.testing.assert_allclose(
            np.asarray(mutated["batch_stats"][f"norm_{i}"]["mean"]), norm.running_mean, atol=1e-5
        )
        np.testing.assert_allclose(np.asarray(mutated["batch_stats"][f"norm_{i}"]["var"]), norm.running_var, rtol=1e-4)

    net.eval()
    with torch.no_grad():
        t_eval = net(to_torch(x2)).numpy().transpose(0, 2, 3, 1)
    out_eval = model.apply({"params": variables["params"], **mutated}, jnp.asarray(x2), False)
    np.testing.assert_allclose(np.asarray(out_eval), t_eval, atol=1e-4)
    assert not np.allclose(t_eval, t_train[:, :, :, :], atol=1e-3)


def test_taming_weights_init():
    model = disc(ndf=16, n_layers=3)
    init = jax.jit(lambda key: model.init(key, jnp.zeros((1, 32, 32, 3)), False))  # one compile for all params
    params = init(jax.random.PRNGKey(0))["params"]
    kernels = np.concatenate([np.ravel(params[f"conv_{i}"]["kernel"]) for i in range(5)])
    assert abs(kernels.mean()) < 2e-3 and 0.018 < kernels.std() < 0.022
    scales = np.concatenate([np.asarray(params[f"norm_{i}"]["scale"]) for i in range(1, 4)])
    assert abs(scales.mean() - 1.0) < 0.01 and 0.012 < scales.std() < 0.028
    zeros = [params["conv_0"]["bias"], params["conv_4"]["bias"]] + [params[f"norm_{i}"]["bias"] for i in range(1, 4)]
    assert all(not np.any(np.asarray(b)) for b in zeros)


def test_without_batchnorm_and_bfloat16():
    model = disc(ndf=8, n_layers=2, use_batchnorm=False)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))
    variables = random_variables(jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, True)))
    assert "batch_stats" not in variables and "bias" in variables["params"]["conv_1"]
    out32 = model.apply(variables, x, True)
    out16 = disc(ndf=8, n_layers=2, use_batchnorm=False, dtype=jnp.bfloat16).apply(variables, x, True)
    assert out16.dtype == jnp.float32 and out32.shape == (2, 6, 6, 1)
    assert float(jnp.max(jnp.abs(out16 - out32))) < 0.05 * float(jnp.max(jnp.abs(out32))) + 1e-3
