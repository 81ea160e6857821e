"""The experiment spec: one dataclass per section, loaded from YAML plus dotted overrides, then validated.

Every key carries its default, its allowed values and a one-line meaning in the field metadata; the
validator and the README reference table (``reid spec reference``) both read them from here.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from reid_deploy.errors import SpecError, missing_file, shown

BACKBONES = (
    "resnet_50",
    "swin_base_patch4_window7_224",
    "swin_small_patch4_window7_224",
    "swin_tiny_patch4_window7_224",
)
REDACTED = "***redacted***"


def key(default: Any, doc: str, *, choices: Sequence[Any] | None = None, ge: float | None = None,
        gt: float | None = None, le: float | None = None, lt: float | None = None) -> Any:
    """A spec key: its default, meaning and allowed values (``choices`` or bounds)."""
    meta = {"doc": doc, "choices": tuple(choices) if choices is not None else None,
            "ge": ge, "gt": gt, "le": le, "lt": lt}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    backbone: str = key("swin_tiny_patch4_window7_224", "Backbone network (timm).", choices=BACKBONES)
    last_stride: int = key(1, "Stride of ResNet-50's last stage (1 keeps 2x more spatial detail). "
                              "No effect for Swin (a value other than 1 logs a warning).", choices=(1, 2))
    pretrain_choice: str = key("self", "Weights to start from: 'imagenet' (timm/torchvision backbone "
                                       "weights, also the original Swin layout; the file's classifier is "
                                       "ignored), 'self' (a whole ReID checkpoint: TAO, SOLIDER or ours; "
                                       "prefixes module./model./backbone./base. stripped) or '' (random "
                                       "init). Swin window tables and patch kernels are resized, an RGB stem "
                                       "is summed for 1 channel, other shape mismatches are skipped; "
                                       "missing/unexpected/skipped keys are logged.", choices=("self", "imagenet", ""))
    pretrained_model_path: Optional[str] = key(None, "Local file with the pretrained weights; never "
                                                     "downloaded.")
    input_channels: int = key(3, "Channels of the network input: 3 (RGB) or 1 (grayscale).", choices=(1, 3))
    input_width: int = key(128, "Input width in pixels.", gt=0)
    input_height: int = key(384, "Input height in pixels.", gt=0)
    neck: str = key("bnneck", "'bnneck': BatchNorm between embedding and classifier; '' for none.",
                    choices=("bnneck", ""))
    stride_size: list[int] = key([16, 16], "Patch stride [h, w] of ViT backbones in TAO/SOLIDER "
                                           "(TransReID): no effect for Swin (fixed 4x4 patches) or "
                                           "ResNet-50; a value other than [16, 16] logs a warning.")
    feat_dim: int = key(1024, "Length of the embedding the model outputs.", gt=0)
    no_margin: bool = key(True, "Soft-margin triplet loss mean(log(1+exp(d_ap-d_an))) "
                                   "instead of mean(max(0, d_ap-d_an+margin)); batch-hard: per anchor its "
                                   "farthest positive and closest negative, Euclidean distances of the "
                                   "feature before the BNNeck.")
    neck_feat: str = key("after", "Inference feature: 'before' or 'after' the BNNeck.",
                         choices=("before", "after"))
    metric_loss_type: str = key("triplet", "Metric loss: 'triplet', 'center' or both. Sampler "
                                "'softmax' trains the ID loss only, 'triplet' the metric loss only, "
                                "'softmax_triplet' their sum (reid-strong-baseline).",
                                choices=("triplet", "center", "triplet_center"))
    with_center_loss: bool = key(False, "Add center loss x center_loss_weight to the metric loss "
                                                      "(also on when metric_loss_type has 'center').")
    with_flip_feature: bool = key(False, "Average the features of each image and its horizontal flip.")
    label_smooth: bool = key(False, "Label smoothing (epsilon 0.1) on the ID loss.")
    backbone_args: dict[str, Any] = key({}, "Extra timm create_model arguments, e.g. {embed_dim: 48, "
                                            "depths: [2, 2, 2, 2]} for a slimmer network.")
    pretrain_hw_ratio: float = key(2.0, "Height/width ratio of the pretraining images; TAO/SOLIDER "
                                        "use it to resize ViT position embeddings only: no effect for Swin "
                                        "(no absolute position embedding) or ResNet-50; a value other than "
                                        "2 logs a warning.", gt=0)


@dataclass
class DatasetConfig:
    train_dataset_dir: Optional[str] = key(None, "Folder of training images (Market-1501 names).")
    test_dataset_dir: Optional[str] = key(None, "Folder of gallery images.")
    query_dataset_dir: Optional[str] = key(None, "Folder of query images.")
    num_classes: int = key(751, "Number of identities in the training set.", gt=0)
    batch_size: int = key(64, "Training batch size (per process under DDP).", gt=0)
    val_batch_size: int = key(128, "Batch size for feature extraction.", gt=0)
    num_workers: int = key(8, "Data-loading worker processes (0: load in the main "
                                                 "process); batches go to pinned memory on CUDA.", ge=0)
    pixel_mean: list[float] = key([0.5, 0.5, 0.5], "Per-channel mean for normalisation (0-1 scale).")
    pixel_std: list[float] = key([0.5, 0.5, 0.5], "Per-channel std for normalisation (0-1 scale).")
    padding: int = key(10, "Zero padding before the random crop (0 turns padding and crop off).", ge=0)
    prob: float = key(0.5, "Horizontal flip probability.", ge=0, le=1)
    re_prob: float = key(0.5, "Random erasing probability (a rectangle of 2-33 % of the "
                                       "area, aspect 0.3-3.3, filled with normal noise).", ge=0, le=1)
    sampler: str = key("softmax_triplet", "'softmax': shuffled images; 'triplet'/'softmax_triplet': "
                                          "P = batch_size/K identities x K images per batch (an identity "
                                          "with fewer than K images is sampled with replacement).",
                       choices=("softmax", "triplet", "softmax_triplet"))
    num_instances: int = key(4, "K, images per identity in a batch for the triplet samplers.", gt=0)
    on_bad_image: str = key("skip", "Unreadable image: 'skip' it with a warning or stop with an 'error'.",
                            choices=("skip", "error"))


@dataclass
class ReRankingConfig:
    re_ranking: bool = key(True, "Apply k-reciprocal re-ranking at evaluation.")
    k1: int = key(20, "k of the k-reciprocal nearest neighbours.", gt=0)
    k2: int = key(6, "k of the local query expansion (1: none).", gt=0)
    lambda_value: float = key(0.3, "Weight of the original distance against the Jaccard distance.",
                              ge=0, le=1)
    max_rank: int = key(10, "Highest CMC rank reported and gallery images per row in the match plot.",
                        gt=0)
    num_query: int = key(10, "Queries sampled into the match plot.", gt=0)


@dataclass
class OptimConfig:
    name: str = key("SGD", "Optimiser.", choices=("SGD", "Adam", "AdamW"))
    lr_scheduler: str = key("step", "lr of 0-based epoch e = group lr x warmup(e) x decay(e). "
                                    "'step': decay = gamma ** (number of lr_steps <= e); 'cosine' (TAO "
                                    "Swin): decay = 1 during warmup, then 0.5 (1 + cos(pi (e - W) / "
                                    "(num_epochs - W))), W = warmup_epochs.", choices=("step", "cosine"))
    lr_steps: list[int] = key([40, 70], "Epochs at which the step schedule multiplies the lr by gamma.")
    gamma: float = key(0.1, "Decay factor of the step schedule.", gt=0, le=1)
    bias_lr_factor: float = key(2.0, "Parameters named '*bias*' learn at base_lr x "
                                                                 "bias_lr_factor (BNNeck bias is frozen).", gt=0)
    weight_decay: float = key(0.0001, "Weight decay of non-bias parameters.", ge=0)
    weight_decay_bias: float = key(0.0001, "Weight decay of bias parameters.", ge=0)
    warmup_factor: float = key(0.01, "Warmup starts at base_lr x warmup_factor.", gt=0, le=1)
    warmup_epochs: int = key(20, "Epochs of warmup (0: none).", ge=0)
    warmup_method: str = key("cosine", "warmup(e) for e < W, a = e / W, f0 = warmup_factor: "
                                                     "linear f0 + (1 - f0) a; cosine f0 + (1 - f0)(1 - cos(pi "
                                                     "a)) / 2; constant f0 (1 from epoch W on).",
                               choices=("linear", "cosine", "constant"))
    base_lr: float = key(0.0008, "Base learning rate.", gt=0)
    momentum: float = key(0.9, "SGD momentum.", ge=0, lt=1)
    center_loss_weight: float = key(0.0005, "Weight of the center loss.", ge=0)
    center_lr: float = key(0.5, "Learning rate of the centres' own SGD; their gradient is "
                                            "divided by center_loss_weight first (reid-strong-baseline).", gt=0)
    triplet_loss_margin: float = key(0.3, "Margin of the triplet loss (unless no_margin).", gt=0)
    large_fc_lr: bool = key(False, "Classifier learns at 2 x base_lr, as TAO does.")


@dataclass
class TrainConfig:
    results_dir: Optional[str] = key(None, "Output folder (default: <results_dir>/train).")
    optim: OptimConfig = field(default_factory=OptimConfig, metadata={"doc": "Optimiser and schedule."})
    num_epochs: int = key(120, "Epochs to train.", gt=0)
    checkpoint_interval: int = key(10, "Save <train dir>/reid_model_epoch_NNN.pth and "
                                              "reid_model_latest.pth every N epochs and at the end.", gt=0)
    clip_grad_norm: float = key(0.0, "Clip gradients to this L2 norm (0: off).", ge=0)
    resume_training_checkpoint_path: Optional[str] = key(None, "Checkpoint to resume training from: "
                                                                "continues after its epoch with its optimiser, "
                                                                "scheduler, scaler and RNG state.")
    validation_interval: int = key(0, "Evaluate mAP/CMC (no re-ranking) before the first "
                                              "epoch, every N epochs and at the end, into status.json (0: off).", ge=0)
    seed: int = key(42, "Random seed.", ge=0)
    deterministic: bool = key(False, "Deterministic algorithms (reproducible, slower).")
    amp: str = key("off", "Mixed precision on CUDA (fp16 with a gradient scaler); on CPU "
                              "it warns and trains in float32.", choices=("off", "fp16", "bf16"))
    device: str = key("auto", "'auto' picks CUDA when present.", choices=("auto", "cpu", "cuda"))


@dataclass
class EvaluateConfig:
    results_dir: Optional[str] = key(None, "Output folder (default: <results_dir>/evaluate).")
    checkpoint: Optional[str] = key(None, "Model file to evaluate (.pth, .onnx, .onnx.enc, .engine).")
    output_sampled_matches_plot: Optional[str] = key(None, "PNG of sampled queries and their top "
                                                           "matches (default: in results_dir).")
    output_cmc_curve_plot: Optional[str] = key(None, "PNG of the CMC curve (default: in results_dir).")
    test_dataset: Optional[str] = key(None, "Gallery folder (default: dataset.test_dataset_dir).")
    query_dataset: Optional[str] = key(None, "Query folder (default: dataset.query_dataset_dir).")


@dataclass
class InferenceConfig:
    results_dir: Optional[str] = key(None, "Output folder (default: <results_dir>/inference).")
    checkpoint: Optional[str] = key(None, "Model file (.pth, .onnx, .onnx.enc, .engine).")
    output_file: Optional[str] = key(None, "Features file: .npz, or .json in TAO's format "
                                           "(default: <results_dir>/inference/features.npz).")
    test_dataset: Optional[str] = key(None, "Gallery folder (default: dataset.test_dataset_dir).")
    query_dataset: Optional[str] = key(None, "Query folder (default: dataset.query_dataset_dir).")
    precision: str = key("auto", "Precision of a .pth model in inference, evaluate, index and search: 'auto' "
                                 "(fp16 on CUDA, fp32 on CPU), 'fp32' (TF32 matrix products on CUDA), 'fp16' or "
                                 "'bf16' (CUDA; on CPU one warning, then fp32). The cosine to fp32 on the first "
                                 "batch is logged. ONNX models and engines keep the precision they were built "
                                 "with.", choices=("auto", "fp32", "fp16", "bf16"))
    compile: bool = key(False, "torch.compile a .pth model on CUDA (the first batch compiles it: tens of "
                               "seconds; on CPU one warning, then eager).")


@dataclass
class ExportConfig:
    results_dir: Optional[str] = key(None, "Output folder (default: <results_dir>/export).")
    checkpoint: Optional[str] = key(None, "PyTorch checkpoint to export.")
    onnx_file: Optional[str] = key(None, "ONNX path (default: <results_dir>/export/model.onnx; "
                                         "'.enc' is appended when encrypted).")
    opset: int = key(18, "ONNX opset (18+: dynamo exporter; 17: TorchScript exporter, for older "
                         "TensorRT/DeepStream).", ge=17)
    int8: str = key("dynamic", "INT8 models written beside the FP32 one: 'dynamic' (<name>.int8.onnx, "
                               "the backbone's MatMul weights in INT8, for ONNX Runtime on CPU: speeds up Swin; "
                               "a convolutional backbone has none, so none is written), 'static' "
                               "(<name>.qdq.onnx, Q/DQ calibrated on cal_image_dir, for TensorRT int8), 'both' or "
                               "'none'. Both keep the final embedding layer in FP32.",
                    choices=("none", "dynamic", "static", "both"))
    eval_map: bool = key(False, "Also report the mAP of the FP32 and INT8 models on the dataset's "
                                "query/gallery folders.")
    cal_image_dir: Optional[str] = key(None, "Calibration images for static INT8 (Q/DQ for TensorRT; "
                                             "default: dataset.train_dataset_dir).")
    cal_batches: int = key(8, "Calibration batches.", gt=0)
    cal_batch_size: int = key(8, "Calibration batch size.", gt=0)
    cal_method: str = key("percentile", "Calibration method for activation ranges: 'percentile' (99.999th "
                                        "percentile of |x|; on the demo model mAP -0.36 points vs -1.61 for "
                                        "'minmax'), 'minmax' or 'entropy'.",
                          choices=("minmax", "entropy", "percentile"))


@dataclass
class BuildEngineConfig:
    results_dir: Optional[str] = key(None, "Output folder (default: <results_dir>/build_engine).")
    target: str = key("tensorrt", "'tensorrt' engine, or 'onnxruntime' optimised CPU model.",
                      choices=("tensorrt", "onnxruntime"))
    onnx_file: Optional[str] = key(None, "Source ONNX (.onnx or .onnx.enc).")
    engine_file: Optional[str] = key(None, "Output (default: engines/<name>.<gpu>.<precision>.engine).")
    min_batch_size: int = key(1, "Smallest batch of the optimisation profile.", gt=0)
    opt_batch_size: int = key(16, "Batch TensorRT tunes for.", gt=0)
    max_batch_size: int = key(64, "Largest batch of the optimisation profile.", gt=0)
    precision: str = key("fp16", "Engine precision.", choices=("fp32", "fp16", "int8"))
    workspace_size: int = key(2048, "Builder workspace in MiB.", gt=0)
    timing_cache: Optional[str] = key(None, "TensorRT timing cache file (read and updated).")


@dataclass
class IndexConfig:
    index_type: str = key("flat", "Gallery index: exact 'flat' inner product (blocked matrix products of the "
                                  "stored features, CUDA when present; no FAISS needed), or FAISS 'ivf', 'hnsw', "
                                  "'ivfpq' for millions.", choices=("flat", "ivf", "hnsw", "ivfpq"))
    nlist: int = key(1024, "IVF lists.", gt=0)
    nprobe: int = key(32, "IVF lists visited per query.", gt=0)
    hnsw_m: int = key(32, "HNSW neighbours per node.", gt=0)
    pq_m: int = key(16, "PQ sub-quantizers (must divide feat_dim).", gt=0)
    ef_search: int = key(128, "HNSW candidates explored per query (at least top_k).", gt=0)
    batch_size: int = key(128, "Images per extraction batch.", gt=0)
    graph_k: int = key(32, "Nearest gallery neighbours kept per item in the index (with squared distances and "
                           "row maxima), so that 'reid search --rerank' computes only the queries' work; "
                           "re-ranking needs at least max(re_ranking.k1 + 1, re_ranking.k2) (a search "
                           "with more rebuilds the graph once). 0: no graph until the first re-ranked "
                           "search.", ge=0)
    graph: str = key("exact", "How 'reid index build' computes the neighbour graph: 'exact' (blocked matmul, "
                              "CUDA when present), or approximate FAISS 'ivf' / 'hnsw' for millions on a "
                              "CPU (the build logs its top-10 agreement with exact on 1,000 items).",
                     choices=("exact", "ivf", "hnsw"))


@dataclass
class SearchConfig:
    top_k: int = key(10, "Matches returned per query.", gt=0)
    rerank: bool = key(False, "Re-rank with k-reciprocal encoding (re_ranking.k1/k2/lambda_value).")


@dataclass
class ServeConfig:
    max_batch: int = key(32, "'reid serve': most queries searched in one batch (one gallery pass, one model batch).",
                         gt=0)
    max_batch_delay_ms: float = key(2.0, "'reid serve': how long the first waiting search waits for others to "
                                         "batch with (milliseconds).", ge=0)
    max_queue: int = key(1024, "'reid serve': most queries waiting; beyond, a search gets 503 with Retry-After.",
                         gt=0)
    max_body_mb: float = key(16.0, "'reid serve': largest request body (MB); larger ones get 413.", gt=0)
    max_top_k: int = key(1000, "'reid serve': largest top_k a search may ask for.", gt=0)
    max_items: int = key(10000, "'reid serve': most items (or queries) in one request.", gt=0)
    snapshot_items: int = key(10000, "'reid serve': write the index file (a snapshot) after this many logged "
                                     "adds and deletes...", gt=0)
    snapshot_seconds: float = key(300.0, "'reid serve': ...or this many seconds after the first write not in the "
                                         "index file (and always at shutdown).", gt=0)
    retention: str = key("", "'reid serve': delete items older than this, on a schedule: a duration such as "
                             "'30d', '12h', '90m', '45s'; '' keeps items until deleted.")
    token_file: str = key("", "'reid serve': file holding the bearer token every /v1 route requires (else "
                              "$REID_SERVE_TOKEN; neither: no token).")


@dataclass
class ExperimentConfig:
    results_dir: str = key("results", "Root output folder; every command writes <results_dir>/<command>/.")
    encryption_key: Optional[str] = key(None, "Passphrase for encrypted models (prefer --key-file or "
                                              "REID_KEY).")
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"doc": "Model architecture."})
    dataset: DatasetConfig = field(default_factory=DatasetConfig, metadata={"doc": "Data and augmentation."})
    re_ranking: ReRankingConfig = field(default_factory=ReRankingConfig, metadata={"doc": "Re-ranking."})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"doc": "Training."})
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig, metadata={"doc": "Evaluation."})
    inference: InferenceConfig = field(default_factory=InferenceConfig, metadata={"doc": "Inference."})
    export: ExportConfig = field(default_factory=ExportConfig, metadata={"doc": "ONNX export."})
    build_engine: BuildEngineConfig = field(default_factory=BuildEngineConfig,
                                            metadata={"doc": "Engine build."})
    index: IndexConfig = field(default_factory=IndexConfig, metadata={"doc": "Gallery index."})
    search: SearchConfig = field(default_factory=SearchConfig, metadata={"doc": "Gallery search."})
    serve: ServeConfig = field(default_factory=ServeConfig, metadata={"doc": "Search service."})

    def command_dir(self, command: str) -> Path:
        """The output folder of a command: the section's results_dir or <results_dir>/<command>."""
        section = getattr(self, command, None)
        own = getattr(section, "results_dir", None)
        return Path(own) if own else Path(self.results_dir) / command


Spec = ExperimentConfig


def load_spec(path: str | Path | None, overrides: Sequence[str] = ()) -> Spec:
    """Load a YAML spec (or the defaults when ``path`` is None), apply ``a.b=value`` overrides, validate."""
    layers = [_read_yaml(Path(path))] if path is not None else []
    return _build(layers, _parse_overrides(overrides))


def spec_from_yaml(text: str) -> Spec:
    """A spec from YAML text (the copy stored inside checkpoints)."""
    try:
        layer = OmegaConf.create(text)
    except Exception as exc:
        raise SpecError(f"embedded spec is malformed: {str(exc).splitlines()[0]}") from None
    return _build([layer])


def _build(layers: list[DictConfig], overrides: Sequence[tuple[str, Any]] = ()) -> Spec:
    """Merge the layers onto the schema, then set each override in order (a mapping value replaces)."""
    layers = [OmegaConf.structured(ExperimentConfig), *layers]
    try:
        merged = OmegaConf.merge(*layers)
        for dotted, value in overrides:
            OmegaConf.update(merged, dotted, value, merge=False)
        spec = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise SpecError(_describe_omegaconf_error(exc)) from None
    except (TypeError, ValueError) as exc:
        raise SpecError(f"spec error: {str(exc).splitlines()[0]}") from None
    validate(spec)
    return spec


def _read_yaml(path: Path) -> DictConfig:
    if not path.is_file():
        raise SpecError(missing_file(path, "spec file"))
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SpecError(f"{shown(path)}: malformed YAML{where}: {shown(problem)}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"{shown(path)}: cannot read spec: {exc}") from None
    if not isinstance(loaded, dict):
        raise SpecError(f"{shown(path)}: a spec must be a YAML mapping of sections, got {type(loaded).__name__}")
    _check_sections(loaded, ExperimentConfig, "")
    try:
        return OmegaConf.create(loaded)
    except OmegaConfBaseException as exc:
        raise SpecError(_describe_omegaconf_error(exc)) from None


def _parse_overrides(overrides: Sequence[str]) -> list[tuple[str, Any]]:
    """``a.b=value`` strings -> (dotted key, YAML-parsed value), unknown keys named."""
    parsed = []
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise SpecError(f"override {item!r} is not of the form section.key=value")
        try:
            layer = OmegaConf.from_dotlist([item])
        except Exception as exc:
            raise SpecError(f"override {item!r} could not be parsed: {str(exc).splitlines()[0]}") from None
        _check_sections(OmegaConf.to_container(layer), ExperimentConfig, "")
        dotted = item.split("=", 1)[0].strip()
        value = OmegaConf.select(layer, dotted)
        parsed.append((dotted, OmegaConf.to_container(value) if OmegaConf.is_config(value) else value))
    return parsed


def _check_sections(tree: dict, cls: Any, prefix: str) -> None:
    """Unknown keys and sections given as non-mappings, named before OmegaConf sees them."""
    known = {f.name: f for f in fields(cls)}
    for name, value in tree.items():
        path = f"{prefix}{shown(name)}"
        if name not in known:
            raise SpecError(f"spec error: {path}: unknown key '{shown(name)}'; allowed: {', '.join(known)}")
        default = _default_of(known[name])
        if is_dataclass(default):
            if not isinstance(value, dict):
                raise SpecError(f"spec error: {path} = {value!r} is not allowed; expected a mapping of "
                                f"{path} keys")
            _check_sections(value, type(default), path + ".")
        elif value is not None and isinstance(default, (list, dict)) and not isinstance(value, type(default)):
            raise SpecError(f"spec error: {path} = {value!r} is not allowed; expected a "
                            f"{type(default).__name__}")
        elif isinstance(value, list) and any(isinstance(v, (list, dict)) for v in value):
            raise SpecError(f"spec error: {path} = {value!r} is not allowed; expected a list of single values")
        elif isinstance(value, (list, dict)) and not isinstance(default, (list, dict)):
            raise SpecError(f"spec error: {path} = {value!r} is not allowed; expected a single value")


def _describe_omegaconf_error(exc: OmegaConfBaseException) -> str:
    full_key = shown(getattr(exc, "full_key", None) or "spec")
    message = shown(str(exc).splitlines()[0])
    if type(exc).__name__ == "ConfigKeyError" and "not in" in message:
        parent, _, leaf = full_key.rpartition(".")
        section = _section_at(parent)
        allowed = ", ".join(f.name for f in fields(section)) if section is not None else ""
        return f"spec error: {full_key}: unknown key '{leaf}'" + (f"; allowed: {allowed}" if allowed else "")
    return f"spec error: {full_key}: {message}"


def _section_at(dotted: str) -> Any:
    node: Any = ExperimentConfig
    for part in filter(None, dotted.split(".")):
        match = [f for f in fields(node) if f.name == part]
        if not match or not is_dataclass(_default_of(match[0])):
            return None
        node = type(_default_of(match[0]))
    return node


def _default_of(f: Any) -> Any:
    if f.default_factory is not MISSING:
        return f.default_factory()
    return f.default


def validate(spec: Spec) -> None:
    """Check every key against its allowed values, then the rules that tie keys together."""
    _check_section(spec, "")
    model, data, optim = spec.model, spec.dataset, spec.train.optim
    _require(len(model.stride_size) == 2 and all(s > 0 for s in model.stride_size),
             "model.stride_size", model.stride_size, "two positive integers [h, w]")
    for name in ("pixel_mean", "pixel_std"):
        values = getattr(data, name)
        _require(len(values) == model.input_channels, f"dataset.{name}", values,
                 f"{model.input_channels} entries (model.input_channels)")
        _require(all(math.isfinite(v) for v in values), f"dataset.{name}", values, "finite numbers")
    _require(all(s > 0 for s in data.pixel_std), "dataset.pixel_std", data.pixel_std, "values > 0")
    steps = optim.lr_steps
    _require(all(s > 0 for s in steps) and all(a < b for a, b in zip(steps, steps[1:])),
             "train.optim.lr_steps", steps, "positive epochs in strictly ascending order")
    if data.sampler in ("triplet", "softmax_triplet"):
        _require(data.batch_size % data.num_instances == 0, "dataset.batch_size", data.batch_size,
                 f"a multiple of dataset.num_instances ({data.num_instances}) for sampler {data.sampler}")
    engine = spec.build_engine
    _require(engine.min_batch_size <= engine.opt_batch_size <= engine.max_batch_size,
             "build_engine.opt_batch_size", engine.opt_batch_size,
             f"min_batch_size <= opt_batch_size <= max_batch_size "
             f"({engine.min_batch_size}..{engine.max_batch_size})")
    _require(spec.re_ranking.k2 <= spec.re_ranking.k1, "re_ranking.k2", spec.re_ranking.k2,
             f"at most re_ranking.k1 ({spec.re_ranking.k1})")
    _require(not spec.serve.retention or parse_duration(spec.serve.retention) is not None, "serve.retention",
             spec.serve.retention, "a duration such as '30d', '12h', '90m' or '45s', or ''")


DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float | None:
    """Seconds of a duration such as '30d', '12h', '90m', '45s' or '2.5h'; None when it is not one."""
    text = text.strip().lower()
    try:
        value = float(text[:-1]) if text[-1:] in DURATION_UNITS else None
    except ValueError:
        return None
    return value * DURATION_UNITS[text[-1]] if value is not None and math.isfinite(value) and value > 0 else None


def _check_section(section: Any, prefix: str) -> None:
    for f in fields(section):
        value = getattr(section, f.name)
        path = f"{prefix}{f.name}"
        if is_dataclass(value):
            _check_section(value, path + ".")
            continue
        meta = f.metadata
        if value is None:
            continue
        if meta.get("choices") is not None:
            _require(value in meta["choices"], path, value,
                     "one of " + ", ".join(repr(c) if c == "" else str(c) for c in meta["choices"]))
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            _require(math.isfinite(value), path, value, "a finite number")
            for bound, test, word in (("ge", lambda v, b: v >= b, ">="), ("gt", lambda v, b: v > b, ">"),
                                      ("le", lambda v, b: v <= b, "<="), ("lt", lambda v, b: v < b, "<")):
                limit = meta.get(bound)
                if limit is not None:
                    _require(test(value, limit), path, value, f"a value {word} {limit}")


def _require(ok: bool, path: str, value: Any, allowed: str) -> None:
    if not ok:
        raise SpecError(f"spec error: {path} = {value!r} is not allowed; expected {allowed}")


def to_yaml(spec: Spec, redact: bool = True) -> str:
    """The resolved spec as YAML; the encryption key is replaced unless ``redact`` is False."""
    conf = OmegaConf.structured(spec)
    if redact and conf.encryption_key:
        conf.encryption_key = REDACTED
    return OmegaConf.to_yaml(conf)


def spec_hash(spec: Spec) -> str:
    """A short, key-free fingerprint of the model-defining part of the spec."""
    text = OmegaConf.to_yaml(OmegaConf.structured(spec.model)) + str(spec.dataset.pixel_mean) + \
        str(spec.dataset.pixel_std)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def reference_table() -> str:
    """Markdown table of every key: type, default, allowed values, meaning."""
    rows = ["| key | type | default | allowed | meaning |", "|---|---|---|---|---|"]

    def walk(cls: Any, prefix: str) -> None:
        for f in fields(cls):
            default = _default_of(f)
            if is_dataclass(default):
                walk(type(default), f"{prefix}{f.name}.")
                continue
            meta = f.metadata
            if meta.get("choices") is not None:
                allowed = " / ".join(f"`{c!r}`" if c == "" else f"`{c}`" for c in meta["choices"])
            else:
                bounds = [f"{word} {meta[b]}" for b, word in
                          (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")) if meta.get(b) is not None]
                allowed = ", ".join(bounds) or "any"
            type_name = str(f.type).replace("Optional[", "").rstrip("]") if "Optional" in str(f.type) \
                else str(f.type)
            rows.append(f"| `{prefix}{f.name}` | {type_name} | `{default}` | {allowed} | {meta['doc']} |")

    walk(ExperimentConfig, "")
    return "\n".join(rows)
