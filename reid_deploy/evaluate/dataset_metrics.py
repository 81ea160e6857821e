"""Plain metrics (no re-ranking) of one extractor on a query/gallery split: the mAP that training
validation and export's ``eval_map`` report."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from reid_deploy.evaluate.metrics import compute_metrics, squared_euclidean
from reid_deploy.inference.base import FeatureExtractor
from reid_deploy.inference.features import extract_labelled


def dataset_metrics(extractor: FeatureExtractor, query_records: Sequence, gallery_records: Sequence,
                    batch_size: int, flip: bool = False, on_bad_image: str = "skip",
                    max_rank: int = 10) -> dict[str, Any]:
    """``compute_metrics`` of the records' features: mAP, CMC up to ``max_rank``, mINP (fractions)."""
    query, gallery = (extract_labelled(extractor, records, batch_size, 0, flip, on_bad_image, name)
                      for name, records in (("query", query_records), ("gallery", gallery_records)))
    return compute_metrics(squared_euclidean(query.feats, gallery.feats), query.pids, gallery.pids,
                           query.camids, gallery.camids, max_rank=max_rank)


def spec_map(extractor: FeatureExtractor, spec: Any) -> float:
    """mAP (0-1) of ``extractor`` on the spec's query and gallery folders."""
    from reid_deploy.data.market1501 import read_eval

    data = spec.dataset
    query, gallery = read_eval(data.query_dataset_dir, data.test_dataset_dir)
    return float(dataset_metrics(extractor, query, gallery, data.val_batch_size,
                                 on_bad_image=data.on_bad_image)["mAP"])
