"""Evaluation plots (matplotlib, Agg): the CMC curve and a grid of sampled queries with their top matches."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from reid_deploy.errors import DataError
from reid_deploy.evaluate.metrics import ranked_matches
from reid_deploy.inference.features import LabelledFeatures

TRUE_COLOR, FALSE_COLOR, QUERY_COLOR = "#1a9850", "#d73027", "#2c7bb6"
THUMB_SIZE = (64, 128)  # width, height of the thumbnails (pixels)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> None:
    from reid_deploy.files import atomic_path

    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fig.savefig(fh, format="png", dpi=100)


def plot_cmc(curves: Mapping[str, Sequence[float]], path: str | Path, title: str) -> None:
    """One CMC curve per entry of ``curves`` (label -> matching rate 0-1 at ranks 1..n)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
    styles = ({"marker": "o", "color": "#2c7bb6"}, {"marker": "s", "color": "#d7191c", "linestyle": "--"})
    for (label, cmc), style in zip(curves.items(), styles * len(curves)):
        ranks = np.arange(1, len(cmc) + 1)
        ax.plot(ranks, 100 * np.asarray(cmc), label=label, markersize=4 if len(cmc) <= 50 else 0, **style)
    longest = max(len(c) for c in curves.values())
    ax.set(xlabel="Rank", ylabel="Matching rate (%)", title=title, xlim=(0.5, longest + 0.5), ylim=(0, 101))
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best")
    _save(fig, path)
    plt.close(fig)


def plot_sampled_matches(distmat: np.ndarray, query: LabelledFeatures, gallery: LabelledFeatures,
                         path: str | Path, num_query: int, max_rank: int, title: str, seed: int = 0) -> None:
    """Rows of sampled queries, each followed by its top ``max_rank`` gallery images (protocol-ignored
    entries left out), framed green for a true match and red otherwise, captioned pid / camera / distance."""
    from matplotlib.patches import Patch

    plt = _pyplot()
    rows = np.sort(np.random.default_rng(seed).choice(len(query), min(num_query, len(query)), replace=False))
    order, valid, match = ranked_matches(distmat[rows], query.pids[rows], gallery.pids, query.camids[rows],
                                         gallery.camids)
    cols = max_rank + 1
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.05 * cols, 1.9 * len(rows) + 0.9), squeeze=False)
    for r, q in enumerate(rows):
        _tile(axes[r, 0], query.paths[q], QUERY_COLOR, f"pid {query.pids[q]}  c{query.camids[q] + 1}")
        axes[r, 0].set_title("query" if r == 0 else "", fontsize=9)
        ranked = order[r][valid[r]][:max_rank]
        hits = match[r][valid[r]][:max_rank]
        for k in range(max_rank):
            ax = axes[r, k + 1]
            if k >= len(ranked):
                ax.axis("off")
                continue
            g = ranked[k]
            _tile(ax, gallery.paths[g], TRUE_COLOR if hits[k] else FALSE_COLOR,
                  f"pid {gallery.pids[g]}  c{gallery.camids[g] + 1}\nd={distmat[q, g]:.3f}")
            if r == 0:
                ax.set_title(f"rank {k + 1}", fontsize=9)
    legend = [Patch(facecolor="none", edgecolor=QUERY_COLOR, linewidth=3, label="query"),
              Patch(facecolor="none", edgecolor=TRUE_COLOR, linewidth=3, label="true match"),
              Patch(facecolor="none", edgecolor=FALSE_COLOR, linewidth=3, label="wrong match")]
    fig.suptitle(title, fontsize=11)
    fig.legend(handles=legend, loc="upper center", ncol=3,
               bbox_to_anchor=(0.5, 1 - 0.45 / fig.get_figheight()),
               frameon=False, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.8 / fig.get_figheight()), h_pad=0.6, w_pad=0.3)
    _save(fig, path)
    plt.close(fig)


def _tile(ax, image_path: str, color: str, caption: str) -> None:
    """One thumbnail with a coloured frame and a caption; a grey tile when the file is unreadable."""
    from reid_deploy.data.transforms import open_image

    try:
        ax.imshow(np.asarray(open_image(image_path).resize(THUMB_SIZE)))
    except DataError:
        ax.imshow(np.full((THUMB_SIZE[1], THUMB_SIZE[0], 3), 200, np.uint8))
        ax.text(THUMB_SIZE[0] / 2, THUMB_SIZE[1] / 2, "missing", ha="center", va="center", fontsize=7)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_edgecolor(color)
        spine.set_linewidth(4)
    ax.set_xlabel(caption, fontsize=7)
