"""Backbones from timm, built for the spec's input size; every one returns pooled features [B, C]."""

from __future__ import annotations

from typing import Any

import timm
from torch import nn

from reid_deploy.errors import SpecError

TIMM_NAMES = {
    "resnet_50": "resnet50",
    "swin_tiny_patch4_window7_224": "swin_tiny_patch4_window7_224",
    "swin_small_patch4_window7_224": "swin_small_patch4_window7_224",
    "swin_base_patch4_window7_224": "swin_base_patch4_window7_224",
}


def build_backbone(name: str, height: int, width: int, channels: int = 3, last_stride: int = 1,
                   extra: dict[str, Any] | None = None) -> nn.Module:
    """A timm backbone without classifier (``num_classes=0``), randomly initialised.

    ResNet-50: ``last_stride`` sets the stride of the last stage. Swin: built for ``height`` x ``width``
    (timm pads feature maps to whole windows).
    """
    kwargs: dict[str, Any] = {"pretrained": False, "num_classes": 0, "in_chans": channels, **(extra or {})}
    if name.startswith("swin"):
        kwargs["img_size"] = (height, width)
    try:
        model = timm.create_model(TIMM_NAMES[name], **kwargs)
    except (TypeError, ValueError, AssertionError, RuntimeError) as exc:
        raise SpecError(f"spec error: model.backbone_args = {extra} cannot build {name}: {exc}") from None
    if name == "resnet_50" and last_stride != 2:
        block = model.layer4[0]
        block.conv2.stride = (last_stride, last_stride)
        if block.downsample is not None:
            block.downsample[0].stride = (last_stride, last_stride)
    return model
