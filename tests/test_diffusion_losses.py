"""Diffusion losses: oracle denoisers give zero loss, min-SNR weights vs closed form, bucketing, caption dropout."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from latentdiff.diffusion import losses as L
from latentdiff.diffusion import schedules as S

T = 1000
SCHED = S.make_schedule("linear", T, 0.00085, 0.012)


def _np_alphas_cumprod():
    betas = np.linspace(math.sqrt(0.00085), math.sqrt(0.012), T) ** 2
    return np.cumprod(1.0 - betas)


@pytest.mark.parametrize("param", ["eps", "v", "x0"])
def test_oracle_denoiser_has_zero_loss_and_wrong_one_does_not(param):
    """Data = one fixed point x0*: the oracle knows x0* and returns the exact target from x_t alone."""
    x0_star = jnp.asarray(np.random.default_rng(0).normal(size=(4, 4, 3)), jnp.float32)
    batch = 64
    rng = jax.random.PRNGKey(0)
    t = L.sample_timesteps(jax.random.fold_in(rng, 1), batch, T)
    x0 = jnp.broadcast_to(x0_star, (batch, *x0_star.shape))
    noise = jax.random.normal(jax.random.fold_in(rng, 2), x0.shape)
    x_t = S.q_sample(SCHED, x0, t, noise)

    def oracle(x, tt):
        eps = S.eps_from_x0(SCHED, x, tt, x0)  # exact ε recovered from x_t
        return {"eps": eps, "x0": x0, "v": S.v_from_eps_x0(SCHED, tt, eps, x0)}[param]

    for gamma in (None, 5.0):
        loss, per_example = L.diffusion_loss(SCHED, param, oracle(x_t, t), x0, noise, t, gamma)
        assert per_example.shape == (batch,)
        assert float(loss) < 1e-8
    loss_bad, _ = L.diffusion_loss(SCHED, param, oracle(x_t, t) + 0.1, x0, noise, t, None)
    np.testing.assert_allclose(float(loss_bad), 0.01, rtol=1e-3)


def test_targets_and_weights_vs_closed_form():
    ab = _np_alphas_cumprod()
    t = np.array([0, 10, 100, 400, 700, 999])
    snr = ab[t] / (1 - ab[t])
    tj = jnp.asarray(t, jnp.int32)
    gamma = 5.0
    want = {
        "eps": np.minimum(snr, gamma) / snr,
        "v": np.minimum(snr, gamma) / (snr + 1),
        "x0": np.minimum(snr, gamma),
    }
    for param, w in want.items():
        np.testing.assert_allclose(np.asarray(L.min_snr_weights(SCHED, param, tj, gamma)), w, rtol=2e-5)
    rng = np.random.default_rng(1)
    x0, noise = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
    v_want = np.sqrt(ab[t])[:, None] * noise - np.sqrt(1 - ab[t])[:, None] * x0
    v_got = L.training_targets(SCHED, "v", jnp.asarray(x0, jnp.float32), jnp.asarray(noise, jnp.float32), tj)
    np.testing.assert_allclose(np.asarray(v_got), v_want, atol=1e-5)
    # weighted loss = weight · plain MSE per example
    out = rng.normal(size=(6, 5))
    j = lambda a: jnp.asarray(a, jnp.float32)
    loss, per = L.diffusion_loss(SCHED, "eps", j(out), j(x0), j(noise), tj, gamma)
    per_want = np.mean((out - noise) ** 2, axis=1) * want["eps"]
    np.testing.assert_allclose(np.asarray(per), per_want, rtol=1e-5)
    np.testing.assert_allclose(float(loss), per_want.mean(), rtol=1e-5)


def test_sample_timesteps_uniform_and_buckets():
    t = L.sample_timesteps(jax.random.PRNGKey(3), 20000, T)
    assert t.dtype == jnp.int32 and int(t.min()) >= 0 and int(t.max()) <= T - 1
    per = jnp.asarray(t, jnp.float32)  # loss = t, so bucket means are known
    sums, counts = L.loss_per_timestep_bucket(per, t, T, 4)
    counts_np = np.asarray(counts)
    assert counts_np.sum() == 20000
    np.testing.assert_allclose(counts_np / 20000, 0.25, atol=0.015)  # uniform
    t_np = np.asarray(t)
    for k in range(4):
        sel = (t_np >= 250 * k) & (t_np < 250 * (k + 1))
        assert counts_np[k] == sel.sum()
        np.testing.assert_allclose(float(sums[k]), t_np[sel].astype(np.float64).sum(), rtol=1e-5)
    with pytest.raises(ValueError, match="num_buckets"):
        L.loss_per_timestep_bucket(per, t, T, 0)


def test_drop_condition_rate_rows_and_pytrees():
    batch, p = 4000, 0.1
    tokens = jnp.arange(1, batch * 3 + 1, dtype=jnp.int32).reshape(batch, 3)
    labels = jnp.arange(batch, dtype=jnp.int32) + 1
    cond = {"tokens": tokens, "label": labels}
    null = {"tokens": jnp.zeros((3,), jnp.int32), "label": jnp.int32(0)}
    rates = []
    for seed in range(5):
        out = L.drop_condition(jax.random.PRNGKey(seed), cond, null, p)
        dropped_tok = np.all(np.asarray(out["tokens"]) == 0, axis=1)
        dropped_lab = np.asarray(out["label"]) == 0
        np.testing.assert_array_equal(dropped_tok, dropped_lab)  # a row is dropped as a whole
        keep = ~dropped_tok
        np.testing.assert_array_equal(np.asarray(out["tokens"])[keep], np.asarray(tokens)[keep])
        rates.append(dropped_tok.mean())
    # 20000 Bernoulli(0.1) draws: std of the mean ≈ 0.0021
    assert abs(np.mean(rates) - p) < 0.01
    assert np.all(np.asarray(L.drop_condition(jax.random.PRNGKey(0), cond, null, 0.0)["label"]) == labels)
    assert np.all(np.asarray(L.drop_condition(jax.random.PRNGKey(0), cond, null, 1.0)["label"]) == 0)
    with pytest.raises(ValueError, match="p_uncond"):
        L.drop_condition(jax.random.PRNGKey(0), cond, null, 1.5)
    with pytest.raises(ValueError, match="does not broadcast"):
        L.drop_condition(jax.random.PRNGKey(0), cond, {"tokens": jnp.zeros((5,), jnp.int32), "label": 0}, 0.1)
