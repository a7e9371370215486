"""Writes shapes.parquet: 16x16 RGB images of six kinds of shape (the label), each in a random
colour, size and place on a random dark background, for the RGB image examples and tests.

Drawn here (no download), four times larger and scaled down, so edges are smooth. Columns
as users' image data sets have them: `image` (PNG bytes) and `label` (0-5: circle, square,
triangle, diamond, cross, ring).

    python jobs/examples/make_shapes.py
"""

from __future__ import annotations

import colorsys
import io
import random
from pathlib import Path

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring")
SIZE, SCALE = 16, 4  # pixels of the written images; drawn SCALE times larger


def draw(kind: str, rng: random.Random) -> bytes:
    """One image of `kind` as PNG bytes."""
    from PIL import Image, ImageDraw

    big = SIZE * SCALE
    background = tuple(rng.randrange(0, 70) for _ in range(3))
    hue, saturation, value = rng.random(), rng.uniform(0.6, 1.0), rng.uniform(0.75, 1.0)
    colour = tuple(round(255 * c) for c in colorsys.hsv_to_rgb(hue, saturation, value))
    image = Image.new("RGB", (big, big), background)
    pen = ImageDraw.Draw(image)
    radius = rng.uniform(0.25, 0.4) * big
    cx = rng.uniform(radius + SCALE, big - radius - SCALE)
    cy = rng.uniform(radius + SCALE, big - radius - SCALE)
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    if kind == "circle":
        pen.ellipse(box, fill=colour)
    elif kind == "square":
        pen.rectangle(box, fill=colour)
    elif kind == "triangle":
        pen.polygon([(cx, cy - radius), (cx + radius, cy + radius), (cx - radius, cy + radius)],
                    fill=colour)  # fmt: skip
    elif kind == "diamond":
        pen.polygon([(cx, cy - radius), (cx + radius, cy), (cx, cy + radius), (cx - radius, cy)],
                    fill=colour)  # fmt: skip
    elif kind == "cross":
        arm = radius / 3
        pen.rectangle((cx - radius, cy - arm, cx + radius, cy + arm), fill=colour)
        pen.rectangle((cx - arm, cy - radius, cx + arm, cy + radius), fill=colour)
    else:  # ring
        pen.ellipse(box, outline=colour, width=round(radius / 2.5))
    small = image.resize((SIZE, SIZE), Image.LANCZOS)
    out = io.BytesIO()
    small.save(out, format="PNG")
    return out.getvalue()


def shapes_table(n: int = 2400, seed: int = 0):  # -> pyarrow.Table
    """`n` images, the kinds in turn, drawn from `seed`."""
    import pyarrow as pa

    rng = random.Random(seed)
    labels = [i % len(SHAPES) for i in range(n)]
    return pa.table({"image": [draw(SHAPES[k], rng) for k in labels], "label": labels})


def main() -> None:
    import pyarrow.parquet as pq

    path = Path(__file__).with_name("shapes.parquet")
    pq.write_table(shapes_table(), path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
