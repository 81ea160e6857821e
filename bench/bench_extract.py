"""Feature-extraction throughput (images/s), in two tables.

Backends (rows without ``path``): PyTorch eager vs ONNX Runtime FP32 / INT8 on normalised float32 batches
already in memory. Two models (randomly initialised: speed does not depend on the weights): the demo
spec's slim ResNet-50 at 128x64 (no dynamic INT8 row: it has no MatMul layers to quantize) and, in the
full run, Swin-T at the seed spec's 384x128. Each cell is the median of timed runs after warm-up, all in
one process, in two rounds (see ``_images_per_second``). ``cos_fp32`` is the smallest cosine between a
backend's features and PyTorch FP32 on the batch-8 input.

Disk to features (rows with ``path``), side by side at one batch size: ``model alone`` is
``FeatureExtractor.features`` on a uint8 batch already on the device (normalise + forward, batches back to
back); ``end to end`` is the extraction call of ``reid index build`` (``extract_features`` over JPEG files
with the spec's ``dataset.num_workers``, capped at the usable CPUs: worker start, decoding, resizing,
copies and the model), images over its whole wall time, as a fraction ``of_model_alone``; the loader alone
(uint8 batches, no model) in images/s per worker, measured after its first batch. CPU: Swin-T 384x128,
batch 32 (demo model in ``--quick``); CUDA, when present: Swin-T 384x128 at batch 128 over 12,288 files in fp32 (TF32),
fp16, bf16 and fp16 compiled (that one also with a worker per usable CPU). ``cos_fp32``: smallest cosine
of the first batch's features to CPU fp32. The loader workers' fork server is started first, as the CLI
does.

``python -m bench.bench_extract [--quick] [--gpu]`` prints a Markdown table (``--gpu``: the CUDA
disk-to-features rows only); ``main(quick)`` returns the rows.
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

from bench import DEMO_SPEC, SWIN_T, TALL, shown

BATCHES = (1, 8, 32)
GPU_IMAGES = 12_288  # files of the CUDA end-to-end rows (the index build: 11,290)


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
        "pytorch eager fp32 (cpu)": TorchExtractor(model, spec, "cpu", precision="fp32"),
        "onnxruntime fp32": OrtExtractor(fp32, device="cpu", threads=threads),
    }
    try:
        fns["onnxruntime int8 dynamic"] = OrtExtractor(quantize_dynamic_bytes(fp32), device="cpu", threads=threads)
    except NothingToQuantize:
        pass  # a convolutional backbone: no row (export writes no dynamic INT8 model for it either)
    fns["onnxruntime int8 static (Q/DQ)"] = OrtExtractor(static, device="cpu", threads=threads)
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


def _image_files(folder: Path, count: int) -> list[str]:
    """``count`` Market-style JPEG files (64x128 demo people, copied round-robin under new names)."""
    import shutil

    from reid_deploy.data.market1501 import list_images
    from reid_deploy.data.synthetic import generate_demo_data

    generate_demo_data(folder / "source", ids=8, cams=3, seed=0, images_per_camera=3, distractors=0, junk=0)
    sources = list_images(folder / "source" / "bounding_box_train")
    paths = []
    for i in range(count):
        path = folder / f"{i:06d}.jpg"
        shutil.copyfile(sources[i % len(sources)], path)
        paths.append(str(path))
    return paths


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _model_alone(extractor: Any, images: Any, calls: int) -> float:
    """images/s of ``extractor.features`` on a uint8 batch on its device, ``calls`` batches back to back."""
    for _ in range(2):
        extractor.features(images)
    _sync(extractor.device)
    start = time.perf_counter()
    for _ in range(calls):
        extractor.features(images)
    _sync(extractor.device)
    return calls * len(images) / (time.perf_counter() - start)


def _loader_alone(paths: list[str], preprocess: Any, batch: int, workers: int, pin: bool) -> float:
    """images/s of the uint8 loader, counted from its first batch (start-up excluded)."""
    from reid_deploy.inference.loader import image_batches

    with image_batches(paths, preprocess, batch, workers, pin) as batches:
        next(batches)
        start, count = time.perf_counter(), 0
        for loaded in batches:
            count += len(loaded.indices)
    return count / (time.perf_counter() - start)


def _cosine(feats: np.ndarray, reference: np.ndarray) -> float:
    return round(float((feats * reference).sum(axis=1).min()), 5)


def disk_to_features(label: str, extractor: Any, setting: str, paths: list[str], batch: int, num_workers: int,
                     reference: np.ndarray, rounds: int, calls: int) -> list[dict]:
    """The model-alone and end-to-end rows of one extractor (medians over ``rounds`` alternating rounds)."""
    import torch

    from reid_deploy.inference.features import extract_features
    from reid_deploy.inference.loader import loader_workers

    pre = extractor.preprocess
    first = torch.from_numpy(np.stack([pre.load_uint8(p) for p in paths[:batch]])).to(extractor.device)
    alone_feats = extractor.features(first).cpu().numpy()
    workers = loader_workers(num_workers, len(paths), batch)
    alone, whole, loader = [], [], []
    for _ in range(rounds):
        alone.append(_model_alone(extractor, first, calls))
        start = time.perf_counter()
        result = extract_features(extractor, paths, batch, num_workers, description="bench")
        whole.append(len(paths) / (time.perf_counter() - start))
        loader.append(_loader_alone(paths, pre, batch, workers, extractor.device.type == "cuda"))
    model_speed, end_speed = statistics.median(alone), statistics.median(whole)
    common = {"model": label, "backend": setting, "batch": batch}
    return [
        {**common, "path": "model alone", "images_per_s": round(model_speed, 1),
         "cos_fp32": _cosine(alone_feats, reference)},
        {**common, "path": "end to end (index build)", "images_per_s": round(end_speed, 1),
         "cos_fp32": _cosine(result.feats[:batch], reference), "of_model_alone": round(end_speed / model_speed, 3),
         "images": len(paths), "workers": workers,
         "loader_per_worker": round(statistics.median(loader) / max(workers, 1), 1)},
    ]


def pipeline(quick: bool, gpu_only: bool = False) -> list[dict]:
    """Disk-to-features rows: CPU (unless ``gpu_only``) and, when CUDA is present, the GPU precisions."""
    import copy

    import torch

    from reid_deploy.inference.extractors import TorchExtractor
    from reid_deploy.inference.loader import start_worker_server, usable_cpus
    from reid_deploy.model.reid_model import build_model
    from reid_deploy.spec import load_spec

    start_worker_server()  # as the CLI does: torch imports into the fork server meanwhile
    overrides, label = ([], "demo spec (slim resnet_50 128x64)") if quick else (SWIN_T + TALL, "swin_tiny 384x128")
    spec = load_spec(DEMO_SPEC, overrides + ["dataset.num_workers=8"])
    torch.manual_seed(0)
    model = build_model(spec).eval()
    cpu = TorchExtractor(model, spec, "cpu", precision="fp32")
    def reference(paths: list[str]) -> np.ndarray:
        return cpu.features(torch.from_numpy(np.stack([cpu.preprocess.load_uint8(p) for p in paths]))).numpy()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if not gpu_only:
            batch, paths = 32, _image_files(Path(tmp) / "cpu", 96 if quick else 192)
            rows += disk_to_features(label, cpu, "pytorch fp32 (cpu)", paths, batch, spec.dataset.num_workers,
                                     reference(paths[:batch]), 1 if quick else 2, 2 if quick else 3)
        if torch.cuda.is_available():
            batch, paths = 128, _image_files(Path(tmp) / "gpu", 512 if quick else GPU_IMAGES)
            expected, gpu_model = reference(paths[:batch]), copy.deepcopy(model).to("cuda")
            for precision, compiled in (("fp32", False), ("fp16", False), ("bf16", False), ("fp16", True)):
                extractor = TorchExtractor(gpu_model, spec, "cuda", precision=precision, compile=compiled)
                rows += shown(disk_to_features(label, extractor, f"pytorch {extractor.setting} (cuda)", paths,
                                                batch, spec.dataset.num_workers, expected, 1 if quick else 2,
                                                5 if quick else 20))
            if usable_cpus() > spec.dataset.num_workers:  # the fastest setting with a worker per usable CPU
                rows += shown(disk_to_features(label, extractor, f"pytorch {extractor.setting} (cuda)", paths,
                                                batch, usable_cpus(), expected, 1 if quick else 2,
                                                5 if quick else 20)[1:])
    return rows



def main(quick: bool = False) -> list[dict]:
    rows = measure("demo spec (slim resnet_50 128x64)", [], 3 if quick else 10)
    if not quick:
        rows += measure("swin_tiny 384x128", SWIN_T + TALL, 5)
    return rows + pipeline(quick)


if __name__ == "__main__":
    from bench.run import markdown

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="demo model only, fewer repeats (about a minute)")
    parser.add_argument("--gpu", action="store_true", help="only the CUDA disk-to-features rows")
    args = parser.parse_args()
    print(markdown(pipeline(args.quick, gpu_only=True) if args.gpu else main(args.quick)))
