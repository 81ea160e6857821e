"""The ReID network: backbone -> embedding of feat_dim -> BNNeck -> classifier.

Training forward returns ``(logits, global_feat)``; inference forward returns the ``neck_feat``
feature, L2-normalised. Normalisation is part of the network, so every backend (PyTorch, ONNX,
TensorRT) outputs unit-length features: inner product is cosine similarity, and squared Euclidean
distance is 2 - 2 cos.

``feat_dim`` is honoured by a bias-free linear projection from the backbone's width (768 for
Swin-T, 1024 for Swin-S/B, 2048 for ResNet-50); when the widths are equal no projection is added.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from reid_deploy.model.backbones import build_backbone

CHECKPOINT_FORMAT = "reid-deploy/1"


class ReidModel(nn.Module):
    def __init__(self, backbone: nn.Module, feat_dim: int, num_classes: int, neck: str = "bnneck",
                 neck_feat: str = "after"):
        super().__init__()
        self.backbone = backbone
        width = backbone.num_features
        self.embed = nn.Identity() if width == feat_dim else nn.Linear(width, feat_dim, bias=False)
        self.feat_dim = feat_dim
        self.neck, self.neck_feat = neck, neck_feat
        self.bottleneck = nn.BatchNorm1d(feat_dim) if neck == "bnneck" else nn.Identity()
        if neck == "bnneck":
            self.bottleneck.bias.requires_grad_(False)  # BNNeck: no shift before the classifier
            nn.init.constant_(self.bottleneck.weight, 1.0)
            nn.init.constant_(self.bottleneck.bias, 0.0)
        self.classifier = nn.Linear(feat_dim, num_classes, bias=False)
        nn.init.normal_(self.classifier.weight, std=0.001)
        if isinstance(self.embed, nn.Linear):
            nn.init.kaiming_normal_(self.embed.weight, mode="fan_out")

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(global_feat before the neck, feat after the neck)."""
        global_feat = self.embed(self.backbone(x))
        return global_feat, self.bottleneck(global_feat)

    def forward(self, x: torch.Tensor):
        global_feat, feat = self.forward_features(x)
        if self.training:
            return self.classifier(feat), global_feat
        out = feat if self.neck_feat == "after" else global_feat
        return F.normalize(out, p=2, dim=1)


def build_model(spec: Any) -> ReidModel:
    """The network the spec describes, randomly initialised (weights are loaded by the trainer)."""
    m = spec.model
    backbone = build_backbone(m.backbone, m.input_height, m.input_width, m.input_channels, m.last_stride,
                              dict(m.backbone_args))
    return ReidModel(backbone, m.feat_dim, spec.dataset.num_classes, m.neck, m.neck_feat)
