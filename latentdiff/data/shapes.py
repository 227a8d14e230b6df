"""The built-in `shapes` text-image dataset: procedural coloured shapes with captions, and an analytic grader.

Each image shows one (or up to `max_objects`) coloured shape on a plain background; its caption names colour, shape,
position and size of every object (templates vary wording and order, and sometimes name the background):
"a small red circle at the top left", "at the bottom there is a big blue triangle", ...
A caption that names no background has a black one (UNNAMED_BACKGROUND), so every caption determines its image up to
the size and position jitter. (Before dataset version 1.2.0 that background was random: then the best prediction at
high noise is a blur of all backgrounds, whose error swamps the position signal, and models never learned to place
objects; see bench/RESULTS.md, issue 8.)

Geometry (fractions of the image side; the same at every resolution, so the data is gradable at 32 px):
- sizes: small = box side in [0.30, 0.36], large = [0.54, 0.60]. A shape fills a square box of that side: a square
  fills it, a circle is inscribed, a triangle is isosceles with its apex up (base = height = side).
- positions: a 3x3 grid. The box centre is at lo, (lo + hi) / 2 or hi per axis, lo = side/2 + 0.02,
  hi = 1 - lo, plus a jitter of +-0.02. Objects never leave the frame.
- colours: 8 object colours (OBJECT_COLOURS), 3 backgrounds (BACKGROUND_COLOURS); every object colour is far from
  every background colour and, within one image, objects have distinct colours and do not overlap.
- anti-aliasing: each pixel is the coverage-weighted mix of 4x4 (resolution <= 32), 2x2 (<= 64) or 1 sample.

Splits: `train`, `validation` and `novel`. NOVEL_PAIRS, a fixed set of (colour, shape) pairs, never occurs in
train/validation; every object in `novel` is one of those pairs (compositional generalisation).

Grader (`grade`): parses each caption back into attributes and measures them from pixels. Background = nearest named
background colour to the median border pixel; the object mask = pixels far from the background (single object) or
nearest to the named colour (several objects); colour = nearest named object colour to the mask's mean; shape = how
much of its box the object fills, both measured on its anti-aliased coverage rather than thresholded pixels (square
~1, circle ~0.785, triangle ~0.5); size = sqrt(area / fill of that shape);
position = centre of the mask's extent (0.5th..99.5th percentile of its pixel coordinates) on the 3x3 grid. The
extent centre is used rather than the centroid because a triangle's centroid sits h/6 below its box centre.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from latentdiff.errors import UserError

SPLITS: tuple[str, ...] = ("train", "validation", "novel")
_SPLIT_IDS = {"train": 0, "validation": 1, "novel": 2}

OBJECT_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 25, 25),
    "orange": (250, 130, 0),
    "yellow": (240, 225, 20),
    "green": (30, 160, 50),
    "cyan": (30, 200, 210),
    "blue": (30, 60, 220),
    "purple": (130, 30, 200),
    "pink": (245, 120, 190),
}
BACKGROUND_COLOURS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
}
SHAPES: tuple[str, ...] = ("square", "circle", "triangle")
SIZES: tuple[str, ...] = ("small", "large")
# Box side as a fraction of the image side, per size.
SIZE_RANGES: tuple[tuple[float, float], ...] = ((0.30, 0.36), (0.54, 0.60))
# (colour, shape) pairs held out of train/validation; the `novel` split consists of exactly these.
NOVEL_PAIRS: tuple[tuple[str, str], ...] = (
    ("red", "triangle"),
    ("green", "circle"),
    ("blue", "square"),
    ("yellow", "triangle"),
)

_COLOUR_NAMES = tuple(OBJECT_COLOURS)
_BG_NAMES = tuple(BACKGROUND_COLOURS)
_OBJ_RGB = np.array(list(OBJECT_COLOURS.values()), np.float32)
_BG_RGB = np.array(list(BACKGROUND_COLOURS.values()), np.float32)
_MARGIN = 0.02
_JITTER = 0.02
_OBJECT_GAP = 0.06  # min distance between the boxes of two objects in one image
# Fill ratio of each shape inside its box (square, circle, triangle): used to turn mask area into a box side.
_SHAPE_FILL = np.array([1.0, np.pi / 4, 0.5], np.float32)

# Caption vocabulary. Position phrases per (row, col) on the 3x3 grid.
_SIZE_WORDS = (("small", "little", "tiny"), ("large", "big"))
UNNAMED_BACKGROUND = "black"  # the background of every image whose caption names none
_POSITION_PHRASES: dict[tuple[int, int], tuple[str, ...]] = {
    (0, 0): ("at the top left", "in the top left corner", "in the upper left"),
    (0, 1): ("at the top", "at the top centre", "in the upper middle"),
    (0, 2): ("at the top right", "in the top right corner", "in the upper right"),
    (1, 0): ("on the left", "at the left side", "in the middle left"),
    (1, 1): ("in the centre", "in the middle", "at the center"),
    (1, 2): ("on the right", "at the right side", "in the middle right"),
    (2, 0): ("at the bottom left", "in the bottom left corner", "in the lower left"),
    (2, 1): ("at the bottom", "at the bottom centre", "in the lower middle"),
    (2, 2): ("at the bottom right", "in the bottom right corner", "in the lower right"),
}
_SINGLE_TEMPLATES: tuple[str, ...] = (
    "a {size} {colour} {shape} {pos}",
    "a {size} {colour} {shape} {pos} on a {bg} background",
    "{pos} there is a {size} {colour} {shape}",
    "a {colour} {shape} {pos}. it is {size}",
    "a picture of a {size} {colour} {shape} {pos}",
    "a {size} {shape} in {colour} {pos}",
    "{pos}: a {size} {colour} {shape} against a {bg} background",
    "a {size} {colour} {shape} {pos} with a {bg} background",
    "{size} {colour} {shape}, {pos}",
    "an image of a {size} {colour} {shape} {pos}, {bg} background",
)
_OBJECT_TEMPLATES: tuple[str, ...] = ("a {size} {colour} {shape} {pos}", "a {size} {shape} in {colour} {pos}")
_MULTI_TEMPLATES: tuple[str, ...] = ("{objects}", "{objects} on a {bg} background", "an image with {objects}")


@dataclass(frozen=True)
class Layout:
    """Sampled scene parameters for N images with up to K objects each (arrays [N] or [N, K])."""

    present: np.ndarray  # bool [N, K]
    colour: np.ndarray  # int [N, K] index into OBJECT_COLOURS
    shape: np.ndarray  # int [N, K] index into SHAPES
    size: np.ndarray  # int [N, K] index into SIZES
    side: np.ndarray  # float [N, K] box side (fraction of the image side)
    row: np.ndarray  # int [N, K] grid row 0..2 (top..bottom)
    col: np.ndarray  # int [N, K] grid column 0..2 (left..right)
    cx: np.ndarray  # float [N, K] box centre x (fraction)
    cy: np.ndarray  # float [N, K] box centre y (fraction)
    background: np.ndarray  # int [N] index into BACKGROUND_COLOURS
    captions: tuple[str, ...]


def _novel_matrix() -> np.ndarray:
    novel = np.zeros((len(_COLOUR_NAMES), len(SHAPES)), bool)
    for c, s in NOVEL_PAIRS:
        novel[_COLOUR_NAMES.index(c), SHAPES.index(s)] = True
    return novel


_NOVEL = _novel_matrix()  # bool [colours, shapes]
_NOVEL_PAIR_IDS = np.argwhere(_NOVEL)  # [P, 2]
_TRAIN_SHAPE_ORDER = np.argsort(_NOVEL, axis=1, kind="stable")  # per colour: allowed shapes first
_TRAIN_SHAPE_COUNT = (~_NOVEL).sum(axis=1)


def _sample_pairs(rng: np.random.Generator, split: str, n: int) -> np.ndarray:
    """(colour, shape) index pairs for `split`: int [n, 2].

    train/validation: colour uniform over all colours, then shape uniform over the shapes that colour may take
    outside NOVEL_PAIRS (so colours stay balanced). novel: uniform over NOVEL_PAIRS.
    """
    if split == "novel":
        return _NOVEL_PAIR_IDS[rng.integers(len(_NOVEL_PAIR_IDS), size=n)]
    colour = rng.integers(len(_COLOUR_NAMES), size=n)
    pick = np.floor(rng.random(n) * _TRAIN_SHAPE_COUNT[colour]).astype(np.int64)
    return np.stack([colour, _TRAIN_SHAPE_ORDER[colour, pick]], axis=1)


def _check_split(split: str) -> None:
    if split not in _SPLIT_IDS:
        raise UserError(f"unknown shapes split {split!r}; available: {', '.join(SPLITS)}")


def _box_centre(side: np.ndarray, cell: np.ndarray, jitter: np.ndarray) -> np.ndarray:
    lo = side / 2 + _MARGIN
    return lo + cell / 2 * (1 - 2 * lo) + jitter


def _boxes_overlap(a: tuple[float, float, float], b: tuple[float, float, float]) -> bool:
    (ax, ay, aside), (bx, by, bside) = a, b
    gap = (aside + bside) / 2 + _OBJECT_GAP
    return abs(ax - bx) < gap and abs(ay - by) < gap


def _add_objects(rng: np.random.Generator, layout: dict[str, np.ndarray], split: str, n_obj: np.ndarray) -> None:
    """Places objects 1..K-1 per image (in place): distinct colours, no overlap; an object is dropped after 50 tries."""
    for i in np.nonzero(n_obj > 1)[0]:
        for k in range(1, int(n_obj[i])):
            for _ in range(50):
                colour, shape = _sample_pairs(rng, split, 1)[0]
                size = rng.integers(2)
                side = rng.uniform(*SIZE_RANGES[size])
                row, col = rng.integers(3, size=2)
                cx = _box_centre(side, col, rng.uniform(-_JITTER, _JITTER))
                cy = _box_centre(side, row, rng.uniform(-_JITTER, _JITTER))
                taken = [
                    (layout["cx"][i, j], layout["cy"][i, j], layout["side"][i, j])
                    for j in range(k)
                    if layout["present"][i, j]
                ]
                used_colours = layout["colour"][i, :k][layout["present"][i, :k]]
                if colour in used_colours or any(_boxes_overlap((cx, cy, side), t) for t in taken):
                    continue
                for key, value in dict(
                    present=True, colour=colour, shape=shape, size=size, side=side, row=row, col=col, cx=cx, cy=cy
                ).items():
                    layout[key][i, k] = value
                break


def _object_phrase(rng: np.random.Generator, template: str, colour: int, shape: int, size: int, row: int, col: int):
    sizes = _SIZE_WORDS[size]
    positions = _POSITION_PHRASES[(row, col)]
    return template.format(
        size=sizes[rng.integers(len(sizes))],
        colour=_COLOUR_NAMES[colour],
        shape=SHAPES[shape],
        pos=positions[rng.integers(len(positions))],
        bg="{bg}",
    )


def _fix_articles(text: str) -> str:
    return re.sub(r"\ba ([aeiou])", r"an \1", text)


def _captions(rng: np.random.Generator, lay: dict[str, np.ndarray]) -> tuple[tuple[str, ...], np.ndarray]:
    """(captions, names_background bool [N]) for the sampled layout."""
    out, names_bg = [], []
    for i in range(len(lay["background"])):
        bg = _BG_NAMES[lay["background"][i]]
        objs = [k for k in range(lay["present"].shape[1]) if lay["present"][i, k]]
        attrs = [
            (lay["colour"][i, k], lay["shape"][i, k], lay["size"][i, k], lay["row"][i, k], lay["col"][i, k])
            for k in objs
        ]
        if len(objs) == 1:
            template = _SINGLE_TEMPLATES[rng.integers(len(_SINGLE_TEMPLATES))]
            text = _object_phrase(rng, template, *attrs[0]).format(bg=bg)
        else:
            phrases = [_object_phrase(rng, _OBJECT_TEMPLATES[rng.integers(2)], *a) for a in attrs]
            objects = ", ".join(phrases[:-1]) + " and " + phrases[-1]
            template = _MULTI_TEMPLATES[rng.integers(len(_MULTI_TEMPLATES))]
            text = template.format(objects=objects, bg=bg)
        out.append(_fix_articles(text))
        names_bg.append("{bg}" in template)
    return tuple(out), np.array(names_bg, bool)


def sample_layout(n: int, split: str, seed: int, max_objects: int) -> Layout:
    """Samples scene parameters and captions for `n` images, deterministically from (seed, split)."""
    _check_split(split)
    if n < 0 or max_objects < 1:
        raise UserError(f"need n >= 0 and max_objects >= 1, got n={n}, max_objects={max_objects}")
    if max_objects > len(_COLOUR_NAMES):
        raise UserError(f"max_objects={max_objects} exceeds the {len(_COLOUR_NAMES)} object colours")
    rng = np.random.default_rng([seed, _SPLIT_IDS[split]])
    k = max_objects
    # Object 0, vectorised over images.
    pair = _sample_pairs(rng, split, n)
    size = rng.integers(2, size=n)
    ranges = np.array(SIZE_RANGES)
    side = rng.uniform(ranges[size, 0], ranges[size, 1])
    row, col = rng.integers(3, size=(2, n))
    jitter = rng.uniform(-_JITTER, _JITTER, size=(2, n))
    lay = {
        "present": np.zeros((n, k), bool),
        "colour": np.zeros((n, k), np.int64),
        "shape": np.zeros((n, k), np.int64),
        "size": np.zeros((n, k), np.int64),
        "side": np.zeros((n, k), np.float64),
        "row": np.zeros((n, k), np.int64),
        "col": np.zeros((n, k), np.int64),
        "cx": np.zeros((n, k), np.float64),
        "cy": np.zeros((n, k), np.float64),
    }
    lay["present"][:, 0] = True
    lay["colour"][:, 0], lay["shape"][:, 0] = pair[:, 0], pair[:, 1]
    lay["size"][:, 0], lay["side"][:, 0] = size, side
    lay["row"][:, 0], lay["col"][:, 0] = row, col
    lay["cx"][:, 0] = _box_centre(side, col, jitter[0])
    lay["cy"][:, 0] = _box_centre(side, row, jitter[1])
    lay["background"] = rng.integers(len(_BG_NAMES), size=n)
    if k > 1:
        _add_objects(rng, lay, split, rng.integers(1, k + 1, size=n))
    captions, names_bg = _captions(rng, lay)
    lay["background"] = np.where(names_bg, lay["background"], _BG_NAMES.index(UNNAMED_BACKGROUND))
    return Layout(**lay, captions=captions)


def _supersample(resolution: int) -> int:
    return 4 if resolution <= 32 else 2 if resolution <= 64 else 1


def _coverage(shape: int, cx: np.ndarray, cy: np.ndarray, side: np.ndarray, resolution: int) -> np.ndarray:
    """Fraction of each pixel covered by one shape per image: centres/sides [M] -> float32 [M, R, R]."""
    ss = _supersample(resolution)
    grid = (np.arange(resolution * ss, dtype=np.float32) + 0.5) / (resolution * ss)
    half = (side / 2).astype(np.float32)[:, None, None]
    dx = np.abs(grid[None, None, :] - cx.astype(np.float32)[:, None, None])
    dy = grid[None, :, None] - cy.astype(np.float32)[:, None, None]
    if shape == 0:  # square
        inside = (dx <= half) & (np.abs(dy) <= half)
    elif shape == 1:  # circle
        inside = dx * dx + dy * dy <= half * half
    else:  # triangle, apex up: half-width grows from 0 at the top to `half` at the base
        inside = (np.abs(dy) <= half) & (dx <= (dy + half) / 2)
    m, r = len(side), resolution
    counts = inside.view(np.uint8).reshape(m, r, ss, r, ss).sum(axis=(2, 4), dtype=np.uint8)
    return counts.astype(np.float32) / (ss * ss)


def render(layout: Layout, resolution: int, start: int, stop: int) -> np.ndarray:
    """Renders images start..stop-1 of `layout`: uint8 [stop - start, R, R, 3]."""
    n, r = stop - start, resolution
    img = np.broadcast_to(_BG_RGB[layout.background[start:stop]][:, None, None, :], (n, r, r, 3)).astype(np.float32)
    for k in range(layout.present.shape[1]):
        sl = (slice(start, stop), k)
        alpha = np.zeros((n, r, r), np.float32)
        for shape in range(len(SHAPES)):
            sel = np.nonzero(layout.present[sl] & (layout.shape[sl] == shape))[0]
            if len(sel):
                alpha[sel] = _coverage(shape, layout.cx[sl][sel], layout.cy[sl][sel], layout.side[sl][sel], r)
        colour = _OBJ_RGB[layout.colour[sl]][:, None, None, :]
        img += alpha[..., None] * (colour - img)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def render_chunks(layout: Layout, resolution: int, chunk: int) -> Iterator[tuple[int, np.ndarray]]:
    """Yields (start, images uint8 [<=chunk, R, R, 3]) over the whole layout."""
    for start in range(0, len(layout.background), chunk):
        yield start, render(layout, resolution, start, min(start + chunk, len(layout.background)))


def chunk_size(resolution: int) -> int:
    """Images per render/grade chunk so a chunk holds ~4M (super)samples."""
    return max(1, (1 << 22) // (resolution * _supersample(resolution)) ** 2)


def make_examples(
    n: int, resolution: int, split: str, seed: int, *, max_objects: int = 1
) -> tuple[np.ndarray, list[str]]:
    """Renders `n` examples of `split` directly: (images uint8 [N, R, R, 3], captions list[str]).

    Deterministic in (n, resolution, split, seed, max_objects); the prepared TFDS split holds exactly these.
    """
    if not 8 <= resolution <= 1024:
        raise UserError(f"shapes resolution must be in [8, 1024], got {resolution}")
    layout = sample_layout(n, split, seed, max_objects)
    images = np.zeros((n, resolution, resolution, 3), np.uint8)
    for start, chunk in render_chunks(layout, resolution, chunk_size(resolution)):
        images[start : start + len(chunk)] = chunk
    return images, list(layout.captions)


# ----------------------------------------------------------------------------------------------------- parsing


@dataclass(frozen=True)
class ObjectSpec:
    """Attributes of one object as stated in a caption; None = not mentioned."""

    colour: str | None
    shape: str | None
    size: str | None
    position: tuple[int, int] | None  # (row, col) on the 3x3 grid


@dataclass(frozen=True)
class CaptionSpec:
    objects: tuple[ObjectSpec, ...]
    background: str | None


_WORD_SIZE = {w: SIZES[i] for i, words in enumerate(_SIZE_WORDS) for w in words}
_WORD_BG = {"white": "white", "black": "black", "gray": "gray", "grey": "gray"}


def _parse_position(words: Sequence[str]) -> tuple[int, int] | None:
    row = col = None
    centre = False
    for w in words:
        if w in ("top", "upper"):
            row = 0
        elif w in ("bottom", "lower"):
            row = 2
        elif w == "left":
            col = 0
        elif w == "right":
            col = 2
        elif w in ("centre", "center", "middle"):
            centre = True
    if row is None and col is None and not centre:
        return None
    return (1 if row is None else row, 1 if col is None else col)


def _parse_object(text: str) -> ObjectSpec:
    words = re.findall(r"[a-z]+", text)
    return ObjectSpec(
        colour=next((w for w in words if w in OBJECT_COLOURS), None),
        shape=next((w for w in words if w in SHAPES), None),
        size=next((_WORD_SIZE[w] for w in words if w in _WORD_SIZE), None),
        position=_parse_position(words),
    )


def parse_caption(caption: str) -> CaptionSpec:
    """Parses a caption into attributes (background and one ObjectSpec per mentioned shape)."""
    text = caption.lower()
    background = None
    match = re.search(r"\b(white|black|gray|grey)\s+background\b", text)
    if match:
        background = _WORD_BG[match.group(1)]
        text = text[: match.start()] + text[match.end() :]
    n_shapes = len(re.findall(r"\b(?:square|circle|triangle)\b", text))
    chunks = [text] if n_shapes <= 1 else [c for c in re.split(r",|\band\b", text) if c.strip()]
    objects = tuple(o for o in map(_parse_object, chunks) if any(v is not None for v in vars(o).values()))
    return CaptionSpec(objects=objects, background=background)


# ----------------------------------------------------------------------------------------------------- grading

_ATTRIBUTES = ("colour", "shape", "size", "position", "background")


def _backgrounds(imgs: np.ndarray) -> np.ndarray:
    """Median colour of each image's border pixels: [N, H, W, 3] -> [N, 3]."""
    border = np.concatenate([imgs[:, 0], imgs[:, -1], imgs[:, 1:-1, 0], imgs[:, 1:-1, -1]], axis=1)
    return np.median(border, axis=1)


def _nearest(rgb: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Index of the nearest palette colour: rgb [..., 3], palette [P, 3] -> int [...]."""
    return np.argmin(((rgb[..., None, :] - palette) ** 2).sum(-1), axis=-1)


def _largest_components(masks: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of each boolean mask [N, H, W].

    Min-label propagation with pointer jumping: a pixel's label is the flat index of a pixel of its component, so
    label <- label[label] stays inside the component. Numpy only; a few rounds for convex blobs.
    """
    n, h, w = masks.shape
    big = masks.size
    flat_mask = masks.ravel()
    labels = np.where(masks, np.arange(big, dtype=np.int32).reshape(masks.shape), big)
    while True:
        new = labels.copy()
        np.minimum(new[:, 1:], labels[:, :-1], out=new[:, 1:])
        np.minimum(new[:, :-1], labels[:, 1:], out=new[:, :-1])
        np.minimum(new[:, :, 1:], labels[:, :, :-1], out=new[:, :, 1:])
        np.minimum(new[:, :, :-1], labels[:, :, 1:], out=new[:, :, :-1])
        new = np.where(flat_mask, new.ravel(), big)
        lookup = np.append(new, big).astype(np.int32)
        for _ in range(4):
            new = lookup[new]
        new = new.reshape(masks.shape)
        if np.array_equal(new, labels):
            break
        labels = new
    counts = np.bincount(labels[masks], minlength=big).reshape(n, h * w)
    best = counts.argmax(axis=1) + np.arange(n) * h * w
    return masks & (labels == best[:, None, None])


def _extent(counts: np.ndarray, area: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First/last index holding the 0.5th/99.5th percentile of pixel mass along one axis: counts [N, L] -> [N], [N]."""
    cum = np.cumsum(counts, axis=1)
    thr = 0.005 * area[:, None]
    lo = np.argmax(cum > thr, axis=1)
    rev = np.cumsum(counts[:, ::-1], axis=1)
    hi = counts.shape[1] - 1 - np.argmax(rev > thr, axis=1)
    return lo, hi


def _dilate(masks: np.ndarray) -> np.ndarray:
    """4-neighbour dilation by one pixel of boolean masks [N, H, W]."""
    out = masks.copy()
    out[:, 1:] |= masks[:, :-1]
    out[:, :-1] |= masks[:, 1:]
    out[:, :, 1:] |= masks[:, :, :-1]
    out[:, :, :-1] |= masks[:, :, 1:]
    return out


def _object_coverage(imgs: np.ndarray, bgs: np.ndarray, named: np.ndarray) -> np.ndarray:
    """Per-pixel coverage in [0, 1]: the pixel's position between the background and the named colour, [N, H, W]."""
    direction = named - bgs
    t = ((imgs - bgs[:, None, None]) * direction[:, None, None]).sum(-1) / (direction**2).sum(-1)[:, None, None]
    return np.clip(t, 0.0, 1.0)


def _measure(masks: np.ndarray, imgs: np.ndarray, coverage: np.ndarray) -> dict[str, np.ndarray]:
    """Measures one object per image from boolean masks [N, H, W], images float [N, H, W, 3] and the object's
    coverage [N, H, W] in [0, 1] (see `_object_coverage`).

    The fill ratio that tells squares from circles is measured on the coverage c over the mask and its one-pixel
    rim: area = sum of c, height = sum over rows of the row's largest c, width likewise, fill = area / (height ·
    width). A boundary row that an edge half covers counts by that fraction, not by how image noise splits it around
    the mask's 0.5 threshold (with thresholded pixels, 2 levels of pixel noise turned ~4% of real squares into
    circles).
    Returns arrays [N]: colour, shape, size (indices), row, col (grid cells), compact (bool: a plausible object,
    >= 2% of the image and not scattered), valid (bool: enough pixels to measure anything).
    """
    _, h, w = masks.shape
    area = masks.sum(axis=(1, 2)).astype(np.float64)
    valid = area >= 4
    safe = np.maximum(area, 1)
    rows, cols = masks.sum(axis=2), masks.sum(axis=1)
    y0, y1 = _extent(rows, safe)
    x0, x1 = _extent(cols, safe)
    frac = area / (h * w)
    soft = coverage * _dilate(masks)
    soft_height, soft_width = soft.max(axis=2).sum(axis=1), soft.max(axis=1).sum(axis=1)
    fill = soft.sum(axis=(1, 2)) / np.maximum(soft_height * soft_width, 1e-6)
    mid = (y0 + y1) / 2
    ys = np.arange(h)[None, :]
    lower = ((rows * (ys > mid[:, None])).sum(1) + 0.5 * (rows * (ys == mid[:, None])).sum(1)) / safe
    shape = np.where(lower > 0.62, 2, np.where(fill > 0.92, 0, 1))  # triangle ~0.75 bottom-heavy; square fill ~1
    side = np.sqrt(frac / _SHAPE_FILL[shape])
    size = (side > (SIZE_RANGES[0][1] + SIZE_RANGES[1][0]) / 2).astype(np.int64)
    to_cell = lambda c: np.where(c < 0.41, 0, np.where(c > 0.59, 2, 1))
    row, col = to_cell((y0 + y1 + 1) / 2 / h), to_cell((x0 + x1 + 1) / 2 / w)
    mean_rgb = (imgs * masks[..., None]).sum(axis=(1, 2)) / safe[:, None]
    colour = _nearest(mean_rgb, _OBJ_RGB)
    compact = (frac >= 0.02) & (fill >= 0.35)
    return dict(colour=colour, shape=shape, size=size, row=row, col=col, compact=compact & valid, valid=valid)


def _far_from_bg(imgs: np.ndarray, bgs: np.ndarray, named: np.ndarray) -> np.ndarray:
    """Pixels past half-way from the background towards the named colour: [N, H, W] (i.e. coverage > 0.5)."""
    dist = np.sqrt(((imgs - bgs[:, None, None]) ** 2).sum(-1))
    return dist > 0.5 * np.sqrt(((named - bgs) ** 2).sum(-1))[:, None, None]


def _single_object_colours(imgs: np.ndarray, bgs: np.ndarray) -> np.ndarray:
    """The object colour nearest to the mean of the pixels far from the background (> 40): [N, 3]."""
    rough = np.sqrt(((imgs - bgs[:, None, None]) ** 2).sum(-1)) > 40.0
    mean_rgb = (imgs * rough[..., None]).sum(axis=(1, 2)) / np.maximum(rough.sum(axis=(1, 2)), 1)[:, None]
    return _OBJ_RGB[_nearest(mean_rgb, _OBJ_RGB)]


def _colour_masks(imgs: np.ndarray, bgs: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """Pixels nearest to each image's named colour (among object colours and its background), past half-way."""
    palettes = np.concatenate([np.broadcast_to(_OBJ_RGB, (len(imgs), *_OBJ_RGB.shape)), bgs[:, None]], axis=1)
    nearest = np.argmin(((imgs[:, :, :, None, :] - palettes[:, None, None]) ** 2).sum(-1), axis=-1)
    return (nearest == colours[:, None, None]) & _far_from_bg(imgs, bgs, _OBJ_RGB[colours])


def _score_objects(results: list[dict[str, list[bool]]], idx: list[int], objs: list[ObjectSpec], m, by_colour: bool):
    """Appends the right/wrong verdict of each mentioned attribute of objs[j] (image idx[j]) measured as m[...][j]."""
    for j, (i, obj) in enumerate(zip(idx, objs)):
        valid = bool(m["valid"][j])
        if obj.colour is not None:
            ok = bool(m["compact"][j]) if by_colour else valid and _COLOUR_NAMES[m["colour"][j]] == obj.colour
            results[i]["colour"].append(ok)
        if obj.shape is not None:
            results[i]["shape"].append(valid and SHAPES[m["shape"][j]] == obj.shape)
        if obj.size is not None:
            results[i]["size"].append(valid and SIZES[m["size"][j]] == obj.size)
        if obj.position is not None:
            results[i]["position"].append(valid and (int(m["row"][j]), int(m["col"][j])) == obj.position)


def _grade_chunk(imgs: np.ndarray, specs: list[CaptionSpec]) -> list[dict[str, list[bool]]]:
    """Per image, per attribute: the list of right/wrong verdicts (one per mention). imgs float [N, H, W, 3]."""
    bgs = _backgrounds(imgs)
    results: list[dict[str, list[bool]]] = [{a: [] for a in _ATTRIBUTES} for _ in specs]
    bg_names = _nearest(bgs, _BG_RGB)
    for i, spec in enumerate(specs):
        if spec.background is not None:
            results[i]["background"].append(_BG_NAMES[bg_names[i]] == spec.background)
    single = [i for i, s in enumerate(specs) if len(s.objects) == 1]
    if single:
        named = _single_object_colours(imgs[single], bgs[single])
        masks = _largest_components(_far_from_bg(imgs[single], bgs[single], named))
        m = _measure(masks, imgs[single], _object_coverage(imgs[single], bgs[single], named))
        _score_objects(results, single, [specs[i].objects[0] for i in single], m, by_colour=False)
    for k in range(max((len(s.objects) for s in specs), default=0)):
        idx = [i for i, s in enumerate(specs) if len(s.objects) > 1 and len(s.objects) > k]
        coloured = [i for i in idx if specs[i].objects[k].colour is not None]
        for i in set(idx) - set(coloured):  # no colour to find this object by: count it as not found
            for a in ("shape", "size", "position"):
                if getattr(specs[i].objects[k], a) is not None:
                    results[i][a].append(False)
        if coloured:
            targets = np.array([_COLOUR_NAMES.index(specs[i].objects[k].colour) for i in coloured])
            masks = _largest_components(_colour_masks(imgs[coloured], bgs[coloured], targets))
            m = _measure(masks, imgs[coloured], _object_coverage(imgs[coloured], bgs[coloured], _OBJ_RGB[targets]))
            _score_objects(results, coloured, [specs[i].objects[k] for i in coloured], m, by_colour=True)
    return results


def grade(images: np.ndarray, captions: Sequence[str]) -> dict[str, float]:
    """Measures how well images [N, H, W, 3] show what their captions say.

    images: uint8 in [0, 255], or float in [-1, 1] (the pipeline's range). Returns per-attribute accuracy for the
    attributes that at least one caption mentions ("colour", "shape", "size", "position", "background"), "all" (the
    fraction of parsed captions whose every mentioned attribute is right), "num_images" and "num_parsed" (captions
    naming at least one attribute; the others are left out of every accuracy). With one object per caption its mask is
    "far from the background"; with several, each object is found by its named colour (an object whose colour is not
    named counts as not found).
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or len(images) != len(captions):
        raise UserError(f"grade needs images [N, H, W, 3] and N captions, got {images.shape} and {len(captions)}")
    specs = [parse_caption(c) for c in captions]
    chunk = max(1, (1 << 20) // (images.shape[1] * images.shape[2]))
    results: list[dict[str, list[bool]]] = []
    for start in range(0, len(images), chunk):
        imgs = images[start : start + chunk]
        if np.issubdtype(imgs.dtype, np.floating):
            imgs = (np.clip(imgs, -1.0, 1.0) + 1.0) * 127.5
        results += _grade_chunk(imgs.astype(np.float32), specs[start : start + chunk])
    totals = {a: [ok for r in results for ok in r[a]] for a in _ATTRIBUTES}
    all_ok = [all(ok for oks in r.values() for ok in oks) for r in results if any(r.values())]
    out = {a: float(np.mean(v)) for a, v in totals.items() if v}
    out["all"] = float(np.mean(all_ok)) if all_ok else float("nan")
    out["num_images"] = float(len(images))
    out["num_parsed"] = float(len(all_ok))
    return out


def class_names() -> tuple[str, ...]:
    """Names of the dataset's `label` classes: the first object's "colour shape", label = colour * 3 + shape."""
    return tuple(f"{colour} {shape}" for colour in OBJECT_COLOURS for shape in SHAPES)
