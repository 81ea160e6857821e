"""``reid index build``, ``reid index add`` and ``reid search``: extraction, the index file, ranked matches."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from reid_deploy.console import log
from reid_deploy.data.market1501 import IMAGE_SUFFIXES, list_images, parse_name
from reid_deploy.errors import DataError, ModelFileError, ReidError
from reid_deploy.files import RunRecord, write_text_atomic
from reid_deploy.retrieval.feature_files import read_features
from reid_deploy.retrieval.index import (
    GalleryIndex,
    IndexParams,
    bytes_fingerprint,
    check_not_served,
    index_lock,
    model_fingerprint,
    read_header,
)

if TYPE_CHECKING:
    from reid_deploy.inference.extractors import FeatureExtractor
    from reid_deploy.inference.features import ExtractedFeatures
    from reid_deploy.spec import Spec

DISTANCE = "squared Euclidean distance of the L2-normalised features (2 - 2 cos)"
MONTAGE_ROWS = 8


def run_index_build(spec: Spec, model: Path | None, images: Path | None, out: Path, key_file: Path | None = None,
                    features: Path | None = None) -> GalleryIndex:
    """Write a new index file ``out`` of every image in ``images`` (extracted by ``model``), or of the
    gallery split of a ``features`` file (an index without a model fingerprint); with ``index.graph_k`` > 0
    it also holds the gallery's neighbour graph."""
    record = RunRecord(spec, "index")
    flip = spec.model.with_flip_feature
    if _from_features(features, model, images, "--model and --images"):
        feats, paths = read_features(features, "gallery")
        fingerprint: dict[str, Any] = {}
    else:
        extractor, fingerprint = open_model(model, _key(spec, key_file), spec)
        extracted = _extract(spec, extractor, _images(images), flip, "gallery")
        feats, paths = extracted.feats, extracted.paths
    index = GalleryIndex(feats.shape[1], fingerprint, IndexParams.from_spec(spec.index, spec.re_ranking.k1), flip)
    index.add(feats, paths)
    with index_lock(out):
        index.save(out)
    graph = index.graph
    record.status(event="index_built", index=out, images=len(index), feat_dim=index.feat_dim,
                  index_type=index.params.index_type, graph_k=graph.k if graph else 0,
                  graph=graph.method if graph else None, graph_agreement=graph.agreement if graph else None,
                  **({"features": features} if features else fingerprint))
    return index


def run_index_add(spec: Spec, index_path: Path, model: Path | None, images: Path | None,
                  key_file: Path | None = None, features: Path | None = None) -> tuple[int, int]:
    """Add the images of ``images`` (or the gallery split of a ``features`` file) not yet in the index;
    returns (added, total). Extraction runs outside the lock; the load-add-save runs under it, so concurrent
    additions all end up in the index. The neighbour graph is extended exactly."""
    check_not_served(index_path)
    record = RunRecord(spec, "index")
    header, _ = read_header(index_path)
    built = GalleryIndex(header["feat_dim"], header["fingerprint"])
    if _from_features(features, model, images, "--model and --images"):
        feats, paths = read_features(features, "gallery", built.feat_dim)
        if built.fingerprint:
            log.warning("the features of %s cannot be checked against the model that built the index (%s): "
                        "make sure that model made them", features, built.fingerprint.get("model_name"))
        fingerprint: dict[str, Any] = {}
    else:
        extractor, fingerprint = open_model(model, _key(spec, key_file), spec)
        _check_model(built, fingerprint, extractor.feat_dim, index_path)
        known = set(header["paths"])
        new = [p for p in _images(images) if p not in known]
        extracted = _extract(spec, extractor, new, bool(header["flip"]), "new images") if new else None
        feats = extracted.feats if extracted else np.zeros((0, built.feat_dim), np.float32)
        paths = extracted.paths if extracted else []
    with index_lock(index_path):
        index = GalleryIndex.load(index_path)
        if fingerprint and index.fingerprint:
            index.check_model(fingerprint, feats.shape[1])
        known = set(index.paths)
        keep = [i for i, p in enumerate(paths) if p not in known]
        if keep:
            index.add(feats[keep], [paths[i] for i in keep])
            index.save(index_path)
    record.status(event="index_added", index=index_path, added=len(keep), images=len(index),
                  **({"features": features} if features else fingerprint))
    return len(keep), len(index)


def run_search(spec: Spec, index_path: Path, model: Path | None, query: Path | None, out: Path, top_k: int,
               rerank: bool, montage: Path | None = None, key_file: Path | None = None,
               query_features: Path | None = None, per_query: bool = False) -> dict:
    """Rank the index for every query image (extracted by ``model``), or for the query split of a
    ``query_features`` file; write ``{"results": [...]}`` JSON (and a montage PNG); returns the summary
    (queries, seconds, queries/s). Re-ranking uses the index's neighbour graph (built once and saved
    when the index has none, or a narrower one than re_ranking.k1/k2 need). With ``per_query`` every query is
    re-ranked on its own (as ``reid serve`` does) instead of the batch's queries together."""
    record = RunRecord(spec, "search")
    index = GalleryIndex.load(index_path)
    if not len(index):
        raise DataError(f"the index {index_path} holds no images")
    use_features = _from_features(query_features, model, query, "--model and --query")
    if not use_features:
        extractor, fingerprint = open_model(model, _key(spec, key_file), spec)
        _check_model(index, fingerprint, extractor.feat_dim, index_path)
        paths = [str(query.resolve())] if query.is_file() and query.suffix.lower() in IMAGE_SUFFIXES \
            else _images(query)
    rr = spec.re_ranking
    if rerank:
        index = _with_graph(index, index_path, max(rr.k1 + 1, rr.k2), spec)
    index.params.nprobe, index.params.ef_search = spec.index.nprobe, spec.index.ef_search  # search-time knobs
    from reid_deploy.retrieval.graph_rerank import rerank_topk_per_query, rerank_topk_with_graph  # torch: first

    start = time.perf_counter()
    if use_features:
        feats, query_paths = read_features(query_features, "query", index.feat_dim)
    else:
        extracted = _extract(spec, extractor, paths, index.flip, "queries")
        feats, query_paths = extracted.feats, extracted.paths
    searched = time.perf_counter()
    phases: dict[str, float] = {}
    if rerank:
        rerank_topk = rerank_topk_per_query if per_query else rerank_topk_with_graph
        indices, distances = rerank_topk(feats, index.feats, index.graph, top_k, rr.k1, rr.k2, rr.lambda_value,
                                         encoding=index.graph.encoding, phases=phases)
        log.info("re-ranked search: gallery pass %.2f s, set algebra on the CPU %.2f s (weights %.2f, pairs %.2f, "
                 "top k %.2f)", phases["gallery_pass"], sum(phases.values()) - phases["gallery_pass"],
                 phases["weights"], phases["pairs"], phases["select"])
    else:
        indices, distances = index.search(feats, top_k)
    done = time.perf_counter()
    results = [{"query": path, "matches": [_match(index, rank, int(i), float(d))
                                           for rank, (i, d) in enumerate(zip(row_i, row_d), 1) if i >= 0]}
               for path, row_i, row_d in zip(query_paths, indices, distances)]
    distance = (f"k-reciprocal re-ranked distance (Zhong et al. 2017; k1={rr.k1}, k2={rr.k2}, "
                f"lambda={rr.lambda_value}){', each query on its own' if per_query else ''}" if rerank else DISTANCE)
    write_text_atomic(out, json.dumps({"results": results, "distance": distance, "rerank": rerank,
                                       "per_query": per_query, "index": str(index_path)}, indent=1) + "\n")
    if montage:
        write_montage(results, montage, top_k)
    summary = {"queries": len(results), "gallery": len(index), "top_k": top_k, "rerank": rerank,
               "extract_seconds": round(searched - start, 3), "search_seconds": round(done - searched, 4),
               "queries_per_s": round(len(results) / max(done - start, 1e-9), 2),
               "search_queries_per_s": round(len(results) / max(done - searched, 1e-9), 1),
               **({"rerank_phases_seconds": {k: round(v, 4) for k, v in phases.items()}} if phases else {})}
    record.status(event="searched", out=out, **summary)
    return summary


def _from_features(features: Path | None, model: Path | None, images: Path | None, instead: str) -> bool:
    """Whether a command reads a features file (else a model and images); ReidError when it is given
    both or neither."""
    if features is not None and model is None and images is None:
        return True
    if features is None and model is not None and images is not None:
        return False
    raise ReidError(f"give either a features file (--features / --query-features) or {instead}")


def _check_model(index: GalleryIndex, fingerprint: dict[str, Any], feat_dim: int, index_path: Path) -> None:
    """``index.check_model``; an index built from features has no model fingerprint: then only the
    feature dimension is checked, and one warning says so."""
    if index.fingerprint:
        index.check_model(fingerprint, feat_dim)
        return
    if feat_dim != index.feat_dim:
        raise ModelFileError(f"{fingerprint.get('model_name')} makes {feat_dim}-dimensional features but the "
                             f"index {index_path} holds feat_dim {index.feat_dim}")
    log.warning("the index %s was built from a features file and has no model fingerprint: the model %s "
                "cannot be checked against it", index_path, fingerprint.get("model_name"))


def _with_graph(index: GalleryIndex, index_path: Path, needed: int, spec: Spec) -> GalleryIndex:
    """The index with a neighbour graph of at least ``needed`` neighbours and re-ranking weights and sets for
    re_ranking.k1: when it has none (an older file, or index.graph_k=0), a narrower one or weights for
    another k1, they are built once (with progress bars) and saved."""
    k1 = spec.re_ranking.k1
    if index.has_graph_for(needed, k1):
        return index
    with index_lock(index_path):
        index = GalleryIndex.load(index_path, quiet=True)  # another search may have built it meanwhile
        start = time.perf_counter()
        new_graph = index.graph is None or not index.graph.covers(needed)
        if index.ensure_graph(needed, spec.index.graph_k, spec.index.graph, k1):
            index.save(index_path)
            built = f"the neighbour graph ({index.graph.method}, {index.graph.k} neighbours) and " if new_graph else ""
            log.info("computed %sthe re-ranking weights (k1=%d) of %s in %.1f s and saved them", built, k1,
                     index_path, time.perf_counter() - start)
    return index


def _match(index: GalleryIndex, rank: int, i: int, distance: float) -> dict:
    match = {"rank": rank, "path": index.paths[i], "distance": round(distance, 6)}
    if index.pids[i] is not None:
        match.update(pid=index.pids[i], camid=index.camids[i])
    return match


def write_montage(results: list[dict], path: Path, top_k: int) -> None:
    """A PNG grid: each row one query (blue frame) and its top matches, captioned rank and distance; where
    file names carry pids, a match is framed green when its pid is the query's and red otherwise."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from reid_deploy.files import atomic_path

    rows, cols = results[:MONTAGE_ROWS], 1 + min(top_k, 10)
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.15 * cols, 2.3 * len(rows)), squeeze=False,
                             layout="constrained")
    try:
        _draw_montage(fig, axes, rows, cols)
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            fig.savefig(fh, format="png", dpi=100)
    finally:
        plt.close(fig)


def _draw_montage(fig: Any, axes: Any, rows: list[dict], cols: int) -> None:
    """One row of tiles per query (empty tiles where a query has fewer matches), and the title."""
    from PIL import Image

    for axrow, result in zip(axes, rows):
        query = parse_name(Path(result["query"]).name)
        tiles = [(result["query"], "query" + (f" pid {query[0]}" if query else ""), "#2c7bb6")] + \
                [(m["path"], f"#{m['rank']}  d={m['distance']:.3f}", _frame(query, m)) for m in result["matches"]]
        for ax, (image, caption, color) in zip(axrow, tiles + [(None, "", "")] * (cols - len(tiles))):
            ax.set_xticks([])
            ax.set_yticks([])
            if image is None:
                ax.axis("off")
                continue
            try:
                with Image.open(image) as im:
                    ax.imshow(im.convert("RGB").resize((64, 128)))
            except OSError:  # a path from a features file need not be an image here
                caption += "\n(no image)"
            ax.set_xlabel(caption, fontsize=7)
            for spine in ax.spines.values():
                spine.set(color=color, linewidth=3)
    fig.suptitle(f"Top {cols - 1} matches per query, distance ascending\n(blue: query; green: same pid; "
                 f"red: other pid; grey: no pid in the name)", fontsize=9)


def _frame(query: tuple[int, int] | None, match: dict) -> str:
    if query is None or "pid" not in match:
        return "#888888"
    return "#1a9850" if match["pid"] == query[0] else "#d73027"


def _key(spec: Spec, key_file: Path | None) -> str | None:
    from reid_deploy.keys import resolve_key

    return resolve_key(key_file, spec.encryption_key)


def open_model(model: Path, key: str | None, spec: Spec) -> tuple[FeatureExtractor, dict[str, Any]]:
    """The extractor and identity (``inference.identity``) of a model file, with the precision a ``.pth``
    runs at (``inference.precision``); an ONNX model is read (and decrypted) once."""
    from reid_deploy.inference.extractors import OrtExtractor, load_extractor, read_model_bytes, warn_torch_only

    inf = spec.inference
    if model.name.lower().endswith((".onnx", ".onnx.enc")):
        data = read_model_bytes(model, key)
        warn_torch_only(model, inf.precision, inf.compile)
        return OrtExtractor(data, str(model)), bytes_fingerprint(data, model.name)
    extractor = load_extractor(model, key, precision=inf.precision, compile=inf.compile)
    identity = model_fingerprint(model, key)
    if extractor.backend == "pytorch":  # fp16 on CUDA unless inference.precision says otherwise
        identity["precision"] = extractor.precision
    return extractor, identity


def _images(folder: Path) -> list[str]:
    paths = [str(p.resolve()) for p in list_images(folder)]
    if not paths:
        raise DataError(f"no images in {folder}")
    return paths


def _extract(spec: Spec, extractor: FeatureExtractor, paths: list[str], flip: bool, what: str
             ) -> ExtractedFeatures:
    from reid_deploy.inference.features import extract_features

    extracted = extract_features(extractor, paths, spec.index.batch_size, spec.dataset.num_workers, flip,
                                 spec.dataset.on_bad_image, description=what)
    log.info("extracted %d images (%s)", len(extracted.paths), what)
    return extracted
