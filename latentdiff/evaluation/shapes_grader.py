"""The analytic grader of the `shapes` dataset (latentdiff/data/shapes.py): how well images show their captions.

`grade` parses each caption back into attributes and measures them from pixels. Background = nearest named
background colour to the median border pixel; the object mask = pixels far from the background (single object) or
nearest to the named colour (several objects); colour = nearest named object colour to the mask's mean; shape = how
much of its box the object fills, both measured on its anti-aliased coverage rather than thresholded pixels (square
~1, circle ~0.785, triangle ~0.5); size = sqrt(area / fill of that shape);
position = centre of the mask's extent (0.5th..99.5th percentile of its pixel coordinates) on the 3x3 grid. The
extent centre is used rather than the centroid because a triangle's centroid sits h/6 below its box centre.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from latentdiff.data import shapes
from latentdiff.errors import UserError

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


_WORD_SIZE = {w: shapes.SIZES[i] for i, words in enumerate(shapes.SIZE_WORDS) for w in words}
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
        colour=next((w for w in words if w in shapes.OBJECT_COLOURS), None),
        shape=next((w for w in words if w in shapes.SHAPES), None),
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
    side = np.sqrt(frac / shapes.SHAPE_FILL[shape])
    size = (side > (shapes.SIZE_RANGES[0][1] + shapes.SIZE_RANGES[1][0]) / 2).astype(np.int64)
    to_cell = lambda c: np.where(c < 0.41, 0, np.where(c > 0.59, 2, 1))
    row, col = to_cell((y0 + y1 + 1) / 2 / h), to_cell((x0 + x1 + 1) / 2 / w)
    mean_rgb = (imgs * masks[..., None]).sum(axis=(1, 2)) / safe[:, None]
    colour = _nearest(mean_rgb, shapes.OBJECT_RGB)
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
    return shapes.OBJECT_RGB[_nearest(mean_rgb, shapes.OBJECT_RGB)]


def _colour_masks(imgs: np.ndarray, bgs: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """Pixels nearest to each image's named colour (among object colours and its background), past half-way."""
    palettes = np.concatenate(
        [np.broadcast_to(shapes.OBJECT_RGB, (len(imgs), *shapes.OBJECT_RGB.shape)), bgs[:, None]], axis=1
    )
    nearest = np.argmin(((imgs[:, :, :, None, :] - palettes[:, None, None]) ** 2).sum(-1), axis=-1)
    return (nearest == colours[:, None, None]) & _far_from_bg(imgs, bgs, shapes.OBJECT_RGB[colours])


def _score_objects(results: list[dict[str, list[bool]]], idx: list[int], objs: list[ObjectSpec], m, by_colour: bool):
    """Appends the right/wrong verdict of each mentioned attribute of objs[j] (image idx[j]) measured as m[...][j]."""
    for j, (i, obj) in enumerate(zip(idx, objs)):
        valid = bool(m["valid"][j])
        if obj.colour is not None:
            ok = bool(m["compact"][j]) if by_colour else valid and shapes.COLOUR_NAMES[m["colour"][j]] == obj.colour
            results[i]["colour"].append(ok)
        if obj.shape is not None:
            results[i]["shape"].append(valid and shapes.SHAPES[m["shape"][j]] == obj.shape)
        if obj.size is not None:
            results[i]["size"].append(valid and shapes.SIZES[m["size"][j]] == obj.size)
        if obj.position is not None:
            results[i]["position"].append(valid and (int(m["row"][j]), int(m["col"][j])) == obj.position)


def _grade_chunk(imgs: np.ndarray, specs: list[CaptionSpec]) -> list[dict[str, list[bool]]]:
    """Per image, per attribute: the list of right/wrong verdicts (one per mention). imgs float [N, H, W, 3]."""
    bgs = _backgrounds(imgs)
    results: list[dict[str, list[bool]]] = [{a: [] for a in _ATTRIBUTES} for _ in specs]
    bg_names = _nearest(bgs, shapes.BACKGROUND_RGB)
    for i, spec in enumerate(specs):
        if spec.background is not None:
            results[i]["background"].append(shapes.BACKGROUND_NAMES[bg_names[i]] == spec.background)
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
            targets = np.array([shapes.COLOUR_NAMES.index(specs[i].objects[k].colour) for i in coloured])
            masks = _largest_components(_colour_masks(imgs[coloured], bgs[coloured], targets))
            m = _measure(
                masks, imgs[coloured], _object_coverage(imgs[coloured], bgs[coloured], shapes.OBJECT_RGB[targets])
            )
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
