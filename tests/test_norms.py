"""latentdiff.nn.norms.group_norm (closed-form backward, fused SiLU) against torch.nn.functional.group_norm (+ silu):
values and the gradients with respect to x, scale and bias, at one, two and eight channels per group (the
autoencoder's 128-px levels have two), for NHWC 4-d and [B, L, C] inputs; and the module's params and errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from latentdiff.nn.norms import GroupNorm, group_norm


def _torch_value_and_grads(x, scale, bias, dy, groups, eps, activation):
    """x, dy [B, ..., C] NHWC numpy -> (y, dx, dscale, dbias) from torch's NCHW group_norm."""
    perm = (0, x.ndim - 1, *range(1, x.ndim - 1))
    tx = torch.from_numpy(np.ascontiguousarray(x.transpose(perm))).double().requires_grad_(True)
    ts = torch.from_numpy(scale).double().requires_grad_(True)
    tb = torch.from_numpy(bias).double().requires_grad_(True)
    y = torch.nn.functional.group_norm(tx, groups, ts, tb, eps)
    if activation == "silu":
        y = torch.nn.functional.silu(y)
    y.backward(torch.from_numpy(np.ascontiguousarray(dy.transpose(perm))).double())
    back = (0, *range(2, x.ndim), 1)
    return (y.detach().numpy().transpose(back), tx.grad.numpy().transpose(back), ts.grad.numpy(), tb.grad.numpy())


@pytest.mark.parametrize("activation", ["none", "silu"])
@pytest.mark.parametrize("shape", [(2, 8, 8, 64), (2, 6, 5, 32), (3, 7, 256), (2, 4, 4, 16)])
def test_values_and_gradients_match_torch(shape, activation):
    groups = 8 if shape[-1] == 16 else 32  # 2, 1, 8, 2 channels per group
    rng = np.random.default_rng(sum(shape))
    x = (rng.standard_normal(shape) * 3.0 + 0.5).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    scale = rng.uniform(0.5, 1.5, shape[-1]).astype(np.float32)
    bias = rng.uniform(-0.5, 0.5, shape[-1]).astype(np.float32)
    eps = 1e-6

    def f(x, s, b):
        return group_norm(x, s, b, groups, eps, activation)

    y, vjp = jax.vjp(jax.jit(f), jnp.asarray(x), jnp.asarray(scale), jnp.asarray(bias))
    dx, ds, db = vjp(jnp.asarray(dy))
    ref = _torch_value_and_grads(x, scale, bias, dy, groups, eps, activation)
    for name, ours, want in zip(("y", "dx", "dscale", "dbias"), (y, dx, ds, db), ref, strict=True):
        assert ours.shape == want.shape, name
        np.testing.assert_allclose(np.asarray(ours), want, rtol=1e-4, atol=2e-4 * np.abs(want).max(), err_msg=name)


def test_bfloat16_input_gives_float32_statistics_and_input_dtype_gradient():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 4, 4, 64)), jnp.bfloat16)
    scale, bias = jnp.ones(64), jnp.zeros(64)
    y, vjp = jax.vjp(lambda x: group_norm(x, scale, bias, 32, 1e-6, "silu"), x)
    assert y.dtype == jnp.float32
    (dx,) = vjp(jnp.ones_like(y))
    assert dx.dtype == jnp.bfloat16
    want = group_norm(x.astype(jnp.float32), scale, bias, 32, 1e-6, "silu")
    np.testing.assert_allclose(np.asarray(y), np.asarray(want), atol=1e-5)


def test_module_params_match_flax_group_norm_and_bad_inputs_raise():
    import flax.linen as nn

    x = jnp.zeros((1, 4, 4, 64))
    ours = GroupNorm(num_groups=32, epsilon=1e-6, dtype=jnp.float32, param_dtype=jnp.float32, activation="none")
    flax_gn = nn.GroupNorm(num_groups=32, epsilon=1e-6)
    shapes = lambda m: jax.tree.map(jnp.shape, jax.eval_shape(m.init, jax.random.PRNGKey(0), x))
    assert shapes(ours) == shapes(flax_gn)
    with pytest.raises(ValueError, match="not divisible by num_groups=32"):
        ours.init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 48)))
    bad = GroupNorm(num_groups=32, epsilon=1e-6, dtype=jnp.float32, param_dtype=jnp.float32, activation="gelu")
    with pytest.raises(ValueError, match="activation must be one of"):
        bad.init(jax.random.PRNGKey(0), x)
