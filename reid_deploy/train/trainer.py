"""The training loop: data, model, losses, optimisers, checkpoints, resume, validation, AMP and DDP.

Run under ``torchrun`` (``WORLD_SIZE`` > 1) for DDP: one process per GPU (or CPU processes with gloo);
``dataset.batch_size`` is per process; only rank 0 writes files. Each completed epoch appends one line to
``status.json``; checkpoints hold model, optimisers, scheduler, AMP scaler, the torch RNG state of every
rank, the epoch and the resolved spec, so a resumed run replays the remaining epochs exactly (on CPU in
deterministic mode). Checkpoints are written at epoch boundaries: a run killed mid-epoch resumes at the
start of the epoch after its latest checkpoint. Batches come from ``train.loader`` (uint8 from persistent
worker processes, finished on the device); on CUDA a step's loss and accuracy are read one step later, so
the host never makes the device wait between steps.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from reid_deploy import console
from reid_deploy.console import log, progress
from reid_deploy.data.dataset import SeededBatches, TrainDataset, readable_records
from reid_deploy.data.market1501 import read_eval, read_train
from reid_deploy.data.samplers import IdentityBatchSampler, ShuffledBatchSampler
from reid_deploy.data.transforms import TrainTransform
from reid_deploy.errors import DataError, ModelFileError, SpecError
from reid_deploy.files import RunRecord, write_text_atomic
from reid_deploy.inference.preprocess import Preprocess
from reid_deploy.model.checkpoint import read_checkpoint, save_checkpoint
from reid_deploy.model.losses import ReidLoss
from reid_deploy.model.pretrained import load_pretrained
from reid_deploy.model.reid_model import ReidModel, build_model
from reid_deploy.spec import ModelConfig, Spec
from reid_deploy.train.loader import DeviceBatches, train_loader
from reid_deploy.train.optim import make_center_optimizer, make_optimizer, make_scheduler, rescale_center_grad

LATEST = "reid_model_latest.pth"
STEP_NUMBERS = ("loss", "id_loss", "metric_loss", "acc")


@dataclass
class TrainResult:
    model: ReidModel
    checkpoint: Path | None
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def checkpoint_name(epoch: int) -> str:
    return f"reid_model_epoch_{epoch:03d}.pth"


def run_train(spec: Spec) -> TrainResult:
    """Train as ``spec`` says; returns the trained model (unwrapped), the last checkpoint and the history."""
    ddp = _init_distributed(spec)
    try:
        return _Trainer(spec, ddp).fit()
    finally:
        if ddp.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _init_distributed(spec: Spec) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    cuda = spec.train.device != "cpu" and torch.cuda.is_available()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    if dist.get_rank() != 0:  # one progress bar and one log: rank 0's
        console.setup(quiet=True)
    return _Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def _device(spec: Spec, ddp: _Dist) -> torch.device:
    want = spec.train.device
    if want == "cuda" and not torch.cuda.is_available():
        raise SpecError("spec error: train.device = cuda but no CUDA device is available")
    if want != "cpu" and torch.cuda.is_available():
        torch.cuda.set_device(ddp.local_rank)
        return torch.device("cuda", ddp.local_rank)
    return torch.device("cpu")


def warn_no_effect(model: ModelConfig) -> list[str]:
    """Warnings for keys set away from their default where the backbone ignores them."""
    notes = []
    if model.backbone.startswith("swin") and model.last_stride != 1:
        notes.append(f"model.last_stride={model.last_stride} has no effect for {model.backbone}")
    if model.stride_size != [16, 16]:
        notes.append(f"model.stride_size={model.stride_size} has no effect for {model.backbone} (TAO/SOLIDER "
                     f"use it for ViT backbones only)")
    if model.pretrain_hw_ratio != 2.0:
        notes.append(f"model.pretrain_hw_ratio={model.pretrain_hw_ratio} has no effect for {model.backbone} "
                     f"(TAO/SOLIDER use it for ViT position embeddings only)")
    for note in notes:
        log.warning(note)
    return notes


class _Trainer:
    def __init__(self, spec: Spec, ddp: _Dist):
        self.spec, self.ddp = spec, ddp
        train, data = spec.train, spec.dataset
        self.device = _device(spec, ddp)
        self.amp_dtype = {"off": None, "fp16": torch.float16, "bf16": torch.bfloat16}[train.amp]
        if self.amp_dtype is not None and self.device.type != "cuda":
            log.warning("train.amp=%s needs CUDA; training in float32 on %s", train.amp, self.device)
            self.amp_dtype = None
        if train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        torch.manual_seed(train.seed + ddp.rank)
        warn_no_effect(spec.model)
        records = readable_records(read_train(data.train_dataset_dir, data.num_classes),
                                   spec.model.input_channels, data.on_bad_image)
        if train.validation_interval:
            self.eval_records = read_eval(data.query_dataset_dir, data.test_dataset_dir)
        preprocess, augment = Preprocess.from_spec(spec), TrainTransform.from_spec(spec)
        dataset = TrainDataset(records, preprocess.to_uint8, augment, spec.model.input_channels)
        if data.sampler == "softmax":
            sampler = ShuffledBatchSampler(len(records), data.batch_size, train.seed, ddp.rank, ddp.world)
        else:
            sampler = IdentityBatchSampler([r.pid for r in records], data.batch_size, data.num_instances,
                                           train.seed, ddp.rank, ddp.world)
        self.batches = SeededBatches(sampler, (train.seed, ddp.rank))
        self.workers = min(data.num_workers, len(os.sched_getaffinity(0)))
        if self.workers < data.num_workers:
            log.warning("dataset.num_workers=%d lowered to %d, the CPUs this process may use", data.num_workers,
                        self.workers)
        if len(self.batches) == 0:
            raise DataError(f"{len(records)} training images give no full batch of {data.batch_size} "
                            f"(x {ddp.world} processes); lower dataset.batch_size")
        self.input = DeviceBatches(train_loader(dataset, self.batches, self.workers, self.device, train.seed),
                                   preprocess, augment, self.device, data.on_bad_image)
        self.model = build_model(spec)
        load_pretrained(self.model, spec.model.pretrain_choice, spec.model.pretrained_model_path)
        self.model.to(self.device)
        self.loss = ReidLoss(spec).to(self.device)
        self.optimizer = make_optimizer(self.model, train.optim)
        self.center_optimizer = make_center_optimizer(self.loss.center, train.optim) if self.loss.center else None
        self.scheduler = make_scheduler(self.optimizer, train.optim, train.num_epochs)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.net: torch.nn.Module = self.model
        if ddp.world > 1:
            self.net = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=not self.loss.use_id)
        self.out = spec.command_dir("train")
        self.start_epoch = 0
        if train.resume_training_checkpoint_path:
            self.start_epoch = self._resume(train.resume_training_checkpoint_path)
        self.record = RunRecord(spec, "train", write=ddp.main)
        self.history: list[dict[str, Any]] = []

    # ---- loop -------------------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        train = self.spec.train
        if self.start_epoch:
            self._drop_status_after(self.start_epoch)
        elif train.validation_interval:
            self._log(epoch=0, **self._validate())
        last = None
        for epoch in range(self.start_epoch + 1, train.num_epochs + 1):
            stats = self._train_epoch(epoch)
            if train.validation_interval and (epoch % train.validation_interval == 0 or epoch == train.num_epochs):
                stats.update(self._validate())
            self._log(**stats)
            if epoch % train.checkpoint_interval == 0 or epoch == train.num_epochs:
                last = self._save(epoch)
        return TrainResult(self.model, last, self.history)

    def _train_epoch(self, epoch: int) -> dict[str, Any]:
        self.batches.set_epoch(epoch - 1)
        self.net.train()
        lr = self.optimizer.param_groups[0]["lr"]
        totals = dict.fromkeys(STEP_NUMBERS, 0.0)
        steps = images = 0
        in_flight: deque[_StepNumbers] = deque()

        def settle(keep: int) -> None:
            """Add the numbers of the oldest steps to ``totals`` until ``keep`` steps are left in flight."""
            nonlocal steps
            while len(in_flight) > keep:
                for name, value in zip(STEP_NUMBERS, in_flight.popleft().read()):
                    totals[name] += value
                steps += 1

        # on CUDA a step's numbers are read one step later: the device never waits for the host in between
        lag = 1 if self.device.type == "cuda" else 0
        start = time.perf_counter()
        title = f"epoch {epoch}/{self.spec.train.num_epochs}"
        with progress(title, total=len(self.batches)) as bar:
            for batch in self.input:
                if batch is not None:
                    in_flight.append(self._step(*batch))
                    images += len(batch[1])
                settle(lag)
                rate = images / max(time.perf_counter() - start, 1e-9)
                bar.advance(1, loss=totals["loss"] / max(steps, 1), acc=totals["acc"] / max(steps, 1), lr=lr,
                            img_s=round(rate, 1))
            settle(0)
        self.scheduler.step()
        if self.ddp.world > 1:  # BN running statistics: rank 0's, so every rank holds the same model
            for buffer in self.model.buffers():
                dist.broadcast(buffer, 0)
        seconds = time.perf_counter() - start
        if not math.isfinite(totals["loss"]):
            raise DataError(f"training diverged in epoch {epoch} (loss {totals['loss']}); lower train.optim.base_lr")
        return {"epoch": epoch, **{k: v / max(steps, 1) for k, v in totals.items()}, "lr": lr,
                "seconds": round(seconds, 2), "images_per_s": round(images / max(seconds, 1e-9), 1)}

    def _step(self, images: torch.Tensor, labels: torch.Tensor) -> _StepNumbers:
        """One optimisation step on a device batch; its numbers are copied off the device without waiting."""
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None):
            logits, feats = self.net(images)
            parts = self.loss(logits, feats, labels)
        self.optimizer.zero_grad(set_to_none=True)
        if self.center_optimizer:
            self.center_optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(parts.total).backward()
        clip = self.spec.train.clip_grad_norm
        if clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        self.scaler.step(self.optimizer)
        if self.center_optimizer:
            self._center_step()
        self.scaler.update()
        acc = (logits.argmax(dim=1) == labels).float().mean() if self.loss.use_id else parts.total.new_zeros(())
        return _StepNumbers(torch.stack([parts.total.detach().float(), parts.id_loss.float(),
                                         parts.metric_loss.float(), acc]))

    def _center_step(self) -> None:
        """Centres: gradient averaged over ranks, unscaled, divided by the loss weight, SGD at center_lr."""
        self.scaler.unscale_(self.center_optimizer)
        if self.ddp.world > 1:
            for param in self.loss.center.parameters():
                dist.all_reduce(param.grad)
                param.grad /= self.ddp.world
        rescale_center_grad(self.loss.center, self.spec.train.optim.center_loss_weight)
        self.scaler.step(self.center_optimizer)

    # ---- validation, status, checkpoints ----------------------------------------------------------
    def _validate(self) -> dict[str, float]:
        """mAP and CMC on the query/gallery folders (rank 0; no re-ranking)."""
        result: dict[str, float] = {}
        if self.ddp.main:
            from reid_deploy.evaluate.dataset_metrics import dataset_metrics
            from reid_deploy.inference.extractors import TorchExtractor

            extractor = TorchExtractor(self.model, self.spec, str(self.device), precision="fp32")
            data = self.spec.dataset
            m = dataset_metrics(extractor, *self.eval_records, data.val_batch_size,
                                self.spec.model.with_flip_feature, data.on_bad_image)
            result = {"mAP": m["mAP"], **{f"cmc_rank_{r}": m["cmc"][r - 1] for r in (1, 5, 10)}}
            log.info("validation: mAP %.4f  rank-1 %.4f", result["mAP"], result["cmc_rank_1"])
        if self.ddp.world > 1:
            dist.barrier()
        return result

    def _log(self, **fields: Any) -> None:
        self.history.append(fields)
        self.record.status(**fields)
        if "loss" in fields:
            log.info("epoch %d: loss %.4f  acc %.3f  lr %.3g  %.1f s", fields["epoch"], fields["loss"],
                     fields["acc"], fields["lr"], fields["seconds"])

    def _drop_status_after(self, epoch: int) -> None:
        """Forget status lines of epochs that the resumed run will train again (rank 0)."""
        path = self.record.dir / "status.json"
        if not self.ddp.main or not path.is_file():
            return
        lines = path.read_text().splitlines(keepends=True)
        kept = [line for line in lines if not _is_train_epoch_after(line, epoch)]
        if len(kept) != len(lines):
            log.warning("status.json: dropped %d line(s) of epochs after %d, trained again now",
                        len(lines) - len(kept), epoch)
            write_text_atomic(path, "".join(kept))

    def _rng_states(self) -> list[dict[str, torch.Tensor]]:
        """The torch RNG states (CPU, and CUDA when used) of every rank, rank order."""
        state = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        if self.ddp.world == 1:
            return [state]
        states: list[Any] = [None] * self.ddp.world
        dist.all_gather_object(states, state)
        return states

    def _save(self, epoch: int) -> Path:
        rng = self._rng_states()
        path = self.out / checkpoint_name(epoch)
        if self.ddp.main:
            state = {"epoch": epoch, "optimizer": self.optimizer.state_dict(),
                     "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                     "rng": {"torch": rng, "world_size": self.ddp.world}}
            if self.center_optimizer:
                state.update(center=self.loss.center.state_dict(),
                             center_optimizer=self.center_optimizer.state_dict())
            save_checkpoint(path, self.model, self.spec, **state)
            save_checkpoint(self.out / LATEST, self.model, self.spec, **state)
            log.info("saved %s", path)
        if self.ddp.world > 1:
            dist.barrier()
        return path

    def _resume(self, path: str) -> int:
        data = read_checkpoint(path)
        if "optimizer" not in data or "epoch" not in data:
            raise ModelFileError(f"{path} holds no training state to resume from (use "
                                 f"model.pretrain_choice=self to start from its weights)")
        try:
            self.model.load_state_dict(data["model"])
            self.optimizer.load_state_dict(data["optimizer"])
            self.scheduler.load_state_dict(data["scheduler"])
            self.scaler.load_state_dict(data["scaler"])
            if self.center_optimizer and "center" in data:
                self.loss.center.load_state_dict(data["center"])
                self.center_optimizer.load_state_dict(data["center_optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise ModelFileError(f"cannot resume from {path}: it does not fit this spec "
                                 f"({str(exc).splitlines()[0][:200]})") from None
        rng = data.get("rng", {})
        if rng.get("world_size") == self.ddp.world:
            mine = rng["torch"][self.ddp.rank]
            torch.set_rng_state(mine["cpu"])
            if "cuda" in mine and self.device.type == "cuda":
                torch.cuda.set_rng_state(mine["cuda"], self.device)
        else:
            log.warning("%s was written by %s process(es), now %d: RNG states not restored", path,
                        rng.get("world_size"), self.ddp.world)
        epoch = int(data["epoch"])
        if epoch >= self.spec.train.num_epochs:
            log.warning("%s is at epoch %d of train.num_epochs=%d: nothing left to train", path, epoch,
                        self.spec.train.num_epochs)
        log.info("resuming from %s after epoch %d", path, epoch)
        return epoch


class _StepNumbers:
    """One step's ``STEP_NUMBERS`` on their way to the host: the copy is queued behind the step, and
    ``read`` waits for that step alone (not for steps queued after it)."""

    def __init__(self, values: torch.Tensor):
        self.values = values.to("cpu", non_blocking=True)
        self.copied = None
        if values.is_cuda:
            self.copied = torch.cuda.Event()
            self.copied.record()

    def read(self) -> list[float]:
        if self.copied is not None:
            self.copied.synchronize()
        return self.values.tolist()


def _is_train_epoch_after(line: str, epoch: int) -> bool:
    try:
        entry = json.loads(line)
    except json.JSONDecodeError:
        return True  # a torn line from a killed run
    return entry.get("command") == "train" and int(entry.get("epoch", 0)) > epoch
