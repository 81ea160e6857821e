"""ReID losses: ID cross-entropy (optionally label-smoothed), batch-hard triplet, center loss.

Which losses apply follows reid-strong-baseline / TAO: sampler ``softmax`` trains with the ID loss
only, ``triplet`` with the metric loss only, ``softmax_triplet`` with both. The metric loss is the
triplet loss for ``metric_loss_type`` triplet / triplet_center, plus the center loss (weighted by
``center_loss_weight``) for center / triplet_center or when ``with_center_loss``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

LABEL_SMOOTH_EPSILON = 0.1


def pairwise_distances(x: torch.Tensor) -> torch.Tensor:
    """Euclidean distances between the rows of ``x`` (clamped at 1e-12 before the square root)."""
    sq = x.pow(2).sum(dim=1, keepdim=True)
    return (sq + sq.t() - 2.0 * x @ x.t()).clamp(min=1e-12).sqrt()


class TripletLoss(nn.Module):
    """Batch-hard triplet loss: per anchor, its farthest positive and closest negative.

    With a ``margin``: mean(max(0, d_ap - d_an + margin)); with ``margin=None`` the soft margin:
    mean(log(1 + exp(d_ap - d_an))).
    """

    def __init__(self, margin: float | None):
        super().__init__()
        self.margin = margin

    def forward(self, feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        dist = pairwise_distances(feats.float())
        same = labels[:, None] == labels[None, :]
        dist_ap = dist.masked_fill(~same, float("-inf")).max(dim=1).values
        dist_an = dist.masked_fill(same, float("inf")).min(dim=1).values
        if self.margin is None:
            return F.softplus(dist_ap - dist_an).mean()
        return F.relu(dist_ap - dist_an + self.margin).mean()


class CenterLoss(nn.Module):
    """Center loss: sum over the batch of ||x_i - c_{y_i}||^2 (each clamped to [1e-12, 1e12]) / batch size.

    The centres are trained by their own SGD at ``center_lr`` (see ``train.optim``).
    """

    def __init__(self, num_classes: int, feat_dim: int):
        super().__init__()
        self.centers = nn.Parameter(torch.randn(num_classes, feat_dim))

    def forward(self, feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        diff = feats.float() - self.centers[labels]
        return diff.pow(2).sum(dim=1).clamp(1e-12, 1e12).sum() / len(feats)


@dataclass
class LossParts:
    total: torch.Tensor
    id_loss: torch.Tensor
    metric_loss: torch.Tensor


class ReidLoss(nn.Module):
    """The training objective a spec describes; ``center`` holds the center-loss parameters (or None)."""

    def __init__(self, spec) -> None:
        super().__init__()
        model, optim = spec.model, spec.train.optim
        sampler = spec.dataset.sampler
        self.use_id = sampler in ("softmax", "softmax_triplet")
        self.use_metric = sampler in ("triplet", "softmax_triplet")
        self.smoothing = LABEL_SMOOTH_EPSILON if model.label_smooth else 0.0
        with_triplet = self.use_metric and model.metric_loss_type in ("triplet", "triplet_center")
        with_center = self.use_metric and (model.with_center_loss or "center" in model.metric_loss_type)
        self.triplet = TripletLoss(None if model.no_margin else optim.triplet_loss_margin) if with_triplet else None
        self.center = CenterLoss(spec.dataset.num_classes, model.feat_dim) if with_center else None
        self.center_weight = optim.center_loss_weight

    def forward(self, logits: torch.Tensor, feats: torch.Tensor, labels: torch.Tensor) -> LossParts:
        zero = feats.new_zeros(())
        id_loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.smoothing) if self.use_id else zero
        metric = zero
        if self.triplet is not None:
            metric = metric + self.triplet(feats, labels)
        if self.center is not None:
            metric = metric + self.center_weight * self.center(feats, labels)
        return LossParts(id_loss + metric, id_loss.detach(), metric.detach())
