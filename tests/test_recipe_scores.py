"""latentdiff/evaluation/recipe_scores.py (the emoji recipe's scores) against direct formulas: PSNR, the bicubic
baseline's size, category accuracy with its chance levels, nearest neighbours, the memorisation ratio, FID + KID."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from latentdiff import metrics
from latentdiff.errors import UserError
from latentdiff.evaluation import fid, recipe_scores


def test_psnr_per_image_is_the_formula_in_db():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-9, 10, a.shape), 0, 255).astype(np.uint8)
    b[2] = a[2]
    got = recipe_scores.psnr_per_image(a, b)
    for i in range(2):
        mse = np.mean((a[i].astype(float) - b[i].astype(float)) ** 2)
        assert got[i] == pytest.approx(10 * math.log10(255**2 / mse), abs=1e-9)
    assert got[2] == pytest.approx(100.0)  # identical: capped


def test_bicubic_baseline_keeps_the_latents_number_of_values():
    assert recipe_scores.baseline_side(64, 4, 3) == 16  # 16x16x3 latent = 16x16 RGB
    assert recipe_scores.baseline_side(64, 4, 4) == 18  # 16*16*4 = 1024 values ~ 18*18*3 = 972
    assert recipe_scores.baseline_side(256, 8, 4) == 37
    image = (np.arange(64 * 64 * 3) % 251).astype(np.uint8).reshape(1, 64, 64, 3)
    expected = Image.fromarray(image[0]).resize((16, 16), Image.Resampling.BICUBIC).resize((64, 64), 3)
    np.testing.assert_array_equal(recipe_scores.bicubic_round_trip(image, 16)[0], np.asarray(expected))


def test_category_scores_with_their_chance_levels():
    labels = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    predicted = np.array([0, 0, 1, 1, 1, 1, 0, 2])
    probabilities = np.eye(3)[predicted]
    base = np.array([True, False, False, False, True, False, True, True])
    s = recipe_scores.category_scores(probabilities, labels, base)
    assert s["accuracy"] == pytest.approx(5 / 8)
    assert s["chance"] == pytest.approx(4 / 8)  # category 0 is the most common
    assert s["balanced_accuracy"] == pytest.approx((2 / 4 + 2 / 2 + 1 / 2) / 3)
    assert s["balanced_chance"] == pytest.approx(1 / 3)
    assert s["base_accuracy"] == pytest.approx(3 / 4)  # rows 0, 4, 6, 7: right, right, wrong, right
    assert s["base_chance"] == pytest.approx(2 / 4)  # base labels 0, 1, 2, 2
    assert (s["images"], s["base_images"]) == (8, 4)
    assert recipe_scores.is_base_caption(["red apple", "waving hand: dark skin tone"]).tolist() == [True, False]


def test_nearest_neighbours_and_memorisation_ratio():
    rng = np.random.default_rng(1)
    train = rng.normal(size=(50, 6))
    query = rng.normal(size=(7, 6))
    distances, rows = recipe_scores.nearest(query, train, chunk=3)
    brute = np.linalg.norm(query[:, None] - train[None], axis=-1)
    np.testing.assert_array_equal(rows, brute.argmin(axis=1))
    np.testing.assert_allclose(distances, brute.min(axis=1), rtol=1e-9)
    heldout = rng.normal(size=(20, 6))
    copies = train[:10] + 1e-3  # generated images that sit on training images
    m = recipe_scores.memorisation(copies, heldout, train)
    assert m["ratio"] < 0.01 and m["copies"] == 10
    novel = rng.normal(size=(20, 6))  # drawn like the held-out set: ratio near 1, copies only by chance (~20/21)
    m = recipe_scores.memorisation(novel, heldout, train)
    assert 0.6 < m["ratio"] < 1.6 and m["copies"] <= 2
    with pytest.raises(UserError, match="at least one reference"):
        recipe_scores.nearest(query, train[:0])


def test_fid_and_kid_are_the_metrics_modules_with_every_image_in_a_subset():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(40, 8)), rng.normal(0.5, 1.0, size=(30, 8))
    got = recipe_scores.fid_and_kid(a, b, seed=3)
    kid, kid_std = metrics.kernel_inception_distance(a, b, fid.KID_SUBSETS, 30, 3)
    assert got["kid_subset"] == 30 and got["kid"] == kid and got["kid_std"] == kid_std
    assert got["fid"] == pytest.approx(metrics.frechet_distance(metrics.stats(a), metrics.stats(b)))
    assert got["fid"] > 1.0 and got["kid"] > 0.0


def test_pick_guidance_takes_the_best_and_the_smallest_on_ties():
    assert recipe_scores.pick_guidance({1.0: 0.2, 2.0: 0.5, 3.0: 0.5, 5.0: 0.4}) == 2.0
    assert recipe_scores.pick_guidance({1.0: 0.6, 3.0: 0.5}) == 1.0
