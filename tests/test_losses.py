"""Losses against brute-force computations, and the center-loss update rule."""

from __future__ import annotations

import pytest
import torch

from reid_deploy.model.losses import CenterLoss, ReidLoss, TripletLoss
from reid_deploy.spec import load_spec
from reid_deploy.train.optim import make_center_optimizer, rescale_center_grad


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(12, 5, generator=gen, dtype=torch.float64), torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])


def _brute_hard(feats: torch.Tensor, labels: torch.Tensor) -> tuple[list[float], list[float]]:
    ap, an = [], []
    for a in range(len(feats)):
        d = [float(torch.linalg.norm(feats[a] - feats[j])) for j in range(len(feats))]
        ap.append(max(d[j] for j in range(len(feats)) if labels[j] == labels[a]))
        an.append(min(d[j] for j in range(len(feats)) if labels[j] != labels[a]))
    return ap, an


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batch_hard_triplet_with_margin_equals_brute_force(seed):
    feats, labels = _batch(seed)
    ap, an = _brute_hard(feats, labels)
    expected = sum(max(0.0, p - n + 0.3) for p, n in zip(ap, an)) / len(ap)
    assert float(TripletLoss(0.3)(feats, labels)) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_soft_margin_triplet_equals_brute_force(seed):
    feats, labels = _batch(seed)
    ap, an = _brute_hard(feats, labels)
    expected = sum(float(torch.log1p(torch.exp(torch.tensor(p - n)))) for p, n in zip(ap, an)) / len(ap)
    assert float(TripletLoss(None)(feats, labels)) == pytest.approx(expected, rel=1e-5)


def test_center_loss_value_and_centres_move_at_center_lr():
    torch.manual_seed(0)
    feats, labels = _batch()
    feats = feats.float()
    center = CenterLoss(4, 5)
    centres = center.centers.detach()
    expected = sum(float(((feats[i] - centres[labels[i]]) ** 2).sum()) for i in range(12)) / 12
    assert float(center(feats, labels).detach()) == pytest.approx(expected, rel=1e-5)

    spec = load_spec(None, ["train.optim.center_lr=0.5", "train.optim.center_loss_weight=0.0005"])
    optim = spec.train.optim
    before = center.centers.detach().clone()
    opt = make_center_optimizer(center, optim)
    (optim.center_loss_weight * center(feats, labels)).backward()  # weighted, as inside the total loss
    rescale_center_grad(center, optim.center_loss_weight)
    opt.step()
    for j in range(4):  # dL/dc_j = -2 sum_{i: y_i = j} (x_i - c_j) / B
        grad = -2 * (feats[labels == j] - before[j]).sum(dim=0) / 12
        assert torch.allclose(center.centers[j], before[j] - 0.5 * grad, atol=1e-5)


@pytest.mark.parametrize("sampler,metric,center_flag,parts", [
    ("softmax", "triplet", False, (True, False, False)),
    ("triplet", "triplet", False, (False, True, False)),
    ("softmax_triplet", "triplet", True, (True, True, True)),
    ("softmax_triplet", "center", False, (True, False, True)),
    ("softmax_triplet", "triplet_center", False, (True, True, True)),
])
def test_loss_composition_follows_sampler_and_metric_type(sampler, metric, center_flag, parts):
    spec = load_spec(None, [f"dataset.sampler={sampler}", f"model.metric_loss_type={metric}",
                            f"model.with_center_loss={center_flag}", "dataset.num_classes=4", "model.feat_dim=5"])
    loss = ReidLoss(spec)
    assert (loss.use_id, loss.triplet is not None, loss.center is not None) == parts


def test_label_smoothing_is_epsilon_0_1():
    spec = load_spec(None, ["model.label_smooth=True", "dataset.sampler=softmax", "dataset.num_classes=4"])
    logits, labels = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 0, 1])
    logp = torch.log_softmax(logits, dim=1)
    target = torch.full((6, 4), 0.1 / 4)
    target[torch.arange(6), labels] += 0.9
    expected = float(-(target * logp).sum(dim=1).mean())
    parts = ReidLoss(spec)(logits, torch.randn(6, 5), labels)
    assert float(parts.id_loss) == pytest.approx(expected, rel=1e-5)
    assert float(parts.metric_loss) == 0.0
