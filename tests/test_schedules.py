"""Schedules and eps/x0/v conversions vs closed forms (numpy float64) and diffusers' schedulers."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch  # noqa: F401  (diffusers needs it; imported at the top as the test rules ask)
from diffusers import DDIMScheduler, DDPMScheduler

from latentdiff.diffusion import schedules as S

T = 1000


def _np_linear_sqrt(start, end, n):
    betas = np.array([(math.sqrt(start) + i * (math.sqrt(end) - math.sqrt(start)) / (n - 1)) ** 2 for i in range(n)])
    return betas, np.cumprod(1.0 - betas)


def test_linear_matches_closed_form_and_diffusers():
    sched = S.make_schedule("linear", T, 0.00085, 0.012)
    betas, ab = _np_linear_sqrt(0.00085, 0.012, T)
    np.testing.assert_allclose(np.asarray(sched.betas), betas, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(sched.alphas_cumprod), ab, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(sched.sqrt_alphas_cumprod), np.sqrt(ab), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(sched.sqrt_one_minus_alphas_cumprod), np.sqrt(1 - ab), rtol=1e-6)
    ref = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=T)
    np.testing.assert_allclose(np.asarray(sched.alphas_cumprod), ref.alphas_cumprod.numpy(), atol=1e-6)
    alias = S.make_schedule("scaled_linear", T, 0.00085, 0.012)
    np.testing.assert_array_equal(np.asarray(alias.alphas_cumprod), np.asarray(sched.alphas_cumprod))
    assert sched.num_timesteps == T
    assert sched.betas.dtype == jnp.float32


def test_linear_plain_matches_diffusers_linear():
    sched = S.make_schedule("linear_plain", T, 1e-4, 2e-2)
    ref = DDPMScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=2e-2, num_train_timesteps=T)
    np.testing.assert_allclose(np.asarray(sched.betas), ref.betas.numpy(), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(sched.alphas_cumprod), ref.alphas_cumprod.numpy(), atol=1e-6)


def test_cosine_matches_formula_and_diffusers():
    s = 8e-3
    sched = S.make_schedule("cosine", T, 0.0, 0.0, cosine_s=s)
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
    ab_formula = np.array([f(t + 1) / f(0) for t in range(T)])
    betas = np.asarray(sched.betas)
    assert betas.max() <= 0.999 + 1e-7 and betas.min() > 0
    unclipped = betas < 0.999 - 1e-6
    assert unclipped[:-1].all()  # only the very last beta hits the clip
    np.testing.assert_allclose(np.asarray(sched.alphas_cumprod)[:-1], ab_formula[:-1], rtol=1e-5, atol=1e-9)
    ref = DDPMScheduler(beta_schedule="squaredcos_cap_v2", num_train_timesteps=T)
    np.testing.assert_allclose(betas, ref.betas.numpy(), atol=1e-6)
    np.testing.assert_allclose(np.asarray(sched.alphas_cumprod), ref.alphas_cumprod.numpy(), atol=1e-6)


def test_conversions_and_predictions_vs_float64():
    sched = S.make_schedule("linear", T, 0.00085, 0.012)
    rng = np.random.default_rng(0)
    x0 = rng.normal(size=(6, 3, 2, 4))
    eps = rng.normal(size=x0.shape)
    t = np.array([0, 1, 250, 500, 998, 999])
    _, ab = _np_linear_sqrt(0.00085, 0.012, T)
    a = np.sqrt(ab[t])[:, None, None, None]
    s = np.sqrt(1 - ab[t])[:, None, None, None]
    x_t = a * x0 + s * eps
    v = a * eps - s * x0
    j = lambda z: jnp.asarray(z, jnp.float32)
    tj = jnp.asarray(t, jnp.int32)
    close = lambda got, want: np.testing.assert_allclose(np.asarray(got), want, atol=2e-4, rtol=1e-4)
    close(S.q_sample(sched, j(x0), tj, j(eps)), x_t)
    close(S.v_from_eps_x0(sched, tj, j(eps), j(x0)), v)
    close(S.x0_from_v(sched, j(x_t), tj, j(v)), x0)
    close(S.eps_from_v(sched, j(x_t), tj, j(v)), eps)
    close(S.eps_from_x0(sched, j(x_t), tj, j(x0)), eps)
    # x0 from eps divides by √ᾱ (≈0.068 at t=999): compare the well-conditioned rows tightly, all rows loosely
    np.testing.assert_allclose(np.asarray(S.x0_from_eps(sched, j(x_t), tj, j(eps))), x0, atol=5e-3)
    for param, out in (("eps", eps), ("v", v), ("x0", x0)):
        e, x = S.predict_eps_and_x0(sched, param, j(out), j(x_t), tj)
        np.testing.assert_allclose(np.asarray(e)[1:], eps[1:], atol=2e-3)  # t=0: eps from x0 divides by 0.029
        np.testing.assert_allclose(np.asarray(x)[:4], x0[:4], atol=2e-4)
    np.testing.assert_allclose(np.asarray(S.snr(sched, tj)), ab[t] / (1 - ab[t]), rtol=1e-5)


def test_schedule_is_a_pytree_usable_under_jit():
    sched = S.make_schedule("linear", 10, 0.00085, 0.012)
    assert len(jax.tree_util.tree_leaves(sched)) == 4
    out = jax.jit(lambda sc, x: S.q_sample(sc, x, jnp.array([3, 9]), x))(sched, jnp.ones((2, 2)))
    assert out.shape == (2, 2)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="valid kinds: linear, scaled_linear, linear_plain, cosine"):
        S.make_schedule("quadratic", T, 1e-4, 2e-2)
    with pytest.raises(ValueError, match="num_timesteps"):
        S.make_schedule("linear", 0, 1e-4, 2e-2)
    with pytest.raises(ValueError, match="linear_start"):
        S.make_schedule("linear", T, 0.02, 0.001)
    with pytest.raises(ValueError, match="cosine_s"):
        S.make_schedule("cosine", T, 0.0, 0.0, cosine_s=0.0)
    sched = S.make_schedule("linear", 10, 0.00085, 0.012)
    with pytest.raises(ValueError, match="valid: eps, v, x0"):
        S.predict_eps_and_x0(sched, "score", jnp.zeros((1, 2)), jnp.zeros((1, 2)), jnp.array([1]))
    with pytest.raises(ValueError, match="integers"):
        S.q_sample(sched, jnp.zeros((1, 2)), jnp.array([0.5]), jnp.zeros((1, 2)))
