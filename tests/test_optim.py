"""Parameter groups and the documented learning-rate formulas."""

from __future__ import annotations

import math

import pytest
import torch

from reid_deploy.model.reid_model import ReidModel
from reid_deploy.spec import load_spec
from reid_deploy.train.optim import lr_factor, make_optimizer, make_scheduler


def _model() -> ReidModel:
    backbone = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 8))
    backbone.num_features = 8
    return ReidModel(backbone, feat_dim=6, num_classes=3)


def _lrs(overrides: list[str], epochs: int) -> tuple[list[float], object]:
    spec = load_spec(None, overrides)
    model = _model()
    opt = make_optimizer(model, spec.train.optim)
    sched = make_scheduler(opt, spec.train.optim, spec.train.num_epochs)
    lrs = []
    for _ in range(epochs):
        lrs.append(opt.param_groups[0]["lr"])  # the first group is a weight: lr = base_lr x factor
        opt.step()
        sched.step()
    return lrs, spec.train.optim


@pytest.mark.parametrize("method", ["linear", "cosine", "constant"])
def test_step_schedule_at_start_end_of_warmup_and_after_each_step(method):
    base, f0, w = 0.01, 0.01, 5
    lrs, _ = _lrs([f"train.optim.base_lr={base}", f"train.optim.warmup_factor={f0}", f"train.optim.warmup_epochs={w}",
                   f"train.optim.warmup_method={method}", "train.optim.lr_steps=[8,12]", "train.optim.gamma=0.1",
                   "train.num_epochs=15"], 15)
    assert lrs[0] == pytest.approx(base * f0)
    a = (w - 1) / w
    last_warm = {"linear": f0 + (1 - f0) * a, "cosine": f0 + (1 - f0) * (1 - math.cos(math.pi * a)) / 2,
                 "constant": f0}[method]
    assert lrs[w - 1] == pytest.approx(base * last_warm)
    assert lrs[w] == pytest.approx(base)  # warmup over
    assert lrs[7] == pytest.approx(base) and lrs[8] == pytest.approx(base * 0.1)
    assert lrs[11] == pytest.approx(base * 0.1) and lrs[12] == pytest.approx(base * 0.01)


def test_cosine_schedule_formula():
    lrs, optim = _lrs(["train.optim.lr_scheduler=cosine", "train.optim.base_lr=0.1", "train.optim.warmup_epochs=2",
                       "train.optim.warmup_method=linear", "train.num_epochs=10"], 10)
    assert lrs[0] == pytest.approx(0.1 * optim.warmup_factor)
    assert lrs[2] == pytest.approx(0.1)
    for e in range(2, 10):
        assert lrs[e] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * (e - 2) / 8)))
    assert lr_factor(6, optim, 10) == pytest.approx(0.5)


def test_bias_groups_get_their_lr_and_decay_and_bnneck_bias_is_frozen():
    spec = load_spec(None, ["train.optim.base_lr=0.1", "train.optim.bias_lr_factor=2", "train.optim.weight_decay=0.01",
                            "train.optim.weight_decay_bias=0.003", "train.optim.large_fc_lr=True",
                            "train.optim.warmup_epochs=0"])
    opt = make_optimizer(_model(), spec.train.optim)
    groups = {g["name"]: g for g in opt.param_groups}
    assert "bottleneck.bias" not in groups  # BNNeck bias frozen
    assert groups["backbone.1.bias"]["lr"] == pytest.approx(0.2)
    assert groups["backbone.1.bias"]["weight_decay"] == pytest.approx(0.003)
    assert groups["backbone.1.weight"]["lr"] == pytest.approx(0.1)
    assert groups["backbone.1.weight"]["weight_decay"] == pytest.approx(0.01)
    assert groups["classifier.weight"]["lr"] == pytest.approx(0.2)  # large_fc_lr: 2 x base_lr
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == spec.train.optim.momentum
