"""Training curves of a stage-2 run from its metrics.jsonl, drawn as one PNG (PIL only, no plotting library).

    python bench/plot_curves.py --metrics workdirs/demo/ldm/metrics.jsonl --out docs/demo_training_curves.png

Left: caption alignment of the evaluation during training (the analytic grader's 'all' and 'shape' accuracy on seen
and novel captions); right: FID of the same images against each split's own images. One point per evaluation
(config.eval_every); prints the evaluations' total seconds (training logs their share of the wall time).
"""

from __future__ import annotations

import argparse
import json
import os

from PIL import Image, ImageDraw

SIZE, MARGIN = (520, 360), (64, 24, 24, 48)  # panel size; left, top, right, bottom margins
COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40))


def read_rows(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def series(rows: list[dict], key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in rows if key in r]


def panel(title: str, lines: dict[str, list[tuple[int, float]]], y_range: tuple[float, float] | None) -> Image.Image:
    """One line chart [SIZE] with axes, ticks, a legend; y_range None = from the data."""
    image = Image.new("RGB", SIZE, "white")
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = MARGIN
    width, height = SIZE[0] - left - right, SIZE[1] - top - bottom
    points = [p for line in lines.values() for p in line]
    x_max = max(p[0] for p in points)
    y_low, y_high = y_range or (0.0, max(p[1] for p in points) * 1.1)
    to_xy = lambda x, y: (left + width * x / x_max, top + height * (1 - (y - y_low) / (y_high - y_low)))
    draw.rectangle([left, top, left + width, top + height], outline="black")
    for i in range(5):
        y = y_low + (y_high - y_low) * i / 4
        _, py = to_xy(0, y)
        draw.line([left - 4, py, left, py], fill="black")
        draw.text((4, py - 6), f"{y:.3g}", fill="black")
        x = x_max * i / 4
        px, _ = to_xy(x, y_low)
        draw.line([px, top + height, px, top + height + 4], fill="black")
        draw.text((px - 12, top + height + 8), f"{int(x)}", fill="black")
    draw.text((left + width // 2 - 16, SIZE[1] - 16), "step", fill="black")
    draw.text((left, 6), title, fill="black")
    for index, (name, line) in enumerate(lines.items()):
        colour = COLOURS[index % len(COLOURS)]
        xy = [to_xy(x, y) for x, y in line]
        if len(xy) > 1:
            draw.line(xy, fill=colour, width=2)
        for px, py in xy:
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
        draw.text((left + 8, top + 6 + 14 * index), name, fill=colour)
    return image


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--metrics", required=True, help="a stage-2 workdir's metrics.jsonl")
    p.add_argument("--out", required=True, help="PNG to write")
    args = p.parse_args()
    rows = read_rows(args.metrics)
    alignment = {
        f"{attribute}, {name}": series(rows, f"eval/alignment/{split}/{attribute}")
        for split, name in (("validation", "seen"), ("novel", "novel"))
        for attribute in ("all", "shape")
    }
    fid = {name: series(rows, f"eval/fid/{split}") for split, name in (("validation", "seen"), ("novel", "novel"))}
    alignment = {k: v for k, v in alignment.items() if v}
    fid = {k: v for k, v in fid.items() if v}
    if not alignment:
        raise SystemExit(f"{args.metrics} has no evaluation rows (eval/alignment/...): was config.evaluation on?")
    panels = [panel("caption alignment (grader accuracy)", alignment, (0.0, 1.0))]
    if fid:
        panels.append(panel("FID vs the split's images", fid, None))
    out = Image.new("RGB", (SIZE[0] * len(panels), SIZE[1]), "white")
    for i, image in enumerate(panels):
        out.paste(image, (SIZE[0] * i, 0))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    out.save(args.out)
    seconds = sum(r.get("eval/seconds", 0.0) for r in rows)
    print(f"wrote {args.out}: {len(series(rows, 'eval/seconds'))} evaluations, {seconds:.1f} s of evaluation")


if __name__ == "__main__":
    main()
