"""Where the tutorials write their figures, and two helpers to make them.

Figures go to $MINISD_TUTORIAL_FIGURES if it is set (the tests point it at a temporary folder), else to the
committed tutorials/figures/. `save` records each file name so tutorials/build.py can embed it in the page under
the cell that made it.
"""
import os
from pathlib import Path

from PIL import Image, ImageDraw

FIGURES = Path(os.environ.get("MINISD_TUTORIAL_FIGURES") or Path(__file__).parent / "figures")
saved = []          # file names written since build.py last looked


def save(figure, name):
    """Write a PIL image or a matplotlib figure to FIGURES/name (a .png) and return its path."""
    FIGURES.mkdir(parents=True, exist_ok=True)
    path = FIGURES / name
    if isinstance(figure, Image.Image):
        figure.save(path, optimize=True)
    else:                                       # a matplotlib Figure
        figure.savefig(path, dpi=100, bbox_inches="tight", metadata={"Software": None})
        import matplotlib.pyplot as plt
        plt.close(figure)
    saved.append(name)
    return path


def grid(rows, labels=None, row_labels=None, scale=2, pad=4, label_height=14, label_width=0):
    """A grid of equal-sized PIL images (a list of rows), enlarged `scale` times with nearest-neighbour pixels,
    with optional column labels above and row labels to the left."""
    w, h = rows[0][0].size
    w, h = w * scale, h * scale
    top = label_height if labels else 0
    left = label_width if row_labels else 0
    columns = max(len(r) for r in rows)
    canvas = Image.new("RGB", (left + columns * (w + pad) + pad, top + len(rows) * (h + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for j, label in enumerate(labels or []):
        draw.text((left + pad + j * (w + pad), 1), str(label), fill="black")
    for i, row in enumerate(rows):
        y = top + pad + i * (h + pad)
        if row_labels:
            draw.text((2, y + h // 2 - 6), str(row_labels[i]), fill="black")
        for j, image in enumerate(row):
            canvas.paste(image.convert("RGB").resize((w, h), Image.NEAREST), (left + pad + j * (w + pad), y))
    return canvas
