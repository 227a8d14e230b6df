"""Image files: grids with captions, reconstruction pairs, atomic PNG writes with text chunks (uint8 NHWC in)."""

from __future__ import annotations

import io
import os
import textwrap
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps, PngImagePlugin

from latentdiff import atomic_files
from latentdiff.errors import UserError

# Files an image set (sample.py's output, `latentdiff eval fid`'s folders) is made of.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[-1, 1] float -> uint8 [0, 255] (rounded, clipped)."""
    return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def save_png(image: np.ndarray | Image.Image, path: str, text: Mapping[str, str] | None = None) -> None:
    """Writes a PNG atomically (temporary file + rename), with optional tEXt chunks (prompt, seed, ...)."""
    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, np.uint8))
    info = PngImagePlugin.PngInfo()
    for key, value in (text or {}).items():
        info.add_text(str(key), str(value))
    buffer = io.BytesIO()
    img.save(buffer, format="PNG", pnginfo=info)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_files.write_bytes(path, buffer.getvalue())


def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default()


def grid(
    images: np.ndarray,
    captions: Sequence[str] | None = None,
    *,
    columns: int = 8,
    scale: int = 1,
    caption_lines: int = 3,
    caption_width: int = 0,
) -> Image.Image:
    """images uint8 [N, H, W, 3] -> one picture, `columns` wide, each tile upscaled by `scale` (nearest) and its
    caption (wrapped to `caption_lines` lines) underneath. caption_width 0 picks a width that fits the tile."""
    images = np.asarray(images, np.uint8)
    n, h, w = images.shape[:3]
    columns = max(1, min(columns, n))
    rows = (n + columns - 1) // columns
    tile_w, tile_h = w * scale, h * scale
    line_h = 11
    text_h = (caption_lines * line_h + 4) if captions is not None else 0
    pad = 2
    canvas = Image.new("RGB", (columns * (tile_w + pad) + pad, rows * (tile_h + text_h + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    font = _font()
    chars = caption_width or max(8, tile_w // 6)
    for i in range(n):
        r, c = divmod(i, columns)
        x0, y0 = pad + c * (tile_w + pad), pad + r * (tile_h + text_h + pad)
        tile = Image.fromarray(images[i]).resize((tile_w, tile_h), Image.NEAREST)
        canvas.paste(tile, (x0, y0))
        if captions is not None:
            lines = textwrap.wrap(str(captions[i]), width=chars)[:caption_lines]
            for j, line in enumerate(lines):
                draw.text((x0, y0 + tile_h + 2 + j * line_h), line, fill="black", font=font)
    return canvas


def save_pairs_grid(inputs: np.ndarray, outputs: np.ndarray, path: str, *, columns: int = 4) -> None:
    """Reconstruction grid: each cell is input | output side by side. uint8 [N, H, W, 3] each."""
    pairs = np.concatenate([inputs, outputs], axis=2)
    scale = max(1, 128 // inputs.shape[1])
    save_png(grid(pairs, None, columns=columns, scale=scale), path)


# ----- reading user images (image modification) -----
MASK_HELP = "white (>= 128) = repaint, black = keep"
MASK_CONVERT = "convert it with: python -c \"from PIL import Image; Image.open('M.png').convert('L').save('M.png')\""


def _open(path: str, flag: str) -> Image.Image:
    """PIL image of `path`, loaded; one-line errors naming the flag and the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{flag} {path!r} does not exist")
    try:
        img = Image.open(path)
        img.load()
    except (OSError, Image.DecompressionBombError, ValueError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{flag} {path!r} is not a readable image ({reason}); save it as PNG or JPEG") from None
    return img


# ----- any PIL image -> 8-bit RGB, the one conversion every image reader uses -----
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
DIRECT_MODES = ("1", "L", "P", "RGB", "CMYK", "YCbCr", "RGBX")


def _integer_to_8bit(values: np.ndarray, mode: str) -> np.ndarray:
    """16-bit (or 32-bit holding 16-bit) greyscale -> uint8 by the 65535 -> 255 scale; other ranges are refused."""
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise UserError(f"{mode!r} pixels outside 0..65535 (min {values.min()}, max {values.max()})")
    return np.round(values.astype(np.float64) / 257.0).astype(np.uint8)


def _float_to_8bit(values: np.ndarray) -> np.ndarray:
    """Float greyscale in [0, 1] (scaled by 255) or [0, 255]; anything else (HDR, NaN) is refused."""
    if not np.isfinite(values).all():
        raise UserError("float pixels with NaN or inf")
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if low >= 0 and high <= 1:
        return np.round(values * 255.0).astype(np.uint8)
    if low >= 0 and high <= 255:
        return np.round(values).astype(np.uint8)
    raise UserError(f"float pixels in [{low:g}, {high:g}], expected [0, 1] or [0, 255]")


def to_rgb8(img: Image.Image) -> tuple[np.ndarray, list[str]]:
    """Any PIL image -> (uint8 [H, W, 3], notes on what changed beyond a plain format change).

    EXIF orientation is applied (note 'EXIF-rotated'); 16-bit greyscale is scaled 65535 -> 255 ('16-bit'); float
    greyscale in [0, 1] or [0, 255] is scaled ('float'); transparency is composited onto white ('transparent'; fully
    opaque alpha is just dropped); palette, 1-bit, greyscale and CMYK become RGB. Other modes (LAB, HSV, multi-band
    floats) raise UserError: never a silent reinterpretation of the pixel values.
    """
    notes = []
    orientation = img.getexif().get(0x0112, 1)
    if orientation not in (1, None):
        img = ImageOps.exif_transpose(img)
        notes.append("EXIF-rotated")
    mode = img.mode
    if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        notes.append("16-bit")
        grey = _integer_to_8bit(np.asarray(img), mode)
        return np.repeat(grey[..., None], 3, axis=-1), notes
    if mode == "F":
        notes.append("float")
        return np.repeat(_float_to_8bit(np.asarray(img, np.float64))[..., None], 3, axis=-1), notes
    if mode == "P" and "transparency" in img.info:
        img, mode = img.convert("RGBA"), "RGBA"
    if mode in ALPHA_MODES:
        rgba = img.convert("RGBA")
        alpha = np.asarray(rgba)[..., 3]
        if (alpha == 255).all():
            return np.asarray(rgba.convert("RGB"), np.uint8), notes
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        notes.append("transparent")
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"), np.uint8), notes
    if mode in DIRECT_MODES:
        return np.asarray(img.convert("RGB"), np.uint8), notes
    raise UserError(f"image mode {mode!r} is not supported; save the image as 8-bit RGB (PNG or JPEG)")


def read_image(path: str, flag: str) -> np.ndarray:
    """An image file -> uint8 [H, W, 3] (to_rgb8: EXIF orientation applied, transparency onto white, 16-bit and
    float greyscale scaled)."""
    img = _open(path, flag)
    try:
        return to_rgb8(img)[0]
    except UserError as e:
        raise UserError(f"{flag} {path!r}: {e}") from None


def read_mask(path: str, flag: str) -> np.ndarray:
    """A mask file -> float32 [H, W] in {0, 1}, 1 = repaint: pixels >= 128 (white) are repainted, the rest kept.

    Accepted: single-channel PNGs (mode 'L' or '1'), and RGB / palette / greyscale-with-alpha files whose colour
    channels are identical everywhere (a grey image saved as RGB) and whose alpha, if any, is fully opaque. Anything
    else (colours, transparency, 16-bit) is refused with the conversion command.
    """
    img = _open(path, flag)
    if img.mode == "1":
        return np.asarray(img, bool).astype(np.float32)
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode not in ("L", "LA", "RGB", "RGBA"):
        raise UserError(f"{flag} {path!r} has mode {img.mode!r}; a mask must be 8-bit single-channel; {MASK_CONVERT}")
    a = np.asarray(img, np.uint8)
    if a.ndim == 2:
        grey = a
    else:
        colour = a[..., :3] if img.mode in ("RGB", "RGBA") else a[..., :1]
        if img.mode in ("LA", "RGBA") and (a[..., -1] != 255).any():
            raise UserError(
                f"{flag} {path!r} has transparent pixels; a mask must be opaque ({MASK_HELP}); {MASK_CONVERT}"
            )
        if (colour != colour[..., :1]).any():
            raise UserError(
                f"{flag} {path!r} is a colour image; a mask must be single-channel ({MASK_HELP}); {MASK_CONVERT}"
            )
        grey = colour[..., 0]
    return (grey >= 128).astype(np.float32)


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [h, w, 3], bicubic (PIL; antialiased when shrinking). size = (h, w)."""
    if tuple(image.shape[:2]) == tuple(size):
        return image
    return np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.BICUBIC), np.uint8)


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """float {0, 1} [H, W] -> {0, 1} [h, w]: bilinear (antialiased) resize of the 0/255 picture, then >= 128."""
    if tuple(mask.shape) == tuple(size):
        return mask
    img = Image.fromarray((mask * 255).astype(np.uint8)).resize((size[1], size[0]), Image.BILINEAR)
    return (np.asarray(img) >= 128).astype(np.float32)
