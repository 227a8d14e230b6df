"""FID statistics, Fréchet distance, Inception Score and PSNR.

FID in two halves (edm style): `stats(features) -> (mu, sigma)` and `frechet_distance(stats_a, stats_b)`; features
come from `inception_features` (the FID Inception-v3 of latentdiff.nn.inception, weights from
latentdiff.convert.inception_weights). Maths only: the statistics files and image sets are read and written by
latentdiff.evaluation.references.

Preprocessing modes (uint8 images [N, H, W, 3] -> float32 [N, 299, 299, 3] in the network's range):
  'paper'        torch-fidelity, the protocol of the LDM paper's tables: uint8 -> float, TF1.x-compatible bilinear
                 resize to 299 (TF1 `resize_bilinear(align_corners=False)`: src = dst * in/out, no half-pixel offset,
                 as torch_fidelity.interpolate_compat_tensorflow.interpolate_bilinear_2d_like_tensorflow1x), then
                 (x − 128) / 128.
  'pytorch_fid'  pytorch-fid: x / 255, torch bilinear resize to 299 (F.interpolate(mode='bilinear',
                 align_corners=False): half-pixel centres, no antialiasing), then 2x − 1.
  'clean'        clean-fid (Parmar et al. 2022): per-channel float PIL bicubic resize to 299 (antialiased, a = −0.5,
                 i.e. Image.resize(BICUBIC) on mode 'F'), clip to [0, 255], then (x − 128) / 128.
All three are written in jnp and run on the device inside the jitted feature function. Images already 299 x 299
pass every resize unchanged.
"""

from __future__ import annotations

import collections
import functools
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from latentdiff.errors import UserError
from latentdiff.nn.inception import INPUT_SIZE, InceptionV3

PREPROCESS_MODES = ("paper", "pytorch_fid", "clean")
Stats = tuple[np.ndarray, np.ndarray]

# ----------------------------------------------------------------------------------------------------------------
# Resizes (NHWC, float32)


def tf1_bilinear_coords(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """TF1 bilinear (align_corners=False) source indices: (lo [out], hi [out], frac [out] float32).

    src = dst * (in / out) computed in float32 as torch-fidelity does, lo = floor(src), hi = min(lo + 1, in − 1).
    """
    src = np.arange(out_size, dtype=np.float32) * np.float32(in_size / out_size)
    lo = src.astype(np.int64)
    hi = np.minimum(lo + 1, in_size - 1)
    return lo, hi, (src - lo.astype(np.float32)).astype(np.float32)


def torch_bilinear_coords(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """torch bilinear (align_corners=False) source indices: src = max((dst + 0.5) * in/out − 0.5, 0), in float32."""
    scale = np.float32(in_size / out_size)
    src = np.maximum((np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5), 0)
    lo = src.astype(np.int64)
    hi = np.minimum(lo + 1, in_size - 1)
    return lo, hi, (src - lo.astype(np.float32)).astype(np.float32)


def resize_bilinear_tf1(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """TF1.x-compatible bilinear resize [N, H, W, C] -> [N, h, w, C] (lerp along W first, then along H)."""
    ylo, yhi, dy = tf1_bilinear_coords(x.shape[1], size[0])
    xlo, xhi, dx = tf1_bilinear_coords(x.shape[2], size[1])
    x = x.astype(jnp.float32)

    def along_w(rows: jax.Array) -> jax.Array:
        a, b = rows[:, :, xlo], rows[:, :, xhi]
        return a + (b - a) * dx[None, None, :, None]

    top, bottom = along_w(x[:, ylo]), along_w(x[:, yhi])
    return top + (bottom - top) * dy[None, :, None, None]


def resize_bilinear_torch(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """torch F.interpolate(mode='bilinear', align_corners=False, antialias=False): [N, H, W, C] -> [N, h, w, C]."""
    ylo, yhi, dy = torch_bilinear_coords(x.shape[1], size[0])
    xlo, xhi, dx = torch_bilinear_coords(x.shape[2], size[1])
    x = x.astype(jnp.float32)
    wx1 = dx[None, None, :, None]
    wy1 = dy[None, :, None, None]

    def along_w(rows: jax.Array) -> jax.Array:
        return (1 - wx1) * rows[:, :, xlo] + wx1 * rows[:, :, xhi]

    return (1 - wy1) * along_w(x[:, ylo]) + wy1 * along_w(x[:, yhi])


def _pil_bicubic_filter(t: np.ndarray) -> np.ndarray:
    """PIL's cubic kernel with a = −0.5 (support 2)."""
    a = -0.5
    t = np.abs(t)
    near = ((a + 2.0) * t - (a + 3.0)) * t * t + 1.0
    far = (((t - 5.0) * t + 8.0) * t - 4.0) * a
    return np.where(t < 1.0, near, np.where(t < 2.0, far, 0.0))


def pil_bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] float64 resampling matrix of PIL's Image.resize(BICUBIC) (Resample.c precompute_coeffs).

    scale = in/out, filterscale = max(scale, 1) (antialiasing when downsampling), support = 2 * filterscale;
    output pixel i has centre (i + 0.5) * scale, taps j in [int(centre − support + 0.5), int(centre + support + 0.5))
    clipped to the image, weights filter((j − centre + 0.5) / filterscale) normalised to sum 1.
    """
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    m = np.zeros((out_size, in_size), np.float64)
    for i in range(out_size):
        center = (i + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        j = np.arange(lo, hi)
        w = _pil_bicubic_filter((j - center + 0.5) / filterscale)
        total = w.sum()
        m[i, lo:hi] = w / total if total != 0.0 else w
    return m


def resize_bicubic_pil(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """PIL bicubic resize of float images, horizontal pass then vertical as PIL does: [N, H, W, C] -> [N, h, w, C]."""
    x = x.astype(jnp.float32)
    hp = jax.lax.Precision.HIGHEST
    if x.shape[2] != size[1]:
        mw = jnp.asarray(pil_bicubic_matrix(x.shape[2], size[1]), jnp.float32)
        x = jnp.einsum("ow,nhwc->nhoc", mw, x, precision=hp)
    if x.shape[1] != size[0]:
        mh = jnp.asarray(pil_bicubic_matrix(x.shape[1], size[0]), jnp.float32)
        x = jnp.einsum("oh,nhwc->nowc", mh, x, precision=hp)
    return x


def preprocess_images(images: jax.Array, mode: str, size: int = INPUT_SIZE) -> jax.Array:
    """uint8 (or 0..255 float) images [N, H, W, 3] -> float32 [N, size, size, 3] in the Inception's input range.

    `mode` is one of PREPROCESS_MODES (see the module docstring).
    """
    x = images.astype(jnp.float32)
    if mode == "paper":
        return (resize_bilinear_tf1(x, (size, size)) - 128.0) / 128.0
    if mode == "pytorch_fid":
        return 2.0 * resize_bilinear_torch(x / 255.0, (size, size)) - 1.0
    if mode == "clean":
        return (jnp.clip(resize_bicubic_pil(x, (size, size)), 0.0, 255.0) - 128.0) / 128.0
    raise UserError(f"unknown preprocess mode {mode!r}; expected one of {PREPROCESS_MODES}")


# ----------------------------------------------------------------------------------------------------------------
# Features


def _check_params(params: Mapping) -> int | None:
    """num_classes for params: 1008 if they carry the fc layer, else None."""
    if not isinstance(params, Mapping) or "Conv2d_1a_3x3" not in params:
        raise UserError(
            "inception params must be the pytree from latentdiff.convert.inception_weights.load_inception_params"
        )
    return int(params["fc"]["kernel"].shape[1]) if "fc" in params else None


@functools.lru_cache(maxsize=16)
def _feature_fn(num_classes: int | None, dtype: Any, precision: Any, preprocess: str, mesh: Mesh | None):
    """jitted (params, uint8 images [B, H, W, 3]) -> (pool [B, 2048], logits_unbiased [B, 1008] or None)."""
    model = InceptionV3(num_classes=num_classes, dtype=dtype, precision=precision)

    def features(params, images):
        out = model.apply({"params": params}, preprocess_images(images, preprocess))
        return out["pool"], out.get("logits_unbiased")

    if mesh is None:
        return jax.jit(features)
    return jax.jit(
        features,
        in_shardings=(NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))),
        out_shardings=NamedSharding(mesh, P("data")),
    )


def inception_features(
    params: Mapping,
    images: np.ndarray,
    batch_size: int,
    preprocess: str,
    *,
    mesh: Mesh | None = None,
    dtype: Any = jnp.float32,
    precision: Any = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """uint8 images [N, H, W, 3] -> (pool features [N, 2048] float32, unbiased logits [N, 1008] or None).

    The logits are `pool @ fc.kernel` *without* the fc bias, the layer torch-fidelity's Inception Score uses
    (its 'logits_unbiased'); None when the params have no fc (e.g. fid-helper weights). Batches have a fixed shape
    [batch_size, H, W, 3] (one compile); the last one is zero-padded and its pad rows dropped. With `mesh`, each
    batch is placed on NamedSharding(mesh, P('data')) and params are replicated (batch_size must be divisible by
    the 'data' axis size; single-process meshes only).
    """
    num_classes = _check_params(params)
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise UserError(f"expected uint8 images [N, H, W, 3]; got {images.dtype} {images.shape}")
    if preprocess not in PREPROCESS_MODES:
        raise UserError(f"unknown preprocess mode {preprocess!r}; expected one of {PREPROCESS_MODES}")
    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1; got {batch_size}")
    put = jnp.asarray
    if mesh is not None:
        if "data" not in mesh.axis_names:
            raise UserError(f"mesh needs a 'data' axis; got axes {mesh.axis_names}")
        if batch_size % mesh.shape["data"]:
            raise UserError(f"batch_size {batch_size} is not divisible by the mesh 'data' size {mesh.shape['data']}")
        if any(d.process_index != jax.process_index() for d in mesh.devices.flat):
            raise UserError("inception_features supports single-process meshes only")
        data_sharding = NamedSharding(mesh, P("data"))
        params = jax.device_put(params, NamedSharding(mesh, P()))
        put = lambda a: jax.device_put(a, data_sharding)
    fn = _feature_fn(num_classes, dtype, precision, preprocess, mesh)
    n = images.shape[0]
    pools, logits = [], []
    pending: collections.deque = collections.deque()

    def fetch() -> None:
        (pool, logit), keep = pending.popleft()
        pools.append(np.asarray(pool)[:keep])
        if logit is not None:
            logits.append(np.asarray(logit)[:keep])

    for start in range(0, n, batch_size):
        batch = images[start : start + batch_size]
        keep = batch.shape[0]
        if keep < batch_size:
            batch = np.concatenate([batch, np.zeros((batch_size - keep, *batch.shape[1:]), np.uint8)])
        pending.append((fn(params, put(batch)), keep))  # dispatch is async: fetch one batch behind
        if len(pending) > 1:
            fetch()
    while pending:
        fetch()
    pool = np.concatenate(pools) if pools else np.zeros((0, 2048), np.float32)
    return pool, (np.concatenate(logits) if num_classes is not None and logits else None)


def inception_features_of_groups(
    params: Mapping,
    groups: Sequence[np.ndarray],
    batch_size: int,
    preprocess: str,
    *,
    mesh: Mesh | None = None,
    dtype: Any = jnp.float32,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Like `inception_features` for a list of uint8 arrays [n_i, H_i, W_i, 3] of different sizes (one compile per
    size); features are concatenated in list order."""
    outs = [inception_features(params, g, batch_size, preprocess, mesh=mesh, dtype=dtype) for g in groups if len(g)]
    if not outs:
        raise UserError("no images to compute features of")
    pool = np.concatenate([o[0] for o in outs])
    logits = None if outs[0][1] is None else np.concatenate([o[1] for o in outs])
    return pool, logits


# ----------------------------------------------------------------------------------------------------------------
# Statistics and distances


def stats(features: np.ndarray) -> Stats:
    """features [N, D] -> (mu [D], sigma [D, D]) in float64; sigma is the unbiased covariance (np.cov)."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2:
        raise UserError(f"stats expects features [N, D]; got shape {features.shape}")
    if features.shape[0] < 2:
        raise UserError(f"FID statistics need at least 2 images; got {features.shape[0]}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def check_stats(s: Stats, name: str) -> Stats:
    mu, sigma = np.asarray(s[0], np.float64), np.asarray(s[1], np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise UserError(f"{name}: expected mu [D] and sigma [D, D]; got {mu.shape} and {sigma.shape}")
    if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(sigma))):
        raise UserError(f"{name}: mu / sigma contain NaN or inf")
    return mu, sigma


def _psd_sqrt(sigma: np.ndarray, name: str) -> np.ndarray:
    """Symmetric square root of a covariance (eigh; round-off negative eigenvalues clipped to 0)."""
    w, v = np.linalg.eigh((sigma + sigma.T) / 2)
    if w[0] < -1e-6 * max(1.0, w[-1]):
        raise UserError(f"{name} is not positive semi-definite (smallest eigenvalue {w[0]:.3g})")
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def _sqrt_factor(sigma: np.ndarray) -> np.ndarray | None:
    """The Cholesky factor R (R Rᵀ = Σ) when Σ is positive definite, else None."""
    try:
        return np.linalg.cholesky((sigma + sigma.T) / 2)
    except np.linalg.LinAlgError:  # singular (e.g. fewer images than dimensions) or not a covariance
        return None


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """Tr((Σ1 Σ2)^½) = Σ √λ_i with λ_i the eigenvalues of the symmetric PSD matrix Rᵀ Σ2 R, R Rᵀ = Σ1.

    Rᵀ Σ2 R and Σ1 Σ2 = R (Rᵀ Σ2 R) R⁻¹ share their eigenvalues. R is the Cholesky factor of Σ1, or of Σ2 with the
    roles swapped (Σ1Σ2 and Σ2Σ1 have the same eigenvalues), or, when both are singular, the symmetric root Σ1^½.
    Returns nan if the eigen-solver fails; raises ValueError when an eigenvalue is clearly negative (the analogue of
    pytorch-fid's 'imaginary component' error).
    """
    try:
        r, other = _sqrt_factor(sigma1), sigma2
        if r is None:
            r, other = _sqrt_factor(sigma2), sigma1
        if r is None:
            r, other = _psd_sqrt(sigma1, "sigma1"), sigma2
        m = r.T @ other @ r
        w = np.linalg.eigvalsh((m + m.T) / 2)
    except np.linalg.LinAlgError:
        return math.nan
    if not np.all(np.isfinite(w)):
        return math.nan
    if w[0] < -1e-6 * max(1.0, w[-1]):
        raise UserError(f"Σ1Σ2 has a negative eigenvalue {w[0]:.3g}: (Σ1Σ2)^½ would be complex; is it a covariance?")
    return float(np.sqrt(np.clip(w, 0.0, None)).sum())


def frechet_distance(stats1: Stats, stats2: Stats, eps: float = 1e-6) -> float:
    """‖μ1 − μ2‖² + Tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½), in float64, without scipy.

    If the eigen-decomposition fails, retries with eps·I added to both covariances (as pytorch-fid does when
    sqrtm is singular), with a warning.
    """
    mu1, s1 = check_stats(stats1, "stats1")
    mu2, s2 = check_stats(stats2, "stats2")
    if mu1.shape != mu2.shape:
        raise UserError(f"stats have different dimensions: {mu1.shape[0]} vs {mu2.shape[0]}")
    diff = mu1 - mu2
    tr_covmean = trace_sqrt_product(s1, s2)
    if not math.isfinite(tr_covmean):
        warnings.warn(f"FID: singular product of covariances; adding {eps} to their diagonals", stacklevel=2)
        offset = np.eye(s1.shape[0]) * eps
        tr_covmean = trace_sqrt_product(s1 + offset, s2 + offset)
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def frechet_distance_lowrank(features1: np.ndarray, stats2: Stats) -> float:
    """frechet_distance(stats(features1), stats2), exact and fast for few images (N1 ≤ D, a singular Σ1).

    With X the centred features1 [N1, D], Σ1 = XᵀX/(N1−1), and Σ1Σ2 shares its nonzero eigenvalues with the
    N1 × N1 symmetric PSD matrix X Σ2 Xᵀ/(N1−1), so Tr((Σ1Σ2)^½) = Σ √eig(X Σ2 Xᵀ/(N1−1)): O(N1·D²) instead of
    the O(D³) eigen-decompositions of the covariance route (~10 s at D = 2048 on a 2-core CPU).
    """
    f = np.asarray(features1, np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise UserError(f"features1 must be [N, D] with N >= 2; got shape {f.shape}")
    mu2, s2 = check_stats(stats2, "stats2")
    if mu2.shape[0] != f.shape[1]:
        raise UserError(f"stats have different dimensions: {f.shape[1]} vs {mu2.shape[0]}")
    n = f.shape[0]
    mu1 = f.mean(axis=0)
    x = f - mu1
    m = (x @ s2) @ x.T / (n - 1)
    w = np.linalg.eigvalsh((m + m.T) / 2)
    if w[0] < -1e-6 * max(1.0, w[-1]):
        raise UserError(f"X Σ2 Xᵀ has a negative eigenvalue {w[0]:.3g}: is stats2's sigma a covariance?")
    diff = mu1 - mu2
    tr1 = float(np.sum(x * x)) / (n - 1)
    return float(diff @ diff + tr1 + np.trace(s2) - 2.0 * np.sqrt(np.clip(w, 0.0, None)).sum())


def inception_score(logits: np.ndarray, splits: int = 10, shuffle_seed: int | None = 2020) -> tuple[float, float]:
    """Inception Score (mean, std over splits) as torch-fidelity computes it.

    logits [N, C]: torch-fidelity feeds its 'logits_unbiased' (the fc layer without its bias; what
    `inception_features` returns). Rows are shuffled by np.random.RandomState(shuffle_seed).permutation(N) (None:
    no shuffle), split into chunks [i·N//splits, (i+1)·N//splits), and each split scores
    exp(mean_n KL(p_n ‖ mean_m p_m)) in float64; the std is the population std (np.std).
    """
    logits = np.asarray(logits, np.float64)
    if logits.ndim != 2:
        raise UserError(f"inception_score expects logits [N, C]; got shape {logits.shape}")
    n = logits.shape[0]
    if splits < 1 or n < splits:
        raise UserError(f"inception_score needs at least `splits` ({splits}) images; got {n}")
    if shuffle_seed is not None:
        logits = logits[np.random.RandomState(shuffle_seed).permutation(n)]
    log_p = logits - logits.max(axis=1, keepdims=True)
    log_p = log_p - np.log(np.exp(log_p).sum(axis=1, keepdims=True))
    p = np.exp(log_p)
    scores = []
    for i in range(splits):
        lo, hi = i * n // splits, (i + 1) * n // splits
        q = p[lo:hi].mean(axis=0, keepdims=True)
        kl = (p[lo:hi] * (log_p[lo:hi] - np.log(q))).sum(axis=1).mean()
        scores.append(math.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))


def polynomial_mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD² of feature sets x, y [m, D] (the same m) under KID's kernel k(a, b) = (a·b / D + 1)³: the
    within-set means leave out the diagonal (pairs i ≠ j), the cross-set mean takes every pair."""
    m, dim = x.shape
    k_xx = (x @ x.T / dim + 1.0) ** 3
    k_yy = (y @ y.T / dim + 1.0) ** 3
    k_xy = (x @ y.T / dim + 1.0) ** 3
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2.0 * k_xy.mean())


def kernel_inception_distance(
    features1: np.ndarray, features2: np.ndarray, subsets: int, subset_size: int, seed: int
) -> tuple[float, float]:
    """KID (Bińkowski et al. 2018) of two feature sets [N1, D], [N2, D] -> (mean, std) over `subsets` draws.

    Each draw takes subset_size rows of each set without replacement (np.random.RandomState(seed), set 1 then set 2,
    as torch-fidelity draws them) and scores polynomial_mmd2_unbiased in float64; the std is np.std of the draws.
    Unlike FID it has an unbiased estimator, so it compares sets of a few hundred images fairly.
    """
    f1, f2 = np.asarray(features1, np.float64), np.asarray(features2, np.float64)
    if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1]:
        raise UserError(f"KID needs features [N, D] of one D; got shapes {f1.shape} and {f2.shape}")
    if subsets < 1 or not 2 <= subset_size <= min(f1.shape[0], f2.shape[0]):
        raise UserError(
            f"KID subset_size {subset_size} must be in [2, {min(f1.shape[0], f2.shape[0])}] (the smaller set) and "
            f"subsets {subsets} >= 1; lower the subset size or add images"
        )
    rng = np.random.RandomState(seed)
    scores = []
    for _ in range(subsets):
        x = f1[rng.choice(f1.shape[0], subset_size, replace=False)]
        y = f2[rng.choice(f2.shape[0], subset_size, replace=False)]
        scores.append(polynomial_mmd2_unbiased(x, y))
    return float(np.mean(scores)), float(np.std(scores))


def psnr(a: jax.Array, b: jax.Array, data_range: float) -> jax.Array:
    """Per-image PSNR in dB: a, b [N, ...] -> [N] = 10·log10(data_range² / mean((a − b)²)) (inf when equal)."""
    if a.shape != b.shape:
        raise UserError(f"psnr needs equal shapes; got {a.shape} and {b.shape}")
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    mse = jnp.mean((a - b) ** 2, axis=tuple(range(1, a.ndim)))
    return 10.0 * jnp.log10(data_range**2 / mse)
