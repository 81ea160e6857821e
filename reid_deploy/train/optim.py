"""Optimisers and the per-epoch learning-rate schedule.

Parameter groups (reid-strong-baseline / TAO): every trainable parameter has its own group; biases
(names containing "bias") learn at ``base_lr x bias_lr_factor`` with ``weight_decay_bias``, the others at
``base_lr`` with ``weight_decay``; with ``large_fc_lr`` the classifier learns at ``2 x base_lr``. The
center-loss centres have their own SGD at ``center_lr``.

The schedule multiplies each group's lr by ``lr_factor(epoch)`` (0-based epoch; see its docstring).
"""

from __future__ import annotations

import bisect
import math

import torch

from reid_deploy.model.losses import CenterLoss


def param_groups(model: torch.nn.Module, optim) -> list[dict]:
    """One group per trainable parameter with its lr and weight decay (see module docstring)."""
    groups = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        lr, decay = optim.base_lr, optim.weight_decay
        if "bias" in name:
            lr, decay = optim.base_lr * optim.bias_lr_factor, optim.weight_decay_bias
        if optim.large_fc_lr and name.startswith("classifier."):
            lr = optim.base_lr * 2
        groups.append({"params": [param], "lr": lr, "weight_decay": decay, "name": name})
    return groups


def make_optimizer(model: torch.nn.Module, optim) -> torch.optim.Optimizer:
    """SGD (with ``momentum``), Adam or AdamW over ``param_groups``."""
    groups = param_groups(model, optim)
    if optim.name == "SGD":
        return torch.optim.SGD(groups, lr=optim.base_lr, momentum=optim.momentum)
    cls = torch.optim.Adam if optim.name == "Adam" else torch.optim.AdamW
    return cls(groups, lr=optim.base_lr)


def make_center_optimizer(center: CenterLoss, optim) -> torch.optim.SGD:
    """Plain SGD at ``center_lr`` for the centres; the trainer rescales their gradient by 1/weight."""
    return torch.optim.SGD(center.parameters(), lr=optim.center_lr)


def lr_factor(epoch: int, optim, num_epochs: int) -> float:
    """Multiplier of each group's lr during 0-based ``epoch``.

    Warmup (epoch < W = warmup_epochs, a = epoch / W, f0 = warmup_factor):
    linear f0 + (1 - f0) a; cosine f0 + (1 - f0)(1 - cos(pi a)) / 2; constant f0; 1 afterwards.
    'step': warmup x gamma ** (number of lr_steps <= epoch).
    'cosine': warmup, then 0.5 (1 + cos(pi (epoch - W) / (num_epochs - W))).
    """
    warm = 1.0
    if epoch < optim.warmup_epochs:
        a, f0 = epoch / optim.warmup_epochs, optim.warmup_factor
        warm = {"linear": f0 + (1 - f0) * a, "cosine": f0 + (1 - f0) * (1 - math.cos(math.pi * a)) / 2,
                "constant": f0}[optim.warmup_method]
    if optim.lr_scheduler == "step":
        return warm * optim.gamma ** bisect.bisect_right(optim.lr_steps, epoch)
    if epoch < optim.warmup_epochs:
        return warm
    span = max(num_epochs - optim.warmup_epochs, 1)
    return 0.5 * (1 + math.cos(math.pi * (epoch - optim.warmup_epochs) / span))


def make_scheduler(optimizer: torch.optim.Optimizer, optim, num_epochs: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-epoch scheduler: ``step()`` once after every epoch."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: lr_factor(epoch, optim, num_epochs))


def rescale_center_grad(center: CenterLoss, weight: float) -> None:
    """Divide the centres' gradient by ``center_loss_weight`` (reid-strong-baseline), so that the
    centres move by ``center_lr x d(center loss)/dc`` whatever the weight of the loss in the total."""
    if weight <= 0:
        return
    for param in center.parameters():
        if param.grad is not None:
            param.grad *= 1.0 / weight
