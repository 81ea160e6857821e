"""INT8 accuracy: mAP of each INT8 artefact next to FP32, on a model trained here on the synthetic demo data.

The extraction bench measures speed on random weights; whether INT8 keeps the retrieval accuracy needs a
trained model. Full run: Swin-T (the backbone the dynamic-INT8 speed goal is about) trained from scratch
at the demo size on the demo data (``reid demo-data --seed 0``), exported, then dynamic and static INT8
(percentile calibration, the default, on training images), each evaluated on the demo query/gallery
without re-ranking.
Quick run: a slimmed Swin for one epoch (the code path, not a meaningful accuracy).
``python -m bench.bench_int8 [--quick]`` prints a Markdown table.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from bench import DEMO_SPEC, SWIN_T

SCHEDULE = ["train.num_epochs=15", "train.optim.lr_steps=[10,13]", "train.optim.warmup_epochs=3"]


def measure(label: str, overrides: list[str]) -> list[dict]:
    """Train, export with both INT8 kinds and mAP on, and one row per artefact."""
    from reid_deploy.data.synthetic import generate_demo_data
    from reid_deploy.deploy.onnx_export import run_export
    from reid_deploy.spec import load_spec
    from reid_deploy.train.trainer import run_train

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "demo_data"
        generate_demo_data(data, seed=0)
        folders = [f"dataset.train_dataset_dir={data / 'bounding_box_train'}",
                   f"dataset.test_dataset_dir={data / 'bounding_box_test'}",
                   f"dataset.query_dataset_dir={data / 'query'}", f"results_dir={Path(tmp) / 'results'}"]
        spec = load_spec(DEMO_SPEC, [*overrides, *folders, "train.validation_interval=0"])
        start = time.perf_counter()
        trained = run_train(spec)
        train_s = time.perf_counter() - start
        spec = load_spec(DEMO_SPEC, [*overrides, *folders, f"export.checkpoint={trained.checkpoint}",
                                "export.int8=both", "export.eval_map=true"])
        result = run_export(spec, no_encrypt=True)
    rows = [{"model": label, "artefact": "onnxruntime fp32", "min_cosine": 1.0, "mean_cosine": 1.0,
             "mAP": round(100 * result.map_fp32, 2), "mAP_change": 0.0, "train_s": round(train_s)}]
    for kind, info in result.int8.items():
        rows.append({"model": label, "artefact": f"onnxruntime int8 {kind}",
                     "min_cosine": round(info["min_cosine"], 4), "mean_cosine": round(info["mean_cosine"], 4),
                     "mAP": round(100 * info["mAP"], 2),
                     "mAP_change": round(100 * (info["mAP"] - result.map_fp32), 2), "train_s": round(train_s)})
    return rows


def main(quick: bool = False) -> list[dict]:
    if quick:
        tiny_swin = ["model.backbone=swin_tiny_patch4_window7_224", "model.feat_dim=64", "train.num_epochs=1",
                     "model.backbone_args={embed_dim: 16, depths: [1, 1, 1, 1], num_heads: [1, 1, 2, 2]}",
                     "train.optim.warmup_epochs=0", "train.optim.lr_steps=[1]"]
        return measure("tiny swin, 1 epoch", tiny_swin)
    return measure("swin_tiny 128x64, 15 epochs", SWIN_T + SCHEDULE)


if __name__ == "__main__":
    from bench.run import markdown

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="slimmed Swin, one epoch (the code path only)")
    print(markdown(main(parser.parse_args().quick)))
