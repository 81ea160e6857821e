"""Training throughput (images/s): the bare step, and the trainer with its data loading at the same batch.

Bare step (``loop=bare step``): forward, ID + triplet loss, backward, optimiser step on a synthetic P x K
batch already on the device; the batch size over the median step time after one warm-up step. The demo
spec's model and Swin-T at the demo size (128x64) and at 384x128, on CPU and, when present, CUDA with AMP
off / bf16 / fp16.

Trainer (``loop=trainer``): ``reid train``'s loop on demo JPEGs drawn for the run: worker processes decode,
resize and augment uint8 batches, the device normalises and erases, then the same step; images over the
seconds of the second epoch (the persistent workers already running). ``of_bare_step`` divides it by a bare
step measured just before at the same batch. CPU: fp32, one worker, small batches; CUDA (when present):
Swin-T 384x128, bf16, batch 64 (the goal: >= 0.8 of the bare step).
``python -m bench.bench_train [--quick] [--gpu]`` prints a Markdown table (``--gpu``: the CUDA rows only, bare
steps of Swin-T 384x128 at batch 64).
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench import DEMO_SPEC, SWIN_T, TALL
from reid_deploy import console
from reid_deploy.data.synthetic import generate_demo_data
from reid_deploy.model.losses import ReidLoss
from reid_deploy.model.reid_model import build_model
from reid_deploy.spec import load_spec
from reid_deploy.train.optim import make_optimizer
from reid_deploy.train.trainer import run_train


def _configs(quick: bool, gpu_only: bool = False) -> list[tuple[str, list[str], int]]:
    """(name, overrides of specs/demo.yaml, batch size)."""
    if gpu_only:
        return [("swin_tiny 384x128", SWIN_T + TALL, 64)]
    return [("demo spec", [], 32), ("swin_tiny (demo size)", SWIN_T, 32),
            ("swin_tiny 384x128", SWIN_T + TALL, 8 if quick else 32)]


def measure(overrides: list[str], batch: int, device: str, amp: str, steps: int) -> float:
    """Images per second: batch size over the median of ``steps`` timed training steps (after a warm-up)."""
    spec = load_spec(DEMO_SPEC, [*overrides, f"dataset.batch_size={batch}", "dataset.num_instances=4"])
    torch.manual_seed(0)
    model = build_model(spec).to(device).train()
    loss_fn = ReidLoss(spec).to(device)
    optimizer = make_optimizer(model, spec.train.optim)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    scaler = torch.amp.GradScaler("cuda", enabled=amp == "fp16")
    images = torch.randn(batch, 3, spec.model.input_height, spec.model.input_width, device=device)
    labels = torch.arange(batch, device=device) // 4 % spec.dataset.num_classes

    def step() -> None:
        with torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits, feats = model(images)
            loss = loss_fn(logits, feats, labels).total
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    def timed_step() -> float:
        start = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    timed_step()
    return batch / statistics.median(timed_step() for _ in range(steps))


def measure_trainer(overrides: list[str], batch: int, device: str, amp: str, workers: int, steps: int) -> float:
    """Images per second of ``reid train``'s second epoch of about ``steps`` batches of demo JPEGs."""
    ids = math.ceil(steps * batch / 7)  # demo data: about 7.5 PK-sampled training images per identity
    with tempfile.TemporaryDirectory() as folder:
        data = Path(folder) / "data"
        generate_demo_data(data, ids=ids, cams=4, seed=0, distractors=0, junk=0)
        spec = load_spec(DEMO_SPEC, [
            *overrides, f"dataset.batch_size={batch}", "dataset.num_instances=4", f"dataset.num_classes={ids}",
            f"dataset.num_workers={workers}", f"dataset.train_dataset_dir={data / 'bounding_box_train'}",
            f"train.results_dir={Path(folder) / 'out'}", f"train.device={device}", f"train.amp='{amp}'",
            "train.num_epochs=2", "train.validation_interval=0", "train.checkpoint_interval=2"])
        return run_train(spec).history[-1]["images_per_s"]


def _trainer_configs(quick: bool, gpu_only: bool = False) -> list[tuple[str, list[str], int, str, str, int, int]]:
    """(name, overrides, batch, device, amp, workers, steps per epoch)."""
    configs = [] if gpu_only else [("demo spec", [], 16 if quick else 32, "cpu", "off", 1, 4 if quick else 8)]
    if not quick and not gpu_only:
        configs.append(("swin_tiny 384x128", SWIN_T + TALL, 8, "cpu", "off", 1, 6))
    if torch.cuda.is_available():
        workers = max(1, min(12, len(os.sched_getaffinity(0)) - 2))
        configs.append(("swin_tiny 384x128", SWIN_T + TALL, 64, "cuda", "bf16", workers, 10 if quick else 40))
    return configs


def main(quick: bool = False, gpu_only: bool = False) -> list[dict]:
    console.setup(quiet=True)  # no progress bars from the trainer rows
    rows = []
    cuda = [("cuda", a) for a in ("off", "bf16", "fp16")] if torch.cuda.is_available() else []
    runs = cuda if gpu_only else [("cpu", "off")] + cuda
    for name, overrides, batch in _configs(quick, gpu_only):
        for device, amp in runs:
            steps = (3 if quick else 5) if device == "cpu" else (5 if quick else 30)
            spec = load_spec(DEMO_SPEC, overrides)
            rows.append({"model": name, "input": f"{spec.model.input_height}x{spec.model.input_width}",
                         "device": device, "amp": amp, "batch": batch, "threads": torch.get_num_threads(),
                         "loop": "bare step", "images_per_s": round(measure(overrides, batch, device, amp, steps), 1)})
    for name, overrides, batch, device, amp, workers, steps in _trainer_configs(quick, gpu_only):
        spec = load_spec(DEMO_SPEC, overrides)
        bare = measure(overrides, batch, device, amp, 3 if device == "cpu" else 20)
        trainer = measure_trainer(overrides, batch, device, amp, workers, steps)
        rows.append({"model": name, "input": f"{spec.model.input_height}x{spec.model.input_width}",
                     "device": device, "amp": amp, "batch": batch, "threads": torch.get_num_threads(),
                     "loop": "trainer", "workers": workers, "images_per_s": trainer,
                     "bare_step_images_per_s": round(bare, 1), "of_bare_step": round(trainer / bare, 2)})
    return rows


if __name__ == "__main__":
    from bench.run import markdown

    print(markdown(main(quick="--quick" in sys.argv, gpu_only="--gpu" in sys.argv)))
