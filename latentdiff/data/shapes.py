"""The built-in `shapes` text-image dataset: procedural coloured shapes with captions (graded by
latentdiff.evaluation.shapes_grader).

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
"""

from __future__ import annotations

import re
from collections.abc import Iterator
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

COLOUR_NAMES = tuple(OBJECT_COLOURS)
BACKGROUND_NAMES = tuple(BACKGROUND_COLOURS)
OBJECT_RGB = np.array(list(OBJECT_COLOURS.values()), np.float32)
BACKGROUND_RGB = np.array(list(BACKGROUND_COLOURS.values()), np.float32)
_MARGIN = 0.02
_JITTER = 0.02
_OBJECT_GAP = 0.06  # min distance between the boxes of two objects in one image
# Fill ratio of each shape inside its box (square, circle, triangle): used to turn mask area into a box side.
SHAPE_FILL = np.array([1.0, np.pi / 4, 0.5], np.float32)

# Caption vocabulary. Position phrases per (row, col) on the 3x3 grid.
SIZE_WORDS = (("small", "little", "tiny"), ("large", "big"))
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
    novel = np.zeros((len(COLOUR_NAMES), len(SHAPES)), bool)
    for c, s in NOVEL_PAIRS:
        novel[COLOUR_NAMES.index(c), SHAPES.index(s)] = True
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
    colour = rng.integers(len(COLOUR_NAMES), size=n)
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
    sizes = SIZE_WORDS[size]
    positions = _POSITION_PHRASES[(row, col)]
    return template.format(
        size=sizes[rng.integers(len(sizes))],
        colour=COLOUR_NAMES[colour],
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
        bg = BACKGROUND_NAMES[lay["background"][i]]
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
    if max_objects > len(COLOUR_NAMES):
        raise UserError(f"max_objects={max_objects} exceeds the {len(COLOUR_NAMES)} object colours")
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
    lay["background"] = rng.integers(len(BACKGROUND_NAMES), size=n)
    if k > 1:
        _add_objects(rng, lay, split, rng.integers(1, k + 1, size=n))
    captions, names_bg = _captions(rng, lay)
    lay["background"] = np.where(names_bg, lay["background"], BACKGROUND_NAMES.index(UNNAMED_BACKGROUND))
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
    backgrounds = BACKGROUND_RGB[layout.background[start:stop]]  # [n, 3]
    img = np.broadcast_to(backgrounds[:, None, None, :], (n, r, r, 3)).astype(np.float32)
    for k in range(layout.present.shape[1]):
        sl = (slice(start, stop), k)
        alpha = np.zeros((n, r, r), np.float32)
        for shape in range(len(SHAPES)):
            sel = np.nonzero(layout.present[sl] & (layout.shape[sl] == shape))[0]
            if len(sel):
                alpha[sel] = _coverage(shape, layout.cx[sl][sel], layout.cy[sl][sel], layout.side[sl][sel], r)
        colour = OBJECT_RGB[layout.colour[sl]][:, None, None, :]
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


def class_names() -> tuple[str, ...]:
    """Names of the dataset's `label` classes: the first object's "colour shape", label = colour * 3 + shape."""
    return tuple(f"{colour} {shape}" for colour in OBJECT_COLOURS for shape in SHAPES)
