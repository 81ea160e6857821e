"""The gallery as one shard: features in memory, the neighbour graph with its re-ranking weights, item ids
and metadata; ``add`` / ``delete`` / ``search`` on numpy arrays. Knows nothing of HTTP, logs or brokers.

Concurrency: one writer calls ``add`` and ``delete``; each builds a new immutable ``View`` and publishes it
in one assignment, so a search (``search`` reads ``self.view`` once) never waits for a write and sees each
write whole or not at all. The graph stays exact: adds extend it (``graph.extend_graph``), deletes
recompute the rows they touch (``graph.without_rows``), and the weights are computed again after either,
so the searcher always equals one built from scratch over the items it holds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from reid_deploy.errors import DataError
from reid_deploy.retrieval.feature_files import check_unit_rows
from reid_deploy.retrieval.graph import GalleryGraph, build_graph, extend_graph, with_weights, without_rows
from reid_deploy.retrieval.index import GalleryIndex, IndexParams
from reid_deploy.retrieval.knn import top_inner_products


@dataclass(frozen=True)
class Item:
    """What is stored beside a feature: the caller's id and optional camera, time (epoch seconds), track id
    and a small JSON object."""

    id: str
    camera: str | None = None
    timestamp: float | None = None
    track_id: str | None = None
    meta: dict[str, Any] | None = None


@dataclass(frozen=True)
class Filters:
    """Which items a search may return: cameras to include (None: all) or exclude, a time window (items
    without a time are outside any window)."""

    cameras: frozenset[str] | None = None
    exclude_cameras: frozenset[str] = frozenset()
    since: float | None = None
    until: float | None = None

    @property
    def active(self) -> bool:
        return self.cameras is not None or bool(self.exclude_cameras) or self.since is not None or \
            self.until is not None


@dataclass(frozen=True)
class Match:
    rank: int
    item: Item
    distance: float


@dataclass(frozen=True)
class RerankParams:
    k1: int = 20
    k2: int = 6
    lambda_value: float = 0.3


@dataclass(frozen=True)
class View:
    """One published state of the gallery (never changed once published)."""

    feats: np.ndarray  # float32 [n, d], writable and contiguous (torch reads it without a copy)
    items: tuple[Item, ...]
    positions: dict[str, int]
    cameras: np.ndarray  # object [n]
    tracks: np.ndarray  # object [n]
    timestamps: np.ndarray  # float64 [n], NaN without a time
    graph: GalleryGraph | None
    max_norm: float
    seq: int = 0  # the last log record this view holds (``serve.log``)

    def allowed(self, filters: Filters) -> np.ndarray:
        """bool [n]: the items ``filters`` lets through."""
        keep = np.ones(len(self.items), bool)
        if filters.cameras is not None:
            keep &= np.isin(self.cameras, list(filters.cameras))
        if filters.exclude_cameras:
            keep &= ~np.isin(self.cameras, list(filters.exclude_cameras))
        with np.errstate(invalid="ignore"):
            if filters.since is not None:
                keep &= self.timestamps >= filters.since
            if filters.until is not None:
                keep &= self.timestamps <= filters.until
        return keep


@dataclass
class Searcher:
    """A gallery shard. ``params``: the graph's width and method (``graph_k`` 0: plain search only) and the
    k1 of its weights; ``fingerprint``/``flip``: the model that made the features, as in the index file."""

    feat_dim: int
    params: IndexParams = field(default_factory=IndexParams)
    rerank: RerankParams = field(default_factory=RerankParams)
    fingerprint: dict[str, Any] = field(default_factory=dict)
    flip: bool = False
    view: View = None

    def __post_init__(self) -> None:
        if self.params.graph_k > 0:  # re-ranking needs max(k1 + 1, k2) neighbours per item
            self.params.graph_k = max(self.params.graph_k, self.rerank.k1 + 1, self.rerank.k2)
        if self.view is None:
            self.view = View(np.zeros((0, self.feat_dim), np.float32), (), {}, np.zeros(0, object),
                             np.zeros(0, object), np.zeros(0), None, 0.0)

    def __len__(self) -> int:
        return len(self.view.items)

    @property
    def has_graph(self) -> bool:
        return self.params.graph_k > 0

    # ---- writes (one writer) ----

    def add(self, feats: np.ndarray, items: Sequence[Item], seq: int | None = None) -> tuple[list[str], list[str]]:
        """Add ``items`` with their features (unit float32 [len(items), d]); ids already held (or repeated in
        ``items``) are skipped. Returns (added ids, skipped ids); publishes a new view."""
        feats = check_features(feats, self.feat_dim)
        if len(feats) != len(items):
            raise DataError(f"{len(feats)} features for {len(items)} items")
        view, fresh, seen = self.view, [], set()
        for i, item in enumerate(items):
            if item.id not in view.positions and item.id not in seen:
                fresh.append(i)
                seen.add(item.id)
        taken = set(fresh)
        skipped = [item.id for i, item in enumerate(items) if i not in taken]
        if not fresh:
            self.view = replace(view, seq=view.seq if seq is None else seq)
            return [], skipped
        new_items = tuple(items[i] for i in fresh)
        all_feats = np.concatenate([view.feats, feats[fresh]])
        graph = None
        if self.has_graph:
            graph = self._new_graph(all_feats) if view.graph is None else \
                with_weights(extend_graph(view.graph, all_feats), all_feats, self.rerank.k1)
        positions = dict(view.positions)
        positions.update((item.id, len(view.items) + i) for i, item in enumerate(new_items))
        self.view = View(all_feats, view.items + new_items, positions,
                         np.concatenate([view.cameras, _column(new_items, "camera")]),
                         np.concatenate([view.tracks, _column(new_items, "track_id")]),
                         np.concatenate([view.timestamps, _times(new_items)]), graph,
                         max(view.max_norm, float(np.linalg.norm(feats[fresh], axis=1).max())),
                         view.seq if seq is None else seq)
        return [item.id for item in new_items], skipped

    def delete(self, ids: Sequence[str] = (), before: float | None = None, seq: int | None = None) -> int:
        """Delete the items ``ids`` (unknown ones are ignored) and, with ``before``, every item whose time is
        earlier; returns how many went. Publishes a new view."""
        view = self.view
        gone = np.zeros(len(view.items), bool)
        gone[[view.positions[i] for i in ids if i in view.positions]] = True
        if before is not None:
            with np.errstate(invalid="ignore"):
                gone |= view.timestamps < before
        count = int(gone.sum())
        if not count:
            self.view = replace(view, seq=view.seq if seq is None else seq)
            return 0
        kept = ~gone
        feats = np.ascontiguousarray(view.feats[kept])
        graph = None
        if view.graph is not None and kept.any():
            graph = with_weights(without_rows(view.graph, view.feats, kept), feats, self.rerank.k1)
        items = tuple(item for item, k in zip(view.items, kept) if k)
        self.view = View(feats, items, {item.id: i for i, item in enumerate(items)}, view.cameras[kept],
                         view.tracks[kept], view.timestamps[kept], graph, view.max_norm,
                         view.seq if seq is None else seq)
        return count

    def _new_graph(self, feats: np.ndarray) -> GalleryGraph:
        """The graph of ``feats`` as ``params`` say, with the re-ranking weights for ``rerank.k1``."""
        p = self.params
        graph = build_graph(feats, p.graph_k, p.graph, nlist=p.nlist, nprobe=p.nprobe, hnsw_m=p.hnsw_m,
                            ef_search=p.ef_search)
        return with_weights(graph, feats, self.rerank.k1)

    # ---- searches (any thread) ----

    def search(self, queries: np.ndarray, top_k: int, rerank: bool, filters: Filters = Filters(),
               view: View | None = None) -> list[list[Match]]:
        """Each query's ``top_k`` matches among the items ``filters`` allows, nearest first: plain (squared
        Euclidean distance, 2 - 2 cos) or k-reciprocal re-ranked, every query on its own (its answer does not
        depend on the other queries of the batch). Filters select from the ranking of the whole gallery."""
        view = view or self.view
        queries = check_features(queries, self.feat_dim)
        n = len(view.items)
        if not n or not len(queries):
            return [[] for _ in queries]
        allowed = view.allowed(filters) if filters.active else None
        if rerank:
            positions, distances = self._reranked(view, queries, top_k, allowed)
        else:
            positions, distances = self._plain(view, queries, top_k, allowed)
        return [[Match(r, view.items[int(i)], float(d)) for r, (i, d) in enumerate(zip(row_i, row_d), 1) if i >= 0]
                for row_i, row_d in zip(positions, distances)]

    def _plain(self, view: View, queries: np.ndarray, top_k: int, allowed: np.ndarray | None):
        if allowed is None:
            indices, scores = top_inner_products(queries, view.feats, top_k, max_norm=view.max_norm)
        else:
            subset = np.flatnonzero(allowed)
            if not len(subset):
                return np.zeros((len(queries), 0), np.int64), np.zeros((len(queries), 0), np.float32)
            indices, scores = top_inner_products(queries, view.feats[subset], top_k, max_norm=view.max_norm)
            indices = subset[indices]
        return indices, np.maximum(2 - 2 * scores, 0).astype(np.float32)

    def _reranked(self, view: View, queries: np.ndarray, top_k: int, allowed: np.ndarray | None):
        from reid_deploy.retrieval.graph_rerank import rerank_topk_per_query

        if view.graph is None:
            raise DataError("re-ranking needs the gallery's neighbour graph, and this index has none "
                            "(index.graph_k is 0): search with rerank=false")
        n = len(view.items)
        wanted = top_k if allowed is None else min(n, top_k + int(n - allowed.sum()))
        r = self.rerank
        indices, distances = rerank_topk_per_query(queries, view.feats, view.graph, wanted, r.k1, r.k2,
                                                   r.lambda_value, encoding=view.graph.encoding)
        if allowed is None:
            return indices, distances
        keep = allowed[indices]
        order = np.argsort(~keep, axis=1, kind="stable")[:, :top_k]  # allowed ones first, in rank order
        indices, distances = np.take_along_axis(indices, order, 1), np.take_along_axis(distances, order, 1)
        indices[~np.take_along_axis(keep, order, 1)] = -1
        return indices, distances

    def track_feature(self, camera: str, track_id: str, view: View | None = None) -> np.ndarray:
        """float32 [1, d]: the mean of the stored unit features of one camera's track, renormalised (a track's
        appearance in one query); DataError when the gallery holds no item of it."""
        view = view or self.view
        rows = np.flatnonzero((view.cameras == camera) & (view.tracks == track_id))
        if not len(rows):
            raise DataError(f"no item of track {track_id!r} of camera {camera!r} is stored")
        mean = view.feats[rows].astype(np.float64).mean(0)
        norm = np.linalg.norm(mean)
        if norm < 1e-6:
            raise DataError(f"the features of track {track_id!r} of camera {camera!r} cancel out (mean 0)")
        return (mean / norm).astype(np.float32)[None]

    # ---- the index file ----

    def to_index(self, view: View | None = None) -> GalleryIndex:
        """The view as an index file's contents (``GalleryIndex.save``); items beyond ids in ``service``."""
        view = view or self.view
        n = len(view.items)
        index = GalleryIndex(self.feat_dim, self.fingerprint, replace(self.params, rerank_k1=self.rerank.k1),
                             self.flip, view.feats, [item.id for item in view.items], [None] * n, [None] * n,
                             graph=view.graph)
        index.service = {"log_seq": view.seq, "items": [_item_record(item) for item in view.items]}
        return index

    @classmethod
    def from_index(cls, index: GalleryIndex, rerank: RerankParams) -> Searcher:
        """A searcher holding an index file's items (features copied into memory). Items of an index written
        by ``reid index build`` get their image path as id and the Market-1501 camera of its name (``c3``:
        "3") when it has one."""
        if index.params.index_type != "flat":
            raise DataError(f"reid serve searches flat indexes exactly; this one is {index.params.index_type} "
                            f"(build it with index.index_type=flat; index.graph=hnsw keeps a large graph quick)")
        feats = np.array(index.feats, np.float32)
        service = index.service or {}
        records = service.get("items")
        if records is not None and len(records) == len(index):
            items = tuple(Item(path, **record) for path, record in zip(index.paths, records))
        else:
            items = tuple(Item(path, camera=None if cam is None else str(cam + 1))
                          for path, cam in zip(index.paths, index.camids))
        graph = index.graph
        if graph is not None and not index.has_graph_for(max(rerank.k1 + 1, rerank.k2), rerank.k1):
            graph = None  # built again below for these re-ranking settings
        searcher = cls(index.feat_dim, replace(index.params), rerank, dict(index.fingerprint), index.flip)
        if graph is None and searcher.has_graph and len(feats):
            graph = searcher._new_graph(feats)
        searcher.view = View(feats, items, {item.id: i for i, item in enumerate(items)},
                             _column(items, "camera"), _column(items, "track_id"), _times(items), graph,
                             float(np.linalg.norm(feats, axis=1).max()) if len(feats) else 0.0,
                             int(service.get("log_seq", 0)))
        return searcher


def check_features(feats: Any, feat_dim: int) -> np.ndarray:
    """float32 [n, feat_dim] unit features, or DataError naming what is wrong (shape, NaN, length)."""
    feats = np.asarray(feats, np.float32)
    if feats.ndim != 2 or feats.shape[1] != feat_dim:
        raise DataError(f"features must be vectors of length {feat_dim} (the index's feature dimension), "
                        f"got shape {list(feats.shape)}")
    check_unit_rows(feats, "features")
    return np.ascontiguousarray(feats)


def _column(items: Sequence[Item], name: str) -> np.ndarray:
    out = np.empty(len(items), object)
    out[:] = [getattr(item, name) for item in items]
    return out


def _times(items: Sequence[Item]) -> np.ndarray:
    return np.array([math.nan if item.timestamp is None else item.timestamp for item in items], np.float64)


def _item_record(item: Item) -> dict[str, Any]:
    return {"camera": item.camera, "timestamp": item.timestamp, "track_id": item.track_id, "meta": item.meta}
