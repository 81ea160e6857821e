"""Training-step throughput (images/s): the demo spec's model and Swin-T at the demo size (128x64) and at
384x128, on CPU and, when present, CUDA with AMP off / bf16 / fp16.

One step = forward, ID + triplet loss, backward, optimiser step on a synthetic P x K batch (no data
loading); a cell is the batch size over the median step time after one warm-up step.
``python -m bench.bench_train [--quick]`` prints a Markdown table.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from bench import DEMO_SPEC, SWIN_T, TALL
from reid_deploy.model.losses import ReidLoss
from reid_deploy.model.reid_model import build_model
from reid_deploy.spec import load_spec
from reid_deploy.train.optim import make_optimizer


def _configs(quick: bool) -> list[tuple[str, list[str], int]]:
    """(name, overrides of specs/demo.yaml, batch size)."""
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


def main(quick: bool = False) -> list[dict]:
    rows = []
    runs = [("cpu", "off")] + ([("cuda", a) for a in ("off", "bf16", "fp16")] if torch.cuda.is_available() else [])
    for name, overrides, batch in _configs(quick):
        for device, amp in runs:
            steps = (3 if quick else 5) if device == "cpu" else (5 if quick else 30)
            spec = load_spec(DEMO_SPEC, overrides)
            rows.append({"model": name, "input": f"{spec.model.input_height}x{spec.model.input_width}",
                         "device": device, "amp": amp, "batch": batch, "threads": torch.get_num_threads(),
                         "images_per_s": round(measure(overrides, batch, device, amp, steps), 1)})
    return rows


if __name__ == "__main__":
    from bench.run import markdown

    print(markdown(main(quick="--quick" in sys.argv)))
