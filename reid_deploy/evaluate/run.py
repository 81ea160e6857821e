"""What ``reid evaluate`` and ``reid inference`` do, given a validated spec."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from reid_deploy.console import log, progress
from reid_deploy.errors import DataError, SpecError
from reid_deploy.evaluate.metrics import (
    JUNK_PID,
    MetricsAccumulator,
    RankedList,
    l2_normalize,
    ranked_list,
    squared_euclidean,
)
from reid_deploy.inference.features import (
    LabelledFeatures,
    extract_labelled,
    iter_features,
    load_features_npz,
    save_features_npz,
)
from reid_deploy.spec import ReRankingConfig, Spec

if TYPE_CHECKING:
    from reid_deploy.inference.base import FeatureExtractor

REPORTED_RANKS = (1, 5, 10)
CHUNK_ELEMENTS = 1 << 23  # query x gallery distances per chunk without re-ranking (32 MB)


@dataclass
class EvaluateResult:
    metrics: dict[str, Any]
    metrics_file: Path
    cmc_plot: Path
    matches_plot: Path


def run_evaluate(spec: Spec, features_file: Optional[Path] = None, key_file: Optional[Path] = None
                 ) -> EvaluateResult:
    """Features (from ``features_file`` or ``evaluate.checkpoint``) -> metrics, table, JSON and plots."""
    from reid_deploy.files import RunRecord

    if features_file is not None:
        query, gallery = load_features_npz(features_file)
        source = str(features_file)
    else:
        if not spec.evaluate.checkpoint:
            raise SpecError("nothing to evaluate: set evaluate.checkpoint=MODEL_FILE or pass "
                            "--features FILE.npz")
        source = spec.evaluate.checkpoint
        query, gallery = _extract_splits(spec, spec.evaluate.checkpoint, key_file,
                                         spec.evaluate.query_dataset, spec.evaluate.test_dataset)
    record = RunRecord(spec, "evaluate")
    query, gallery = (split if (split.pids != JUNK_PID).all() else split.select(split.pids != JUNK_PID)
                      for split in (query, gallery))
    if not len(query) or not len(gallery):
        raise DataError(f"nothing to evaluate in {source}: {len(query)} query and {len(gallery)} gallery "
                        f"features left after dropping junk (pid -1)")
    for split in (query, gallery):  # replaced, not copied: one copy of the features stays in memory
        split.feats = l2_normalize(split.feats)
    rr = spec.re_ranking
    sampled = np.sort(np.random.default_rng(0).choice(len(query), min(rr.num_query, len(query)), replace=False))
    rows, ranked = _metrics(query, gallery, rr, max(rr.max_rank, *REPORTED_RANKS), sampled)
    plain = rows["plain"]
    params = f"k1={rr.k1}, k2={rr.k2}, λ={rr.lambda_value:g}" if rr.re_ranking else ""
    final = list(rows.values())[-1]
    metrics = {**_summary(final), "re_ranking": rr.re_ranking,
               "k1": rr.k1 if rr.re_ranking else None, "k2": rr.k2 if rr.re_ranking else None,
               "lambda_value": rr.lambda_value if rr.re_ranking else None,
               "num_query": len(query), "num_gallery": len(gallery),
               "num_valid_queries": final["num_valid_queries"],
               "num_skipped_queries": final["num_skipped_queries"], "source": source}
    if rr.re_ranking:
        metrics["without_re_ranking"] = _summary(plain)
    _print_table(rows, params, len(query), len(gallery), final["num_skipped_queries"])

    from reid_deploy.evaluate.plots import plot_cmc, plot_sampled_matches
    from reid_deploy.files import write_text_atomic

    out = record.dir
    cmc_plot = Path(spec.evaluate.output_cmc_curve_plot or out / "cmc_curve.png")
    matches_plot = Path(spec.evaluate.output_sampled_matches_plot or out / "sampled_matches.png")
    plot_params = params.replace("λ", "lambda")  # the plot's built-in font has no Greek letters
    plot_cmc({f"{name}{f' ({plot_params})' if name == 're-ranked' else ''}: mAP {100 * m['mAP']:.1f}%, "
              f"Rank-1 {100 * m['cmc'][0]:.1f}%": m["cmc"] for name, m in rows.items()}, cmc_plot,
             f"CMC curve ({len(query)} queries, {len(gallery)} gallery images)")
    if not any(query.paths) or not any(gallery.paths):
        log.warning("%s has no %s image paths: the match plot shows placeholders", source,
                    " or ".join(name for name, split in (("query", query), ("gallery", gallery))
                                if not any(split.paths)))
    plot_sampled_matches(ranked, query, gallery, matches_plot, rr.max_rank,
                         f"Sampled queries and their top {rr.max_rank} matches "
                         f"({'re-ranked' if rr.re_ranking else 'plain'} distances; same pid and camera "
                         f"as the query ignored)")
    metrics_file = out / "metrics.json"
    write_text_atomic(metrics_file, json.dumps(metrics, indent=2) + "\n")
    record.status(event="done", source=source, mAP=metrics["mAP"], mINP=metrics["mINP"],
                  cmc_rank_1=metrics["cmc_rank_1"], re_ranking=rr.re_ranking, metrics_file=metrics_file,
                  cmc_curve_plot=cmc_plot, sampled_matches_plot=matches_plot)
    return EvaluateResult(metrics, metrics_file, cmc_plot, matches_plot)


def run_inference(spec: Spec, key_file: Optional[Path] = None) -> Path:
    """Query and gallery features of ``inference.checkpoint`` into ``inference.output_file``."""
    from reid_deploy.files import RunRecord

    inf = spec.inference
    if not inf.checkpoint:
        raise SpecError("no model: set inference.checkpoint=MODEL_FILE")
    out = Path(inf.output_file or spec.command_dir("inference") / "features.npz")
    if out.suffix.lower() not in (".npz", ".json"):
        raise SpecError(f"inference.output_file = {str(out)!r} is not allowed; expected a .npz or .json file")
    if out.suffix.lower() == ".npz":
        query, gallery = _extract_splits(spec, inf.checkpoint, key_file, inf.query_dataset, inf.test_dataset)
        record = RunRecord(spec, "inference")
        save_features_npz(out, query, gallery)
        counts = {"num_query": len(query), "num_gallery": len(gallery)}
    else:
        record = RunRecord(spec, "inference")
        counts = _write_tao_json(spec, out, key_file)
    record.status(event="done", checkpoint=inf.checkpoint, output_file=out, **counts)
    log.info("wrote features of %d query and %d gallery images to %s", counts["num_query"],
             counts["num_gallery"], out)
    return out


def _metrics(query: LabelledFeatures, gallery: LabelledFeatures, rr: ReRankingConfig, max_rank: int,
             sampled: np.ndarray) -> tuple[dict[str, dict[str, Any]], list[RankedList]]:
    """Metrics of the plain distances (and the re-ranked ones when ``rr.re_ranking``), computed chunk by
    chunk of queries as the rows are produced (no query x gallery matrix is ever held), and the ranked
    lists of the ``sampled`` queries under the final distances. Features: L2-normalised."""
    qf, gf = query.feats, gallery.feats
    labels = (query.pids, gallery.pids, query.camids, gallery.camids)
    plain = MetricsAccumulator(*labels, max_rank)
    reranked = MetricsAccumulator(*labels, max_rank) if rr.re_ranking else None
    if rr.re_ranking:
        from reid_deploy.retrieval.rerank import rerank_rows

        chunks = rerank_rows(qf, gf, rr.k1, rr.k2, rr.lambda_value)
    else:
        step = max(1, CHUNK_ELEMENTS // len(gf))
        chunks = ((rows, None, squared_euclidean(qf[rows], gf))
                  for rows in (slice(a, min(a + step, len(qf))) for a in range(0, len(qf), step)))
    ranked = []
    with progress("re-ranking and metrics" if rr.re_ranking else "metrics", len(qf)) as bar, \
            ThreadPoolExecutor(1) as beside:  # the plain metrics beside the re-ranked ones (numpy frees the GIL)
        for rows, final, dist in chunks:
            if reranked is None:
                plain.add(rows, dist)
            else:
                plain_added = beside.submit(plain.add, rows, dist)
                reranked.add(rows, final)
                plain_added.result()
                dist = final
            for q in sampled[(sampled >= rows.start) & (sampled < rows.stop)]:
                ranked.append(ranked_list(int(q), dist[q - rows.start], query.pids[q], query.camids[q],
                                          gallery.pids, gallery.camids, max_rank))
            bar.advance(rows.stop - rows.start)
    results = {"plain": plain.result()}
    if reranked is not None:
        results["re-ranked"] = reranked.result()
    return results, ranked


def _summary(m: dict[str, Any]) -> dict[str, Any]:
    return {"mAP": m["mAP"], "mINP": m["mINP"], **{f"cmc_rank_{r}": m["cmc"][r - 1] for r in REPORTED_RANKS},
            "cmc": m["cmc"]}


def _print_table(rows: dict[str, dict[str, Any]], params: str, n_query: int, n_gallery: int, skipped: int
                 ) -> None:
    from rich.console import Console
    from rich.table import Table

    caption = f"{n_query} queries ({skipped} without a true match skipped), {n_gallery} gallery images" + \
        (f"\nre-ranking: {params}" if params else "")
    table = Table(title="Market-1501 evaluation", caption=caption)
    for column in ("distances", "mAP", "mINP", *(f"Rank-{r}" for r in REPORTED_RANKS)):
        table.add_column(column, justify="left" if column == "distances" else "right", no_wrap=True)
    for name, m in rows.items():
        table.add_row(name, *(f"{100 * v:.2f}%" for v in (m["mAP"], m["mINP"],
                                                          *(m["cmc"][r - 1] for r in REPORTED_RANKS))))
    Console().print(table)


def _folders(spec: Spec, query_dir: Optional[str], gallery_dir: Optional[str]) -> tuple[str, str]:
    return query_dir or spec.dataset.query_dataset_dir, gallery_dir or spec.dataset.test_dataset_dir


def _load(spec: Spec, checkpoint: str, key_file: Optional[Path]) -> FeatureExtractor:
    from reid_deploy.inference.extractors import load_extractor
    from reid_deploy.keys import resolve_key

    return load_extractor(checkpoint, key=resolve_key(key_file, spec.encryption_key),
                          precision=spec.inference.precision, compile=spec.inference.compile)


def _extract_splits(spec: Spec, checkpoint: str, key_file: Optional[Path], query_dir: Optional[str],
                    gallery_dir: Optional[str]) -> tuple[LabelledFeatures, LabelledFeatures]:
    from reid_deploy.data.market1501 import read_eval

    query_records, gallery_records = read_eval(*_folders(spec, query_dir, gallery_dir))
    extractor = _load(spec, checkpoint, key_file)
    data = spec.dataset
    return tuple(extract_labelled(extractor, records, data.val_batch_size, data.num_workers,
                                  spec.model.with_flip_feature, data.on_bad_image, description=name)
                 for name, records in (("query", query_records), ("gallery", gallery_records)))


def _write_tao_json(spec: Spec, out: Path, key_file: Optional[Path]) -> dict[str, int]:
    """TAO's inference JSON, ``[{"img_path": ..., "embedding": [...]}, ...]``, written batch by batch."""
    from reid_deploy.data.market1501 import read_eval
    from reid_deploy.files import atomic_path

    inf, data = spec.inference, spec.dataset
    splits = read_eval(*_folders(spec, inf.query_dataset, inf.test_dataset))
    extractor = _load(spec, inf.checkpoint, key_file)
    counts = {}
    with atomic_path(out) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        fh.write("[")
        written = 0
        for name, records in zip(("query", "gallery"), splits):
            before = written
            for batch in iter_features(extractor, [r.path for r in records], data.val_batch_size,
                                       data.num_workers, spec.model.with_flip_feature, data.on_bad_image,
                                       description=name):
                for path, feat in zip(batch.paths, batch.feats):
                    fh.write(("\n" if written == 0 else ",\n") +
                             json.dumps({"img_path": path, "embedding": feat.tolist()}))
                    written += 1
            counts[f"num_{name}"] = written - before
        fh.write("\n]\n")
    return counts
