"""Image files: grids with captions, reconstruction pairs, atomic PNG writes with text chunks (uint8 NHWC in)."""

from __future__ import annotations

import io
import os
import textwrap
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin


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
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(buffer.getvalue())
    os.replace(tmp, path)


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
