"""TensorRT readiness without TensorRT: exported Swin-T / ResNet-50 graphs pass the parser's documented support,
hand-made graphs with an unsupported op or a non-symmetric Q/DQ are refused by node name, in the library,
in ``reid export``'s report and in ``reid build-engine`` before TensorRT is imported."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from reid_deploy.deploy import trt_operators
from reid_deploy.deploy.trt_support import check_tensorrt_support, require_tensorrt_support
from reid_deploy.errors import ModelFileError

SPECS = Path(__file__).parents[1] / "specs"
# Op types of full-size exports (Swin-T 384x128, ResNet-50 256x128, untrained), measured once with this
# exporter (torch 2.x: dynamo at opset 18, TorchScript at 17) and ONNX Runtime's static Q/DQ quantizer.
# The tiny models below must have exactly these, so that checking them checks the full-size graphs.
QDQ = {"QuantizeLinear", "DequantizeLinear"}
FULL_SWIN_T_OPS = {
    18: {"Add", "Clip", "Concat", "Conv", "Div", "Erf", "Expand", "Gemm", "LayerNormalization", "MatMul", "Mul",
         "Pad", "ReduceL2", "ReduceMean", "Reshape", "Shape", "Slice", "Softmax", "Squeeze", "Transpose",
         "Unsqueeze"},
    17: {"Add", "BatchNormalization", "Cast", "Clip", "Concat", "Constant", "ConstantOfShape", "Conv", "Div", "Erf",
         "Expand", "Gather", "Identity", "LayerNormalization", "MatMul", "Mod", "Mul", "Pad", "ReduceL2",
         "ReduceMean", "Reshape", "Shape", "Slice", "Softmax", "Split", "Squeeze", "Sub", "Transpose", "Unsqueeze"},
}
FULL_RESNET50_QDQ_OPS = {"Add", "BatchNormalization", "Clip", "Concat", "Conv", "Div", "Expand", "MaxPool",
                         "ReduceL2", "ReduceMean", "Relu", "Reshape", "Shape"} | QDQ
# depths [2, 1, 1, 1]: the second block of stage 1 is a shifted-window block (its mask brings the ops that
# a [1, 1, 1, 1] Swin lacks); 64x32 input keeps the export to seconds.
TINY_SWIN_T = ("model.backbone_args={embed_dim: 16, depths: [2, 1, 1, 1], num_heads: [1, 1, 2, 2]}",
               "model.input_height=64", "model.input_width=32", "model.feat_dim=32")
TINY_RESNET50 = ("model.backbone_args={layers: [1, 1, 1, 1]}", "model.input_height=64", "model.input_width=32")


def _spec(spec_file: str, overrides: tuple[str, ...]):
    from reid_deploy.spec import load_spec

    return load_spec(SPECS / spec_file, ["model.pretrain_choice=''", "dataset.num_classes=8", *overrides])


@functools.cache
def _export(spec_file: str, overrides: tuple[str, ...], opset: int) -> bytes:
    """The exported graph (bytes: each test parses its own copy) of an untrained model of that spec."""
    import torch

    from reid_deploy.deploy.onnx_export import export_proto
    from reid_deploy.model.reid_model import build_model

    spec = _spec(spec_file, overrides)
    torch.manual_seed(0)
    return export_proto(build_model(spec).eval(), spec, opset)[0].SerializeToString()


@pytest.fixture(scope="module", params=[18, 17])
def swin(request):
    return onnx.load_from_string(_export("market1501_swin_tiny.yaml", TINY_SWIN_T, request.param))


@pytest.fixture(scope="module")
def resnet_qdq(demo_dir):
    from reid_deploy.deploy.quantize import calibration_images, quantize_static_bytes
    from reid_deploy.inference.preprocess import Preprocess

    spec = _spec("market1501_resnet50.yaml", TINY_RESNET50)
    images = calibration_images(demo_dir / "bounding_box_train", 4)
    data = quantize_static_bytes(_export("market1501_resnet50.yaml", TINY_RESNET50, 18), Preprocess.from_spec(spec),
                                 images, 2)
    return onnx.load_from_string(data)


def _op_types(model) -> set[str]:
    return {n.op_type for n in model.graph.node}


def test_table_names_its_source_and_the_quantization_ops_it_refuses():
    assert "onnx/onnx-tensorrt docs/operators.md" in trt_operators.SOURCE and trt_operators.OPSET_RANGE == (9, 20)
    assert {"DynamicQuantizeLinear", "MatMulInteger", "ConvInteger", "QLinearConv",
            "QLinearMatMul"} <= trt_operators.NOT_SUPPORTED
    assert "zero" in trt_operators.SUPPORTED["DequantizeLinear"] and "LayerNormalization" in trt_operators.SUPPORTED
    assert not trt_operators.NOT_SUPPORTED & set(trt_operators.SUPPORTED)


def test_tiny_swin_covers_the_op_set_of_full_swin_t_and_passes(swin):
    opset = swin.opset_import[0].version
    assert FULL_SWIN_T_OPS[opset] <= _op_types(swin)  # older exporters add a few op types: all are checked below
    result = check_tensorrt_support(swin)
    assert result.ok, result.problems[:3]
    assert result.supported == result.nodes == len(swin.graph.node)
    assert result.line().startswith(f"TensorRT 10 parser: {result.nodes}/{result.nodes} nodes supported (opset {opset}")
    # TensorRT 8.6 reads opsets up to 17 (its onnx-tensorrt table): said for 18, not for 17
    assert ("TensorRT 8.6 needs opset <= 17" in result.line()) == (opset == 18)


def test_tiny_resnet50_qdq_covers_the_op_set_of_full_resnet50_and_passes(resnet_qdq):
    assert FULL_RESNET50_QDQ_OPS <= _op_types(resnet_qdq)
    result = check_tensorrt_support(resnet_qdq)
    assert result.ok, result.problems[:3]
    assert result.nodes == len(resnet_qdq.graph.node) and result.nodes > 100


def test_dynamic_int8_model_is_reported_as_onnx_runtime_only():
    from reid_deploy.deploy.quantize import quantize_dynamic_bytes

    data = quantize_dynamic_bytes(_export("market1501_swin_tiny.yaml", TINY_SWIN_T, 18))
    result = check_tensorrt_support(onnx.load_from_string(data))
    assert not result.ok and result.supported < result.nodes
    assert {p.op for p in result.problems} == {"DynamicQuantizeLinear", "MatMulInteger"}
    assert "static Q/DQ model" in result.problems[0].reason


def _model(nodes, initializers=(), opset=18):
    graph = helper.make_graph(nodes, "hand-made", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _qdq(zero_point: np.ndarray, scale: np.ndarray | None = None, bias_dtype=None):
    scale = np.array(0.1, np.float32) if scale is None else scale
    inits = [numpy_helper.from_array(scale, "scale"), numpy_helper.from_array(zero_point, "zero")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "scale", "zero"], ["q"], name="quant_x"),
             helper.make_node("DequantizeLinear", ["q", "scale", "zero"], ["y"], name="dequant_x")]
    return _model(nodes, inits)


def _unique():
    return _model([helper.make_node("Relu", ["x"], ["r"], name="relu_0"),
                   helper.make_node("Unique", ["r"], ["y"], name="unique_0")])


def test_unsupported_op_is_named():
    model = _unique()
    result = check_tensorrt_support(model)
    assert (result.supported, result.nodes) == (1, 2)
    (problem,) = result.problems
    assert (problem.node, problem.op) == ("unique_0", "Unique") and "not supported" in problem.reason
    assert "1/2 nodes supported" in result.line() and "node unique_0 (Unique)" in result.line()
    with pytest.raises(ModelFileError, match=r"hand.onnx would not parse .* node unique_0 \(Unique\)"):
        require_tensorrt_support(model, "hand.onnx")


def test_non_zero_zero_point_is_named():
    result = check_tensorrt_support(_qdq(np.array(3, np.int8)))
    assert result.supported == 0
    assert [(p.node, p.op) for p in result.problems] == [("quant_x", "QuantizeLinear"),
                                                         ("dequant_x", "DequantizeLinear")]
    assert all("zero point 3 is not 0" in p.reason for p in result.problems)


@pytest.mark.parametrize("model,expected", [
    (lambda: _qdq(np.array(0, np.uint8)), "UINT8"),
    (lambda: _qdq(np.zeros(4, np.int8), scale=np.full(4, 0.1, np.float32)), "per-channel scales (4) on an activation"),
    (lambda: _model([helper.make_node("DequantizeLinear", ["b", "s"], ["y"], name="bias_dq")],
                    [numpy_helper.from_array(np.arange(4, dtype=np.int32), "b"),
                     numpy_helper.from_array(np.array(0.1, np.float32), "s")]), "INT32 (an INT32 bias)"),
    (lambda: _model([helper.make_node("ReduceMean", ["x", "axes"], ["y"], name="mean"),
                     helper.make_node("Shape", ["x"], ["axes"], name="shape")]), "axes input is computed"),
    (lambda: _model([helper.make_node("MyOp", ["x"], ["y"], name="custom", domain="com.example")]),
     "custom operator of domain 'com.example'"),
])
def test_other_documented_rules(model, expected):
    result = check_tensorrt_support(model())
    assert not result.ok and expected in str(result.problems[0]), result.problems


@pytest.mark.parametrize("opset,ok", [(8, False), (9, True), (20, True), (21, False)])
def test_opset_range(opset, ok):
    result = check_tensorrt_support(_model([helper.make_node("Relu", ["x"], ["y"], name="relu_0")], opset=opset))
    assert result.ok == ok and result.nodes == result.supported == 1
    if not ok:
        assert f"opset {opset} is outside the TensorRT 10 parser's 9-20" in result.line()


def test_export_prints_and_records_the_check(cli, tiny_overrides, tiny_checkpoint, tmp_path):
    result = cli("export", "-e", SPECS / "demo.yaml", *tiny_overrides, f"results_dir={tmp_path}", "--no-encrypt",
                 f"export.checkpoint={tiny_checkpoint}", "export.int8=static", "export.cal_batches=1")
    assert result.code == 0, result.err
    (entry,) = [json.loads(line) for line in (tmp_path / "export" / "status.json").read_text().splitlines()]
    for report in (entry["tensorrt"], entry["int8"]["static"]["tensorrt"]):
        assert report["supported"] == report["nodes"] > 0 and report["problems"] == []
        assert "onnx/onnx-tensorrt" in report["source"]
        assert report["summary"] in result.out
    assert f"TensorRT 10 parser: {entry['tensorrt']['nodes']}/{entry['tensorrt']['nodes']} nodes supported" \
        in result.out


@pytest.mark.parametrize("graph,precision,named", [
    ("unique", "fp16", "node unique_0 (Unique)"), ("zero_point", "int8", "node quant_x (QuantizeLinear)")])
def test_build_engine_refuses_before_tensorrt(cli, tiny_overrides, tmp_path, monkeypatch, graph,
                                              precision, named):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # the check must not need TensorRT
    model = _qdq(np.array(3, np.int8)) if graph == "zero_point" else _unique()
    path = tmp_path / f"{graph}.onnx"
    path.write_bytes(model.SerializeToString())
    result = cli("build-engine", "-e", SPECS / "demo.yaml", *tiny_overrides, f"results_dir={tmp_path}",
                 f"build_engine.onnx_file={path}", f"build_engine.precision={precision}")
    line = result.user_error(f"{path} would not parse in the TensorRT 10 ONNX parser", named)
    assert "TensorRT is not installed" not in line
    assert not list(tmp_path.rglob("*.engine"))
