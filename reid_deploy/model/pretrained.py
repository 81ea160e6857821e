"""Pretrained weights from a local file (never downloaded), adapted to the model and reported.

``imagenet``: timm- or torchvision-format backbone weights (also the original Microsoft Swin layout);
the classifier head of the file is ignored. ``self``: a whole ReID checkpoint (this project's, TAO's or
a SOLIDER/TransReID one): wrapper dicts (``model``, ``state_dict``, ``teacher``) are unwrapped and
prefixes ``module.``, ``model.``, ``backbone.``, ``base.`` stripped. For both, Swin weights pass through
timm's converter (window relative-position tables and patch-embedding kernels resized), a 3-channel
first layer is summed to 1 channel for grayscale models, and tensors whose shape still differs (e.g. a
classifier over another number of identities) are skipped. Missing, unexpected and skipped keys are
logged and returned.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from reid_deploy.console import log
from reid_deploy.errors import ModelFileError
from reid_deploy.model.checkpoint import read_checkpoint
from reid_deploy.model.reid_model import ReidModel

PREFIXES = ("module.", "model.", "backbone.", "base.")
HEAD_PREFIXES = ("embed.", "bottleneck.", "classifier.")
WRAPPERS = ("model", "state_dict", "teacher", "student")


@dataclass
class LoadReport:
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # present in both, shapes differ


def load_pretrained(model: ReidModel, choice: str, path: str | None) -> LoadReport | None:
    """Load ``path`` into ``model`` as ``choice`` says ('' does nothing and returns None)."""
    if not choice:
        return None
    if not path:
        raise ModelFileError(f"model.pretrain_choice={choice} needs model.pretrained_model_path "
                             f"(or set model.pretrain_choice='' for random init)")
    if not Path(path).is_file():
        raise ModelFileError(f"model.pretrained_model_path not found: {path} (weights are never downloaded; "
                             "model.pretrain_choice='' starts from random weights)")
    state = _tensors(read_checkpoint(path))
    if not state:
        raise ModelFileError(f"{path} holds no weight tensors")
    own = model.backbone.state_dict()
    bare = {_strip(k): v for k, v in state.items()}
    source: dict[str, torch.Tensor] = {}
    backbone_part = {k: v for k, v in bare.items() if not k.startswith(HEAD_PREFIXES)}
    same_layout = all(k in backbone_part and backbone_part[k].shape == v.shape for k, v in own.items())
    if hasattr(model.backbone, "layers") and "patch_embed.proj.weight" in backbone_part and not same_layout:
        # Swin weights of another layout (window size, original keys): timm converts them. Weights that already
        # hold the whole backbone in its shapes skip it: timm before 1.0.31 fails to resize tables of non-square
        # windows even to their own size.
        from timm.models.swin_transformer import checkpoint_filter_fn

        backbone_part = checkpoint_filter_fn(backbone_part, model.backbone)
    for k, v in backbone_part.items():
        source[f"backbone.{k}" if k in own or choice == "imagenet" else k] = v
    if choice == "self":
        source.update({k: v for k, v in bare.items() if k.startswith(HEAD_PREFIXES)})
    return _load(model, source, path)


def _tensors(data: dict) -> dict[str, torch.Tensor]:
    for name in WRAPPERS:
        inner = data.get(name)
        if isinstance(inner, dict) and any(isinstance(v, torch.Tensor) for v in inner.values()):
            return _tensors(inner)
    return {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}


def _strip(name: str) -> str:
    while name.startswith(PREFIXES):
        name = name.split(".", 1)[1]
    return name


def _load(model: ReidModel, source: dict[str, torch.Tensor], path: str) -> LoadReport:
    target = model.state_dict()
    report = LoadReport()
    usable = {}
    for k, v in source.items():
        if k not in target:
            report.unexpected.append(k)
            continue
        want = target[k].shape
        if v.ndim == 4 and len(want) == 4 and v.shape[1] == 3 and want[1] == 1:  # RGB stem -> grayscale
            v = v.sum(dim=1, keepdim=True)
        if v.shape != want:
            report.skipped.append(f"{k} {tuple(v.shape)}->{tuple(want)}")
            continue
        usable[k] = v
    model.load_state_dict(usable, strict=False)
    report.loaded = sorted(usable)
    report.missing = sorted(k for k in target if k not in usable and not k.endswith("num_batches_tracked"))
    log.info("loaded %d of %d tensors from %s", len(usable), len(target), path)
    for what, keys in (("missing (left as initialised)", report.missing), ("unexpected (ignored)",
                       report.unexpected), ("skipped for shape", report.skipped)):
        if keys:
            log.warning("%d %s key(s) in %s: %s%s", len(keys), what, path, ", ".join(keys[:8]),
                        " ..." if len(keys) > 8 else "")
    return report
