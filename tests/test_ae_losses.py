"""Stage-1 loss pieces against hand values, closed forms and the CompVis formulas evaluated in torch."""

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F
from flax import traverse_util

from latentdiff.train import ae_losses as L


def test_reconstruction_nll_matches_compvis_formula():
    rng = np.random.RandomState(0)
    x, x_rec = rng.randn(3, 8, 8, 3).astype(np.float32), rng.randn(3, 8, 8, 3).astype(np.float32)
    lpips = rng.rand(3).astype(np.float32)
    logvar = np.float32(0.3)
    # CompVis LPIPSWithDiscriminator (NCHW), perceptual loss shaped [B,1,1,1]
    tx, trec = torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(x_rec.transpose(0, 3, 1, 2))
    rec = torch.abs(tx - trec) + 0.7 * torch.from_numpy(lpips)[:, None, None, None]
    nll = rec / torch.exp(torch.tensor(logvar)) + torch.tensor(logvar)
    expected = (torch.sum(nll) / nll.shape[0]).item()
    got = L.reconstruction_nll(jnp.asarray(x), jnp.asarray(x_rec), jnp.asarray(lpips), 0.7, jnp.asarray(logvar))
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)
    # logvar 0, no perceptual term: plain L1 summed per image
    plain = L.reconstruction_nll(jnp.asarray(x), jnp.asarray(x_rec), jnp.zeros(3), 1.0, jnp.float32(0.0))
    np.testing.assert_allclose(float(plain), np.abs(x - x_rec).sum() / 3, rtol=1e-5)


def test_kl_and_generator_losses():
    np.testing.assert_allclose(float(L.kl_loss(jnp.array([1.0, 2.0, 6.0]))), 3.0)
    np.testing.assert_allclose(float(L.generator_adv_loss(jnp.array([[0.5, -1.5], [2.0, 3.0]]))), -1.0)


def test_hinge_d_loss_hand_values():
    real = jnp.array([2.0, 0.5, -1.0])  # relu(1 - real) = 0, 0.5, 2 -> mean 5/6
    fake = jnp.array([-2.0, 0.0, 1.0])  # relu(1 + fake) = 0, 1, 2 -> mean 1
    np.testing.assert_allclose(float(L.hinge_d_loss(real, fake)), 0.5 * (5 / 6 + 1.0), rtol=1e-6)


def test_vanilla_d_loss_is_bce():
    rng = np.random.RandomState(1)
    real, fake = rng.randn(2, 5, 5, 1).astype(np.float32), rng.randn(2, 5, 5, 1).astype(np.float32)
    tr, tf = torch.from_numpy(real), torch.from_numpy(fake)
    bce = F.binary_cross_entropy_with_logits
    expected = 0.5 * (bce(tr, torch.ones_like(tr)) + bce(tf, torch.zeros_like(tf))).item()
    np.testing.assert_allclose(float(L.vanilla_d_loss(jnp.asarray(real), jnp.asarray(fake))), expected, rtol=1e-5)


def test_adaptive_weight_on_closed_form_toy():
    # last layer W; nll(W) = 0.5 * ||W - A||^2 -> grad W - A;  g(W) = -mean(C * W) -> grad -C / W.size
    rng = np.random.RandomState(2)
    w, a, c = (jnp.asarray(rng.randn(3, 3, 4, 2).astype(np.float32)) for _ in range(3))
    nll_grad = jax.grad(lambda w: 0.5 * jnp.sum(jnp.square(w - a)))(w)
    g_grad = jax.grad(lambda w: L.generator_adv_loss(c * w))(w)
    expected = np.linalg.norm(np.asarray(w - a)) / (np.linalg.norm(np.asarray(c)) / w.size + 1e-4) * 0.5
    np.testing.assert_allclose(float(L.adaptive_weight(nll_grad, g_grad, 0.5)), expected, rtol=1e-5)
    # clamped to 1e4 * disc_weight when the generator gradient vanishes
    np.testing.assert_allclose(float(L.adaptive_weight(nll_grad, jnp.zeros_like(g_grad), 0.5)), 0.5e4)
    # gradient-stopped
    grad = jax.grad(lambda s: L.adaptive_weight(s * nll_grad, g_grad, 0.5))(1.0)
    assert float(grad) == 0.0


def test_adaptive_weight_matches_torch_autograd():
    rng = np.random.RandomState(3)
    w0, x = rng.randn(4, 3).astype(np.float32), rng.randn(5, 4).astype(np.float32)
    tw = torch.from_numpy(w0).requires_grad_(True)
    out = torch.from_numpy(x) @ tw
    nll, g = torch.sum(torch.abs(out - 1.0)), -torch.mean(torch.tanh(out))
    gn = torch.autograd.grad(nll, tw, retain_graph=True)[0]
    gg = torch.autograd.grad(g, tw, retain_graph=True)[0]
    expected = torch.clamp(torch.norm(gn) / (torch.norm(gg) + 1e-4), 0.0, 1e4).item() * 0.5
    jw = jnp.asarray(w0)
    nll_grad = jax.grad(lambda w: jnp.sum(jnp.abs(jnp.asarray(x) @ w - 1.0)))(jw)
    g_grad = jax.grad(lambda w: L.generator_adv_loss(jnp.tanh(jnp.asarray(x) @ w)))(jw)
    np.testing.assert_allclose(float(L.adaptive_weight(nll_grad, g_grad, 0.5)), expected, rtol=1e-5)


def test_disc_factor_switches_on_at_disc_start():
    f = jax.jit(lambda s: L.disc_factor(s, 100, 1.5))
    assert [float(f(s)) for s in (0, 99, 100, 5000)] == [0.0, 0.0, 1.5, 1.5]
    assert float(L.disc_factor(7, 0, 1.0)) == 1.0


def test_weighted_generator_grads_equal_two_full_gradients():
    """One pullback of (1, λ·factor) with λ from last-layer gradients == ∇main + λ·factor·∇g from two full gradients
    (the formulation of CompVis's loss), on a small two-layer generator with a logvar-like extra leaf."""
    rng = np.random.default_rng(0)
    params = {
        "autoencoder": {
            "enc": {"kernel": jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)},
            "decoder": {"conv_out": {"kernel": jnp.asarray(rng.normal(size=(5, 4)), jnp.float32)}},
        },
        "logvar": jnp.float32(0.3),
    }
    x = jnp.asarray(rng.normal(size=(3, 6)), jnp.float32)
    critic = jnp.asarray(rng.normal(size=(4,)), jnp.float32)

    def losses(p):
        h = jnp.tanh(x @ p["autoencoder"]["enc"]["kernel"])
        x_rec = h @ p["autoencoder"]["decoder"]["conv_out"]["kernel"]
        main = jnp.sum(jnp.abs(x_rec[:, :4] - x[:, :4])) / jnp.exp(p["logvar"]) + p["logvar"]
        return (main, -jnp.mean(x_rec @ critic)), x_rec

    path = ("autoencoder", "decoder", "conv_out", "kernel")
    factor = jnp.float32(0.7)
    grads, weight, main, g_loss, _ = L.weighted_generator_grads(losses, params, path, 0.5, factor)
    grad_main = jax.grad(lambda p: losses(p)[0][0])(params)
    grad_g = jax.grad(lambda p: losses(p)[0][1])(params)
    at_last = lambda tree: traverse_util.flatten_dict(tree)[path]
    want_weight = L.adaptive_weight(at_last(grad_main), at_last(grad_g), 0.5)
    np.testing.assert_allclose(float(weight), float(want_weight), rtol=1e-6)
    want = jax.tree.map(lambda a, b: a + want_weight * factor * b, grad_main, grad_g)
    for w, h in zip(jax.tree.leaves(want), jax.tree.leaves(grads)):
        np.testing.assert_allclose(h, w, rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(grads["logvar"])) > 0 and float(weight) > 0  # every term present
    np.testing.assert_allclose(float(main), float(losses(params)[0][0]), rtol=1e-6)
    np.testing.assert_allclose(float(g_loss), float(losses(params)[0][1]), rtol=1e-6)
