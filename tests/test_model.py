"""Backbones for the spec's input size, pretrained loading with prefixes and reports, no-effect warnings."""

from __future__ import annotations

import pytest
import timm
import torch

from reid_deploy.errors import ModelFileError
from reid_deploy.model.pretrained import load_pretrained
from reid_deploy.model.reid_model import build_model
from reid_deploy.spec import load_spec
from reid_deploy.train.trainer import warn_no_effect

TINY = ["model.backbone_args={embed_dim: 16, depths: [1, 1, 1, 1], num_heads: [1, 1, 2, 2]}",
        "model.input_height=64", "model.input_width=32", "model.feat_dim=32", "dataset.num_classes=8"]


def test_swin_builds_for_input_size_and_keeps_the_forward_contract():
    torch.manual_seed(0)
    model = build_model(load_spec(None, TINY))
    model.train()
    logits, feat = model(torch.randn(4, 3, 64, 32))
    assert logits.shape == (4, 8) and feat.shape == (4, 32)
    out = model.eval()(torch.randn(2, 3, 64, 32))
    assert out.shape == (2, 32) and torch.allclose(out.norm(dim=1), torch.ones(2), atol=1e-5)


@pytest.mark.parametrize("last_stride,cells", [(1, 8 * 4), (2, 4 * 2)])
def test_resnet_last_stride(last_stride, cells):
    model = build_model(load_spec(None, ["model.backbone=resnet_50", f"model.last_stride={last_stride}",
                                         "model.input_height=128", "model.input_width=64", "model.feat_dim=2048"]))
    fmap = model.backbone.forward_features(torch.randn(1, 3, 128, 64))
    assert fmap.shape[2] * fmap.shape[3] == cells


def _prefixed_checkpoint(tmp_path, model, num_classes_other: bool):
    state = {f"module.{k}" if not k.startswith("backbone.") else f"module.base.{k[len('backbone.'):]}": v
             for k, v in model.state_dict().items()}
    if num_classes_other:
        state["module.classifier.weight"] = torch.zeros(5, 32)
    state["module.extra_head.weight"] = torch.zeros(3)
    path = tmp_path / "prefixed.pth"
    torch.save({"state_dict": state, "epoch": 7}, path)
    return path


def test_self_checkpoint_with_prefixed_keys_loads_and_reports(tmp_path):
    spec = load_spec(None, TINY)
    torch.manual_seed(1)
    source = build_model(spec)
    path = _prefixed_checkpoint(tmp_path, source, num_classes_other=True)
    torch.manual_seed(2)
    target = build_model(spec)
    report = load_pretrained(target, "self", str(path))
    assert report.unexpected == ["extra_head.weight"]
    assert report.skipped == ["classifier.weight (5, 32)->(8, 32)"]
    assert report.missing == ["classifier.weight"]
    got, want = target.state_dict(), source.state_dict()
    for k in want:
        if k != "classifier.weight":
            assert torch.equal(got[k], want[k]), k


def test_imagenet_timm_weights_with_other_window_layout_load_into_the_backbone(tmp_path):
    spec = load_spec(None, TINY + ["model.input_channels=1", "dataset.pixel_mean=[0.5]", "dataset.pixel_std=[0.5]"])
    source = timm.create_model("swin_tiny_patch4_window7_224", num_classes=10, embed_dim=16, depths=[1, 1, 1, 1],
                               num_heads=[1, 1, 2, 2], window_size=5, img_size=(40, 40))  # 3 channels, 9x9 tables
    path = tmp_path / "imagenet.pth"
    torch.save(source.state_dict(), path)
    model = build_model(spec)
    report = load_pretrained(model, "imagenet", str(path))
    assert report.skipped == []
    assert set(report.unexpected) == {"backbone.head.fc.weight", "backbone.head.fc.bias"}
    assert not [k for k in report.missing if k.startswith("backbone.")]
    stem = model.backbone.patch_embed.proj.weight
    assert torch.allclose(stem, source.patch_embed.proj.weight.sum(dim=1, keepdim=True))
    assert model.backbone.layers[0].blocks[0].attn.relative_position_bias_table.shape[0] == 13 * 13


def test_pretrained_file_errors(tmp_path):
    model = build_model(load_spec(None, TINY))
    assert load_pretrained(model, "", None) is None
    with pytest.raises(ModelFileError, match="not found"):
        load_pretrained(model, "imagenet", str(tmp_path / "nope.pth"))
    with pytest.raises(ModelFileError, match="pretrained_model_path"):
        load_pretrained(model, "self", None)


def test_keys_without_effect_warn():
    spec = load_spec(None, ["model.last_stride=2", "model.stride_size=[12,12]", "model.pretrain_hw_ratio=3"])
    notes = warn_no_effect(spec.model)
    assert len(notes) == 3 and all("no effect" in n for n in notes)
    assert warn_no_effect(load_spec(None).model) == []
