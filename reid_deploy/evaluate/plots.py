"""Evaluation plots, drawn with Pillow (no plotting library to start: it cost a CLI run about a second):
the CMC curve and a grid of sampled queries with their top matches."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from reid_deploy.errors import DataError
from reid_deploy.evaluate.metrics import RankedList
from reid_deploy.inference.features import LabelledFeatures

TRUE_COLOR, FALSE_COLOR, QUERY_COLOR = "#1a9850", "#d73027", "#2c7bb6"
CURVE_COLORS, GRID_COLOR = ("#2c7bb6", "#d7191c", "#1a9850", "#7b3294"), "#dddddd"
THUMB_SIZE = (64, 128)  # width, height of the thumbnails (pixels)
FRAME, GAP, CAPTION_LINE = 4, 8, 12  # frame width, space between tiles, caption line height (pixels)


def plot_cmc(curves: Mapping[str, Sequence[float]], path: str | Path, title: str) -> None:
    """One CMC curve per entry of ``curves`` (label -> matching rate 0-1 at ranks 1..n), the legend below
    the axes. Drawn at twice the size and downsampled (smooth lines and text)."""
    from PIL import Image, ImageDraw, ImageFont

    from reid_deploy.files import atomic_path

    s = 2
    font, title_font = ImageFont.load_default(size=12 * s), ImageFont.load_default(size=14 * s)
    width = 700 * s
    title_lines = _wrap(title, title_font, width - 40 * s)
    top = (12 + 20 * len(title_lines)) * s
    left, right, plot_height = 60 * s, width - 20 * s, 300 * s
    bottom = top + plot_height
    canvas = Image.new("RGB", (width, bottom + (50 + 20 * len(curves)) * s), "white")
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(title_lines):
        draw.text((width / 2, (8 + 20 * i) * s), line, fill="black", font=title_font, anchor="ma")
    longest = max(len(cmc) for cmc in curves.values())

    def x_of(rank: float) -> float:
        return left + (rank - 0.5) / longest * (right - left)

    def y_of(rate: float) -> float:
        return bottom - rate / 1.01 * plot_height

    for percent in range(0, 101, 20):
        draw.line([(left, y_of(percent / 100)), (right, y_of(percent / 100))], fill=GRID_COLOR, width=s)
        draw.text((left - 6 * s, y_of(percent / 100)), str(percent), fill="black", font=font, anchor="rm")
    step = next(step for step in (1, 2, 5, 10, 20, 50, 100, 200, 500, 10**9) if longest / step <= 12)
    for rank in sorted({1, *range(step, longest + 1, step)}):
        draw.line([(x_of(rank), top), (x_of(rank), bottom)], fill=GRID_COLOR, width=s)
        draw.text((x_of(rank), bottom + 6 * s), str(rank), fill="black", font=font, anchor="ma")
    draw.rectangle((left, top, right, bottom), outline="black", width=s)
    draw.text(((left + right) / 2, bottom + 24 * s), "Rank", fill="black", font=font, anchor="ma")
    label = Image.new("RGB", (int(draw.textlength("Matching rate (%)", font=font)) + 2, 16 * s), "white")
    ImageDraw.Draw(label).text((1, 0), "Matching rate (%)", fill="black", font=font)
    label = label.rotate(90, expand=True)
    canvas.paste(label, (4 * s, int((top + bottom - label.height) / 2)))
    for i, (name, cmc) in enumerate(curves.items()):
        color, square = CURVE_COLORS[i % len(CURVE_COLORS)], i % 2 == 1
        points = [(x_of(rank), y_of(rate)) for rank, rate in enumerate(cmc, start=1)]
        draw.line(points, fill=color, width=2 * s, joint="curve")
        legend_y = bottom + (50 + 20 * i) * s
        for x, y in points * (len(cmc) <= 50) + [(left + 20 * s, legend_y)]:
            box = (x - 3 * s, y - 3 * s, x + 3 * s, y + 3 * s)
            draw.rectangle(box, fill=color) if square else draw.ellipse(box, fill=color)
        draw.line([(left, legend_y), (left + 40 * s, legend_y)], fill=color, width=2 * s)
        draw.text((left + 50 * s, legend_y), name, fill="black", font=font, anchor="lm")
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        canvas.resize((canvas.width // s, canvas.height // s), Image.Resampling.LANCZOS).save(fh, format="PNG")


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
