"""latentdiff.metrics: Fréchet distance (closed forms, pytorch-fid), resizes (torch, TF1 formula, PIL), IS, PSNR,
batched / sharded Inception features and the eval/fid.py CLI."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from pytorch_fid.fid_score import calculate_frechet_distance, compute_statistics_of_path

from latentdiff import metrics
from latentdiff.convert import inception_weights as iw
from latentdiff.evaluation import references
from latentdiff.nn.inception import abstract_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def random_cov(rng, d, n):
    f = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * 0.3
    return np.cov(f, rowvar=False)


# ---------------------------------------------------------------------------------------------- Fréchet distance


def test_frechet_identity_covariances_2048():
    d = 2048
    eye = np.eye(d)
    fid = metrics.frechet_distance((np.zeros(d), eye), (np.ones(d), eye))
    assert abs(fid - 2048.0) < 1e-6


def test_frechet_closed_forms():
    rng = np.random.default_rng(0)
    d = 32
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    sigma = random_cov(rng, d, 100)
    assert metrics.frechet_distance((mu1, sigma), (mu2, sigma)) == pytest.approx(np.sum((mu1 - mu2) ** 2), rel=1e-9)
    a, b = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert metrics.frechet_distance((mu1, np.diag(a)), (mu2, np.diag(b))) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("n", [400, 40])  # full-rank and singular (N < D) covariances
def test_frechet_matches_pytorch_fid(n):
    rng = np.random.default_rng(n)
    d = 64
    s1, s2 = random_cov(rng, d, n), random_cov(rng, d, n)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d) * 0.5
    ours = metrics.frechet_distance((mu1, s1), (mu2, s2))
    ref = calculate_frechet_distance(mu1, s1, mu2, s2)
    assert ours == pytest.approx(ref, rel=1e-6)


def test_stats_and_errors(tmp_path):
    feats = np.random.default_rng(0).normal(size=(50, 8)).astype(np.float32)
    mu, sigma = metrics.stats(feats)
    assert mu.dtype == np.float64 and sigma.shape == (8, 8)
    np.testing.assert_allclose(sigma, np.cov(feats.astype(np.float64), rowvar=False), rtol=1e-12)
    with pytest.raises(ValueError, match="at least 2 images"):
        metrics.stats(feats[:1])
    with pytest.raises(ValueError, match="different dimensions"):
        metrics.frechet_distance((mu, sigma), (np.zeros(4), np.eye(4)))
    with pytest.raises(ValueError, match="mu \\[D\\] and sigma"):
        metrics.frechet_distance((mu, sigma[:4]), (mu, sigma))
    with pytest.raises(ValueError, match=r"(negative eigenvalue|positive semi-definite)"):
        metrics.frechet_distance((mu, -np.eye(8)), (mu, sigma))
    path = str(tmp_path / "stats.npz")
    references.save_stats(path, mu, sigma)
    mu2, sigma2 = references.load_stats(path)
    np.testing.assert_array_equal(mu, mu2)
    np.testing.assert_array_equal(sigma, sigma2)
    m_ref, s_ref = compute_statistics_of_path(path, None, 1, 8, "cpu")  # pytorch-fid reads our file
    np.testing.assert_array_equal(m_ref, mu)
    np.testing.assert_array_equal(s_ref, sigma)
    np.savez(str(tmp_path / "bad.npz"), m=mu)
    with pytest.raises(ValueError, match="keys 'mu' and 'sigma'"):
        references.load_stats(str(tmp_path / "bad.npz"))


# ------------------------------------------------------------------------------------------------------ resizes


def tf1_reference(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """TF1 resize_bilinear(align_corners=False) written out per output pixel: src = dst * (in / out) with TF1's
    float32 scale and product (resize_bilinear_op.cc: `const float in = i * scale`), interpolation in float64."""
    n, h, w, c = x.shape
    out = np.zeros((n, out_h, out_w, c))
    for i in range(out_h):
        sy = float(np.float32(i) * np.float32(h / out_h))
        y0 = int(np.floor(sy))
        y1, fy = min(y0 + 1, h - 1), sy - y0
        for j in range(out_w):
            sx = float(np.float32(j) * np.float32(w / out_w))
            x0 = int(np.floor(sx))
            x1, fx = min(x0 + 1, w - 1), sx - x0
            top = x[:, y0, x0] * (1 - fx) + x[:, y0, x1] * fx
            bottom = x[:, y1, x0] * (1 - fx) + x[:, y1, x1] * fx
            out[:, i, j] = top * (1 - fy) + bottom * fy
    return out


@pytest.mark.parametrize("shape", [(2, 23, 37, 3), (1, 333, 301, 3)])  # up- and down-sampling
def test_bilinear_resizes(shape):
    x = np.random.default_rng(1).uniform(0, 1, shape).astype(np.float32)
    ours_torch = np.asarray(metrics.resize_bilinear_torch(jnp.asarray(x), (299, 299)))
    ref_torch = F.interpolate(
        torch.from_numpy(x).permute(0, 3, 1, 2), size=(299, 299), mode="bilinear", align_corners=False
    )
    np.testing.assert_allclose(ours_torch, ref_torch.permute(0, 2, 3, 1).numpy(), atol=1e-5, rtol=0)
    ours_tf1 = np.asarray(metrics.resize_bilinear_tf1(jnp.asarray(x), (299, 299)))
    np.testing.assert_allclose(ours_tf1, tf1_reference(x.astype(np.float64), 299, 299), atol=1e-5, rtol=0)
    assert np.abs(ours_tf1 - ours_torch).max() > 1e-3  # the two conventions really differ


@pytest.mark.parametrize("shape", [(1, 40, 56, 3), (1, 420, 380, 3)])
def test_pil_bicubic_resize(shape):
    x = np.random.default_rng(2).integers(0, 256, shape).astype(np.float32)
    ours = np.asarray(metrics.resize_bicubic_pil(jnp.asarray(x), (299, 299)))
    ref = np.stack([np.asarray(Image.fromarray(x[0, :, :, c]).resize((299, 299), Image.BICUBIC)) for c in range(3)], -1)
    np.testing.assert_allclose(ours[0], ref, atol=2e-3, rtol=0)


def test_preprocess_modes_range_and_identity():
    img = np.random.default_rng(3).integers(0, 256, (2, 299, 299, 3)).astype(np.uint8)
    ref = (img.astype(np.float32) - 128) / 128
    for mode in ("paper", "clean"):  # 299 px inputs pass the resize unchanged
        np.testing.assert_allclose(np.asarray(metrics.preprocess_images(jnp.asarray(img), mode)), ref, atol=1e-6)
    ours = np.asarray(metrics.preprocess_images(jnp.asarray(img), "pytorch_fid"))
    np.testing.assert_allclose(ours, 2 * (img / 255.0) - 1, atol=1e-6)
    with pytest.raises(ValueError, match="unknown preprocess"):
        metrics.preprocess_images(jnp.asarray(img), "tf2")


# ------------------------------------------------------------------------------------------------------ IS, PSNR


def test_inception_score_closed_forms():
    mean, std = metrics.inception_score(np.zeros((40, 1008)), splits=4)
    assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)
    k = 20
    confident = np.eye(1008)[:k] * 60.0  # one confident image per distinct class
    mean, std = metrics.inception_score(confident, splits=1)
    assert mean == pytest.approx(k, rel=1e-6)
    # two splits with disjoint halves of 10 classes each (no shuffle): IS = 10 in each split
    mean, std = metrics.inception_score(confident, splits=2, shuffle_seed=None)
    assert mean == pytest.approx(10, rel=1e-6) and std == pytest.approx(0, abs=1e-6)
    with pytest.raises(ValueError, match="at least"):
        metrics.inception_score(np.zeros((3, 1008)), splits=10)


def test_psnr():
    a = jnp.zeros((2, 4, 4, 3))
    b = a.at[1].set(0.1)
    p = np.asarray(metrics.psnr(a, b, data_range=1.0))
    assert np.isinf(p[0]) and p[1] == pytest.approx(20.0, abs=1e-4)
    with pytest.raises(ValueError, match="equal shapes"):
        metrics.psnr(a, b[:1], 1.0)


# ------------------------------------------------------------------------------------------ features and the CLI


@functools.cache
def random_params():
    """Random FID-Inception params with fc (He-scaled kernels, plausible BN statistics)."""
    rng = np.random.default_rng(0)
    flat = jax.tree_util.tree_flatten_with_path(abstract_params(1008))[0]
    out = {}
    for path, leaf in flat:
        name = "/".join(p.key for p in path)
        if name.endswith("kernel"):
            v = rng.normal(size=leaf.shape) * np.sqrt(2.0 / np.prod(leaf.shape[:-1]))
        elif name.endswith("var"):
            v = rng.uniform(0.5, 1.5, leaf.shape)
        elif name.endswith("scale"):
            v = np.ones(leaf.shape)
        else:
            v = rng.normal(size=leaf.shape) * 0.1
        out[name] = v.astype(np.float32)
    return out


def test_inception_features_padding_and_mesh(tmp_path):
    params = iw.convert_state_dict(random_params())
    images = np.random.default_rng(4).integers(0, 256, (3, 32, 32, 3)).astype(np.uint8)
    pool, logits = metrics.inception_features(params, images, batch_size=2, preprocess="paper")
    assert pool.shape == (3, 2048) and logits.shape == (3, 1008)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("data",))
    pool_m, logits_m = metrics.inception_features(params, images, batch_size=4, preprocess="paper", mesh=mesh)
    np.testing.assert_allclose(pool_m, pool, rtol=1e-5, atol=1e-5 * np.abs(pool).max())
    np.testing.assert_allclose(logits_m, logits, rtol=1e-5, atol=1e-5 * np.abs(logits).max())
    assert np.abs(pool[0] - pool[1]).max() > 1e-3  # different images, different features
    with pytest.raises(ValueError, match="divisible"):
        metrics.inception_features(params, images, batch_size=3, preprocess="paper", mesh=mesh)
    with pytest.raises(ValueError, match="uint8"):
        metrics.inception_features(params, images.astype(np.float32), batch_size=2, preprocess="paper")

    # `latentdiff eval fid`: images npz + weights vs reference stats (mu + 1, I). Closed form with Σ1 = XᵀX/(N−1)
    # (X centred features): FID = D + Tr Σ1 + D − 2 Σ √eig(X Xᵀ/(N−1)) (Σ1 nonzero eigenvalues: the Gram matrix's)
    from latentdiff.evaluation import fid as fid_cli

    weights = str(tmp_path / "w.safetensors")
    iw.save_params(params, weights, "random")
    np.savez(str(tmp_path / "gen.npz"), images=images)
    ref = str(tmp_path / "ref.npz")
    feats = pool.astype(np.float64)
    references.save_stats(ref, feats.mean(0) + 1.0, np.eye(2048))
    xc = feats - feats.mean(0)
    gram_eig = np.clip(np.linalg.eigvalsh(xc @ xc.T / 2), 0, None)
    expected = 2048 + np.sum(xc**2) / 2 + 2048 - 2 * np.sqrt(gram_eig).sum()
    out_json = str(tmp_path / "fid.json")
    args = ["--generated", str(tmp_path / "gen.npz"), "--reference", ref, "--inception_weights", weights]
    result = fid_cli.main([*args, "--batch_size", "2", "--json", out_json, "--save_stats", str(tmp_path / "g.npz")])
    assert result["fid"] == pytest.approx(expected, rel=1e-6)
    saved = json.load(open(out_json))
    assert saved["n_generated"] == 3 and saved["fid"] == result["fid"] and "inception_score_mean" in saved
    assert "kid" not in saved  # the reference is statistics: no features, no KID
    # both sides images: KID as well, on the same features (torch-fidelity's defaults, subsets of the smaller set)
    np.savez(str(tmp_path / "ref_images.npz"), images=images[::-1].copy())
    both = fid_cli.main(["--generated", str(tmp_path / "gen.npz"), "--reference", str(tmp_path / "ref_images.npz"),
                         "--inception_weights", weights, "--batch_size", "2"])  # fmt: skip
    assert both["kid"] == fid_cli.kid_report(pool, pool[::-1])["kid"] and both["kid_subset"] == 3
    assert "KID: " in fid_cli.format_scores(both)
    np.testing.assert_allclose(references.load_stats(str(tmp_path / "g.npz"))[0], pool.mean(0), rtol=1e-5, atol=1e-6)
    # a directory of the same images plus an unreadable file: skipped with a warning and counted
    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    for i, im in enumerate(images):
        Image.fromarray(im).save(img_dir / f"{i}.png")
    (img_dir / "broken.png").write_bytes(b"not a png")
    with pytest.warns(UserWarning, match="skipped 1"):
        kind, groups, skipped = fid_cli.load_images_or_stats(str(img_dir))
    assert kind == "images" and skipped == 1
    np.testing.assert_array_equal(groups[0], images)
    with pytest.raises(SystemExit, match="tfds"):
        fid_cli.main(["--generated", ref, "--reference", "tfds:coco/validation"])
    with pytest.raises(SystemExit, match="inception_weights is required"):
        fid_cli.main(["--generated", str(tmp_path / "gen.npz"), "--reference", ref])
