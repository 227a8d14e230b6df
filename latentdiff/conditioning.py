"""Concat conditioning of the paper's inpainting and super-resolution LDMs (Rombach et al. 2022, §4.4, §4.5).

The condition is an image-shaped tensor [B, h, w, k] at the latent resolution, concatenated to z_t on the channel
axis before the UNet (unet.in_channels = latent channels + k); it is never dropped (guidance acts on τ_θ(y) only).

  inpaint  k = c + 1: [scale_factor · E_mode(x ⊙ (1 − m)), m↓]. m [B, H, W, 1] is 1 where the model generates
           (fills) and 0 where the input is kept; x ⊙ (1 − m) sets the hole to 0 (grey in [-1, 1]) as the CompVis
           inpainting script does. m↓ is the mask brought to the latent grid by an *area average* (the fraction of
           each latent cell's pixels that are to be filled, in [0, 1]; no threshold): the original resizes a binary
           mask with nearest-neighbour interpolation, which drops thin strokes between sample points.
  sr       k = 3: the low-resolution image in [-1, 1] itself (the original concatenates the LR pixels, unscaled),
           bicubic-resized to the latent grid only when its size differs (for ×4 SR with an f = 4 first stage the
           sizes already agree).

Training inputs: `low_res_from_image` (antialiased bicubic ↓factor, as SR3 and the paper's bicubic SR benchmark) and
`random_masks` (rectangles and thick strokes, documented there). Everything here is pure and jittable.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from latentdiff.errors import UserError
from latentdiff.first_stage import FirstStage

CONCAT_KINDS = ("none", "inpaint", "sr")

MAX_STROKES = 4
RECT_SIDE = (0.15, 0.75)  # rectangle sides: uniform fraction of the image side
STROKE_RADIUS = (0.04, 0.12)  # stroke half-width: uniform fraction of min(H, W)


def check_kind(kind: str) -> str:
    if kind not in CONCAT_KINDS:
        raise UserError(f"conditioning.concat must be one of {CONCAT_KINDS}, got {kind!r}")
    return kind


def concat_channels(kind: str, latent_channels: int) -> int:
    """Channels the concat condition adds to the UNet input: none 0, inpaint latent_channels + 1, sr 3."""
    check_kind(kind)
    return {"none": 0, "inpaint": latent_channels + 1, "sr": 3}[kind]


def concat_kind(config: ml_collections.ConfigDict) -> str:
    """config.conditioning.concat of a stage-2 config; 'none' for configs saved (config.json of a workdir) before
    concat conditioning existed, which were all trained without it."""
    if "conditioning" not in config:
        return "none"
    return check_kind(config.conditioning.concat)


def make_concat(
    kind: str,
    *,
    first_stage: FirstStage,
    first_stage_variables: dict,
    scale_factor: jax.Array | float,
    latent_hw: tuple[int, int],
    image: jax.Array | None = None,
    mask: jax.Array | None = None,
    low_res: jax.Array | None = None,
) -> jax.Array:
    """The concat condition [B, h, w, k] (float32, no gradient) for `kind` (see the module docstring).

    inpaint: image [B, H, W, 3] in [-1, 1], mask [B, H, W, 1] (1 = fill). sr: low_res [B, h_lr, w_lr, 3] in [-1, 1].
    first_stage / first_stage_variables: the frozen first stage (used by inpaint); scale_factor: the latent scale factor
    of stage 2.
    """
    h, w = latent_hw
    if kind == "inpaint":
        if image is None or mask is None:
            raise UserError("concat 'inpaint' needs image [B,H,W,3] and mask [B,H,W,1]")
        if mask.ndim != 4 or mask.shape[-1] != 1 or mask.shape[:3] != image.shape[:3]:
            raise UserError(f"inpaint mask must be [B,H,W,1] matching image {image.shape}, got {mask.shape}")
        mask = mask.astype(jnp.float32)
        masked = image.astype(jnp.float32) * (1.0 - mask)
        z = first_stage.encode(first_stage_variables, masked, None, False) * scale_factor
        if z.shape[1:3] != (h, w):
            raise UserError(f"the first stage maps {image.shape[1:3]} to {z.shape[1:3]}, not latent_hw {(h, w)}")
        return jax.lax.stop_gradient(jnp.concatenate([z, area_downsample(mask, (h, w))], axis=-1))
    if kind == "sr":
        if low_res is None:
            raise UserError("concat 'sr' needs low_res [B,h_lr,w_lr,3]")
        if low_res.ndim != 4 or low_res.shape[-1] != 3:
            raise UserError(f"low_res must be [B, h, w, 3], got {low_res.shape}")
        low_res = low_res.astype(jnp.float32)
        if low_res.shape[1:3] != (h, w):
            low_res = jax.image.resize(low_res, (low_res.shape[0], h, w, 3), "cubic")
        return jax.lax.stop_gradient(low_res)
    if kind == "none":
        raise UserError("conditioning.concat='none' has no concat input; do not call make_concat")
    raise UserError(f"conditioning.concat must be one of {CONCAT_KINDS}, got {kind!r}")


def area_downsample(mask: jax.Array, hw: tuple[int, int]) -> jax.Array:
    """[B, H, W, C] -> [B, h, w, C]: mean over each (H/h × W/w) block when the sizes divide, else an antialiased
    linear resize (a triangle-filter approximation of the area average)."""
    b, hh, ww, c = mask.shape
    h, w = hw
    if hh % h == 0 and ww % w == 0:
        return mask.reshape(b, h, hh // h, w, ww // w, c).mean(axis=(2, 4))
    return jnp.clip(jax.image.resize(mask, (b, h, w, c), "linear", antialias=True), 0.0, 1.0)


def low_res_from_image(image: jax.Array, factor: int) -> jax.Array:
    """The SR training input: antialiased bicubic ↓factor. image [B, H, W, 3] in [-1, 1] -> [B, H/f, W/f, 3],
    clipped to [-1, 1] (as a saved low-resolution image would be). H and W must be divisible by `factor`."""
    b, hh, ww, c = image.shape
    if factor < 1 or hh % factor or ww % factor:
        raise UserError(f"image size {hh}x{ww} must be divisible by the SR factor {factor} (>= 1)")
    out = jax.image.resize(image.astype(jnp.float32), (b, hh // factor, ww // factor, c), "cubic", antialias=True)
    return jnp.clip(out, -1.0, 1.0)


def random_masks(rng: jax.Array, batch: int, height: int, width: int) -> jax.Array:
    """Training masks [B, H, W, 1] float32 in {0, 1} (1 = fill), deterministic given rng.

    Per example, with probability 1/2 each:
      * a rectangle with sides uniform in RECT_SIDE (15–75 %) of the image sides, placed uniformly inside the image
        (2–56 % of the area, small to large holes), or
      * 1–MAX_STROKES thick strokes (uniform count): capsules (segments with round caps) between two uniform points
        of the image, half-width uniform in STROKE_RADIUS (4–12 %) of min(H, W).
    """
    keys = jax.random.split(rng, batch)
    return jax.vmap(lambda k: _one_mask(k, height, width))(keys)[..., None]


def _one_mask(rng: jax.Array, height: int, width: int) -> jax.Array:
    k_kind, k_rect, k_n, k_pts, k_rad = jax.random.split(rng, 5)
    ys = (jnp.arange(height, dtype=jnp.float32) + 0.5) / height
    xs = (jnp.arange(width, dtype=jnp.float32) + 0.5) / width
    yy, xx = jnp.meshgrid(ys, xs, indexing="ij")  # pixel centres in [0, 1]

    u = jax.random.uniform(k_rect, (4,))
    rh = RECT_SIDE[0] + (RECT_SIDE[1] - RECT_SIDE[0]) * u[0]
    rw = RECT_SIDE[0] + (RECT_SIDE[1] - RECT_SIDE[0]) * u[1]
    top, left = (1.0 - rh) * u[2], (1.0 - rw) * u[3]
    rect = (yy >= top) & (yy < top + rh) & (xx >= left) & (xx < left + rw)

    n = jax.random.randint(k_n, (), 1, MAX_STROKES + 1)
    pts = jax.random.uniform(k_pts, (MAX_STROKES, 2, 2))  # [stroke, endpoint, (y, x)]
    radius = STROKE_RADIUS[0] + (STROKE_RADIUS[1] - STROKE_RADIUS[0]) * jax.random.uniform(k_rad, (MAX_STROKES,))
    scale = jnp.asarray([height, width], jnp.float32) / min(height, width)  # distances in units of min(H, W)
    p = jnp.stack([yy, xx], axis=-1) * scale  # [H, W, 2]
    a, b = pts[:, 0] * scale, pts[:, 1] * scale  # [S, 2]
    ab = b - a
    ap = p[None] - a[:, None, None]  # [S, H, W, 2]
    s = jnp.clip(jnp.sum(ap * ab[:, None, None], -1) / jnp.maximum(jnp.sum(ab * ab, -1), 1e-12)[:, None, None], 0, 1)
    dist = jnp.linalg.norm(ap - s[..., None] * ab[:, None, None], axis=-1)  # [S, H, W]
    active = (jnp.arange(MAX_STROKES) < n)[:, None, None]
    strokes = jnp.any((dist <= radius[:, None, None]) & active, axis=0)

    use_rect = jax.random.bernoulli(k_kind, 0.5)
    return jnp.where(use_rect, rect, strokes).astype(jnp.float32)
