"""Evaluation plots: the CMC curve (matplotlib, no pyplot) and a grid of sampled queries with their top
matches (drawn with Pillow: one image, no figure of a hundred axes)."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from reid_deploy.errors import DataError
from reid_deploy.evaluate.metrics import RankedList
from reid_deploy.inference.features import LabelledFeatures

TRUE_COLOR, FALSE_COLOR, QUERY_COLOR = "#1a9850", "#d73027", "#2c7bb6"
THUMB_SIZE = (64, 128)  # width, height of the thumbnails (pixels)
FRAME, GAP, CAPTION_LINE = 4, 8, 12  # frame width, space between tiles, caption line height (pixels)


def plot_cmc(curves: Mapping[str, Sequence[float]], path: str | Path, title: str) -> None:
    """One CMC curve per entry of ``curves`` (label -> matching rate 0-1 at ranks 1..n)."""
    from matplotlib.figure import Figure

    from reid_deploy.files import atomic_path

    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    styles = ({"marker": "o", "color": "#2c7bb6"}, {"marker": "s", "color": "#d7191c", "linestyle": "--"})
    for (label, cmc), style in zip(curves.items(), styles * len(curves)):
        ranks = np.arange(1, len(cmc) + 1)
        ax.plot(ranks, 100 * np.asarray(cmc), label=label, markersize=4 if len(cmc) <= 50 else 0, **style)
    longest = max(len(c) for c in curves.values())
    ax.set(xlabel="Rank", ylabel="Matching rate (%)", title=title, xlim=(0.5, longest + 0.5), ylim=(0, 101))
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best")
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fig.savefig(fh, format="png", dpi=100)


def plot_sampled_matches(ranked: Sequence[RankedList], query: LabelledFeatures, gallery: LabelledFeatures,
                         path: str | Path, max_rank: int, title: str) -> None:
    """One row per ranked list: the query, then its top ``max_rank`` counted gallery images, framed green
    for a true match and red otherwise, captioned pid / camera / distance. An image that cannot be read,
    or has no path (a features file without paths), is a grey placeholder."""
    from PIL import Image, ImageDraw, ImageFont

    from reid_deploy.files import atomic_path

    font, title_font = ImageFont.load_default(size=10), ImageFont.load_default(size=13)
    cell_w = THUMB_SIZE[0] + 2 * FRAME + GAP
    cell_h = THUMB_SIZE[1] + 2 * FRAME + 2 * CAPTION_LINE + GAP
    width = max(GAP + (max_rank + 1) * cell_w, 480)
    title_lines = _wrap(title, title_font, width - 2 * GAP)
    top = GAP + 18 * len(title_lines) + 22 + 16  # title, legend, column headings
    canvas = Image.new("RGB", (width, top + len(ranked) * cell_h), "white")
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(title_lines):
        draw.text((width / 2, GAP + 18 * i), line, fill="black", font=title_font, anchor="ma")
    x = GAP
    for color, label in ((QUERY_COLOR, "query"), (TRUE_COLOR, "true match"), (FALSE_COLOR, "wrong match")):
        y = GAP + 18 * len(title_lines) + 4
        draw.rectangle((x, y, x + 14, y + 10), outline=color, width=3)
        draw.text((x + 20, y), label, fill="black", font=font)
        x += 30 + int(draw.textlength(label, font=font))
    for column in range(max_rank + 1):
        draw.text((GAP + column * cell_w + (cell_w - GAP) / 2, top - 14), "query" if column == 0 else
                  f"rank {column}", fill="black", font=font, anchor="ma")
    for row, entry in enumerate(ranked):
        y = top + row * cell_h
        q = entry.query
        _tile(canvas, draw, (GAP, y), query.paths[q], QUERY_COLOR,
              [f"pid {query.pids[q]}  c{query.camids[q] + 1}"], font)
        for k, (g, distance, true) in enumerate(zip(entry.gallery[:max_rank], entry.distances, entry.true)):
            _tile(canvas, draw, (GAP + (k + 1) * cell_w, y), gallery.paths[g], TRUE_COLOR if true else FALSE_COLOR,
                  [f"pid {gallery.pids[g]}  c{gallery.camids[g] + 1}", f"d={distance:.3f}"], font)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        canvas.save(fh, format="PNG")


def _wrap(text: str, font, width: float) -> list[str]:
    """``text`` in lines no wider than ``width`` pixels (broken between words)."""
    from PIL import Image, ImageDraw

    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines = [""]
    for word in text.split():
        candidate = f"{lines[-1]} {word}".strip()
        if lines[-1] and measure.textlength(candidate, font=font) > width:
            lines.append(word)
        else:
            lines[-1] = candidate
    return lines


def _tile(canvas, draw, corner: tuple[int, int], image_path: str, color: str, caption: list[str], font) -> None:
    """One thumbnail at ``corner`` in a coloured frame, caption lines below it."""
    x, y = corner
    inner = (x + FRAME, y + FRAME)
    thumbnail = _thumbnail(image_path)
    if thumbnail is not None:
        canvas.paste(thumbnail, inner)
    else:
        draw.rectangle((*inner, inner[0] + THUMB_SIZE[0] - 1, inner[1] + THUMB_SIZE[1] - 1), fill=(200, 200, 200))
        draw.text((inner[0] + THUMB_SIZE[0] / 2, inner[1] + THUMB_SIZE[1] / 2),
                  "missing" if image_path else "no image", fill="black", font=font, anchor="mm")
    draw.rectangle((x, y, x + THUMB_SIZE[0] + 2 * FRAME - 1, y + THUMB_SIZE[1] + 2 * FRAME - 1), outline=color,
                   width=FRAME)
    for i, line in enumerate(caption):
        draw.text((x + FRAME + THUMB_SIZE[0] / 2, y + THUMB_SIZE[1] + 2 * FRAME + 1 + i * CAPTION_LINE), line,
                  fill="black", font=font, anchor="ma")


def _thumbnail(image_path: str):
    """The image resized to THUMB_SIZE; None without a path or when it cannot be read."""
    from reid_deploy.data.transforms import open_image

    if not image_path:
        return None
    try:
        return open_image(image_path).resize(THUMB_SIZE)
    except DataError:
        return None
