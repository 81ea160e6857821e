"""Feature-extraction throughput (images/s): PyTorch eager vs ONNX Runtime FP32 / INT8, side by side.

``python -m bench.bench_extract [--quick]`` prints a Markdown table; ``main(quick)`` returns the rows.
Two models (randomly initialised: speed does not depend on the weights): the demo spec's slim ResNet-50
at 128x64 (no dynamic INT8 row: it has no MatMul layers to quantize) and, in the full run, Swin-T at the
seed spec's 384x128. Each cell is the median of timed runs after warm-up, all in one process, in two
rounds (see ``_images_per_second``). On a GPU, PyTorch FP32 and AMP (fp16 autocast) rows are added. The
``cos_fp32`` column is the smallest cosine between a backend's features and PyTorch FP32 on the batch-8
input.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench import DEMO_SPEC, SWIN_T, TALL

BATCHES = (1, 8, 32)


def _images_per_second(fns: dict[str, Callable[[np.ndarray], np.ndarray]], batch: np.ndarray,
                       repeats: int) -> dict[str, float]:
    """Median images/s of every backend on ``batch``: two rounds, the second in reverse backend order.

    Each backend runs as a block (three warm-up calls, then ``repeats // 2`` timed ones) so that a slow
    or fast spell of a shared machine is spread over all backends. Not call-by-call: switching runtimes
    between single calls costs both of them (thread pools waking, caches refilled) up to 2.5x on 2 cores,
    a cost that a deployment running one runtime never pays.
    """
    times: dict[str, list[float]] = {name: [] for name in fns}
    for order in (list(fns), list(fns)[::-1]):
        for name in order:
            for _ in range(3):
                fns[name](batch)
            for _ in range(max(2, repeats // 2)):
                start = time.perf_counter()
                fns[name](batch)
                times[name].append(time.perf_counter() - start)
    return {name: len(batch) / statistics.median(t) for name, t in times.items()}


def _backends(overrides: list[str]) -> tuple[dict[str, Callable[[np.ndarray], np.ndarray]], Any]:
    import torch

    from reid_deploy.data.synthetic import generate_demo_data
    from reid_deploy.deploy.onnx_export import export_proto
    from reid_deploy.deploy.quantize import (
        NothingToQuantize,
        calibration_images,
        quantize_dynamic_bytes,
        quantize_static_bytes,
    )
    from reid_deploy.inference.extractors import OrtExtractor, TorchExtractor
    from reid_deploy.inference.preprocess import Preprocess
    from reid_deploy.model.reid_model import build_model
    from reid_deploy.spec import load_spec

    spec = load_spec(DEMO_SPEC, overrides)
    torch.manual_seed(0)
    model = build_model(spec).eval()
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    fp32 = export_proto(model, spec, 18)[0].SerializeToString()
    with tempfile.TemporaryDirectory() as tmp:
        generate_demo_data(tmp, ids=4, cams=2, seed=0, images_per_camera=2, distractors=0, junk=0)
        images = calibration_images(Path(tmp) / "bounding_box_train", 16)
        static = quantize_static_bytes(fp32, Preprocess.from_spec(spec), images, 8, "percentile")
    fns: dict[str, Callable[[np.ndarray], np.ndarray]] = {
        "pytorch eager fp32 (cpu)": TorchExtractor(model, spec, "cpu"),
        "onnxruntime fp32": OrtExtractor(fp32, device="cpu", threads=threads),
    }
    try:
        fns["onnxruntime int8 dynamic"] = OrtExtractor(quantize_dynamic_bytes(fp32), device="cpu", threads=threads)
    except NothingToQuantize:
        pass  # a convolutional backbone: no row (export writes no dynamic INT8 model for it either)
    fns["onnxruntime int8 static (Q/DQ)"] = OrtExtractor(static, device="cpu", threads=threads)
    if torch.cuda.is_available():
        gpu = TorchExtractor(build_model(spec).eval(), spec, "cuda")
        gpu.model.load_state_dict(model.state_dict())
        fns["pytorch fp32 (cuda)"] = gpu

        def amp(batch: np.ndarray) -> np.ndarray:
            with torch.autocast("cuda", dtype=torch.float16):
                return gpu(batch)

        fns["pytorch amp fp16 (cuda)"] = amp
    return fns, spec


def measure(label: str, overrides: list[str], repeats: int) -> list[dict]:
    """Rows of one model: every backend at every batch size, with speed-up over PyTorch eager."""
    fns, spec = _backends(overrides)
    shape = (3, spec.model.input_height, spec.model.input_width)
    batches = {n: np.random.default_rng(n).standard_normal((n, *shape)).astype(np.float32) for n in BATCHES}
    reference = fns["pytorch eager fp32 (cpu)"](batches[8])
    cosines = {name: float((fn(batches[8]) * reference).sum(axis=1).min()) for name, fn in fns.items()}
    rows = []
    for n, batch in batches.items():
        for name, speed in _images_per_second(fns, batch, repeats).items():
            rows.append({"model": label, "backend": name, "batch": n, "images_per_s": round(speed, 1),
                         "cos_fp32": round(cosines[name], 5)})
    rows.sort(key=lambda r: list(fns).index(r["backend"]))  # one backend's batch sizes together
    base = {r["batch"]: r["images_per_s"] for r in rows if r["backend"] == "pytorch eager fp32 (cpu)"}
    for row in rows:
        row["speedup_vs_eager"] = round(row["images_per_s"] / base[row["batch"]], 2)
    return rows


def main(quick: bool = False) -> list[dict]:
    rows = measure("demo spec (slim resnet_50 128x64)", [], 3 if quick else 10)
    if not quick:
        rows += measure("swin_tiny 384x128", SWIN_T + TALL, 5)
    return rows


if __name__ == "__main__":
    from bench.run import markdown

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="demo model only, fewer repeats (about a minute)")
    print(markdown(main(parser.parse_args().quick)))
