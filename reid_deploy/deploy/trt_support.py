"""TensorRT readiness without TensorRT: an ONNX graph checked against the parser's documented support.

Every node is looked up in ``trt_operators`` (the TensorRT 10 operator table, its source named there) and
checked against the restrictions that can be decided from the file: the opset range, constant ``axes``
inputs, pooling rank and dilations, Resize modes, Constant attribute kinds, unused extra outputs, and the
Q/DQ rules (zero point 0, INT8 not UINT8, positive scales, per-channel scales only on weights, no INT32
DequantizeLinear). Node calls of model-local functions and subgraphs (If/Loop/Scan) are checked inside.
Not enforced: restrictions of operators these exports never contain (RNN/LSTM/GRU, TopK, ScatterND, Loop,
If branch shapes, ...; they stay in the table as text) and per-operator data types other than Q/DQ's (the
table's type column needs full type inference). ``reid build-engine`` still reports whatever TensorRT's
own parser says.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from reid_deploy.deploy.trt_operators import (
    NOT_SUPPORTED,
    OLDER_PARSERS,
    OPSET_RANGE,
    PARSER,
    QUANTIZED_TYPES,
    SOURCE,
    SUPPORTED,
)
from reid_deploy.errors import ModelFileError

_REDUCE_OPS = ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
               "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare")
_AXES_INPUT = {"Slice": 3, "Squeeze": 1, "Unsqueeze": 1, "Pad": 3, "CumSum": 1, **dict.fromkeys(_REDUCE_OPS, 1)}
_POOLS = ("AveragePool", "MaxPool", "LpPool")
_RESIZE_MODES = {  # attribute: (allowed values, ONNX default)
    "coordinate_transformation_mode": ({"half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric",
                                        "align_corners"}, "half_pixel"),
    "mode": ({"nearest", "linear"}, "nearest"),
    "nearest_mode": ({"floor", "ceil", "round_prefer_floor", "round_prefer_ceil"}, "round_prefer_floor"),
    "keep_aspect_ratio_policy": ({"stretch"}, "stretch"),
}
_FIRST_OUTPUT_ONLY = {"LayerNormalization": "outputs Mean/InvStdDev", "MaxPool": "output Indices"}
_ORT_ONLY_QUANT = {"DynamicQuantizeLinear", "MatMulInteger", "ConvInteger", "QLinearConv", "QLinearMatMul"}
_MAX_RECORDED = 20


@dataclass(frozen=True)
class Problem:
    """One node TensorRT's parser would refuse, and why."""

    node: str
    op: str
    reason: str

    def __str__(self) -> str:
        return f"node {self.node} ({self.op}): {self.reason}"


@dataclass
class TrtSupport:
    """The result for one graph: how many of its nodes pass, and the problems found."""

    opset: int | None
    nodes: int
    unsupported: int
    problems: list[Problem]

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def supported(self) -> int:
        return self.nodes - self.unsupported

    def older_parsers(self) -> list[str]:
        """Older TensorRT parsers that would refuse this graph's opset, with the opset they need."""
        return [f"{name} needs opset <= {top}" for name, top in OLDER_PARSERS
                if self.opset is not None and self.opset > top]

    def line(self) -> str:
        """One line for the terminal."""
        older = "".join(f"; {text}" for text in self.older_parsers()[:1])  # the oldest parser says the most
        text = f"{PARSER} parser: {self.supported}/{self.nodes} nodes supported (opset {self.opset}{older})"
        if self.problems:
            more = f" (+{len(self.problems) - 1} more)" if len(self.problems) > 1 else ""
            return f"{text}; first problem: {self.problems[0]}{more}"
        return text

    def as_dict(self) -> dict[str, Any]:
        return {"summary": self.line(), "parser": PARSER, "source": SOURCE, "opset": self.opset, "nodes": self.nodes,
                "supported": self.supported, "problems": [str(p) for p in self.problems[:_MAX_RECORDED]],
                "older_parsers": self.older_parsers()}


def check_tensorrt_support(model: Any) -> TrtSupport:
    """Check an ``onnx.ModelProto`` against the TensorRT 10 parser's table and rules."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    problems = []
    if opset is not None and not OPSET_RANGE[0] <= opset <= OPSET_RANGE[1]:
        problems.append(Problem("(model)", "opset_import", f"opset {opset} is outside the {PARSER} parser's "
                                                           f"{OPSET_RANGE[0]}-{OPSET_RANGE[1]}"))
    functions = {(f.domain, f.name): f for f in model.functions}
    scope = _Scope(model.graph.node, model.graph.initializer, model.graph.input, model.graph.output,
                   model.graph.value_info, None)
    unsupported = 0
    for index, node in enumerate(model.graph.node):
        found = _check_node(node, _name(node, index), scope, functions)
        unsupported += bool(found)
        problems.extend(found)
    return TrtSupport(opset, len(model.graph.node), unsupported, problems)


def require_tensorrt_support(model: Any, source: str) -> TrtSupport:
    """``check_tensorrt_support``, raising ModelFileError that names the first offending node."""
    result = check_tensorrt_support(model)
    if not result.ok:
        raise ModelFileError(f"{source} would not parse in the {PARSER} ONNX parser: {result.problems[0]} "
                             f"({result.supported}/{result.nodes} nodes supported; per {SOURCE})")
    return result


def _name(node: Any, index: int) -> str:
    return node.name or f"#{index}"


class _Scope:
    """What one graph (or function body / subgraph) knows about its tensors: constants, types, consumers."""

    def __init__(self, nodes: Iterable[Any], initializers: Iterable[Any], inputs: Iterable[Any],
                 outputs: Iterable[Any], value_info: Iterable[Any], parent: _Scope | None):
        from onnx import TensorProto

        self.parent = parent
        self.constants: dict[str, Any] = {t.name: t for t in initializers}
        self.types: dict[str, int] = {t.name: t.data_type for t in initializers}
        for v in (*inputs, *outputs, *value_info):
            if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type:
                self.types[v.name] = v.type.tensor_type.elem_type
        self.consumed = {name for node in nodes for name in node.input} | {v.name for v in outputs}
        for node in nodes:
            if node.op_type == "Constant" and node.output:
                self.constants[node.output[0]] = node
                value = next((a.t for a in node.attribute if a.name == "value"), None)
                if value is not None:
                    self.types[node.output[0]] = value.data_type
            elif node.op_type == "Cast" and node.output:
                self.types[node.output[0]] = next((a.i for a in node.attribute if a.name == "to"), 0)
            elif node.op_type == "QuantizeLinear" and node.output:
                output_dtype = next((a.i for a in node.attribute if a.name == "output_dtype"), 0)
                zero_type = self.type_of(node.input[2]) if len(node.input) > 2 and node.input[2] else None
                self.types[node.output[0]] = zero_type or output_dtype or TensorProto.UINT8  # ONNX's default

    def is_constant(self, name: str) -> bool:
        return name in self.constants or (self.parent is not None and self.parent.is_constant(name))

    def value(self, name: str) -> np.ndarray | None:
        """The value of a constant tensor, or None when it is computed (or a Constant of another kind)."""
        from onnx import numpy_helper

        if name not in self.constants:
            return self.parent.value(name) if self.parent is not None else None
        found = self.constants[name]
        if hasattr(found, "op_type"):  # a Constant node
            attr = found.attribute[0] if found.attribute else None
            if attr is None or attr.name not in ("value", "value_float", "value_floats", "value_int", "value_ints"):
                return None
            from onnx import helper

            value = helper.get_attribute_value(attr)
            return numpy_helper.to_array(value) if attr.name == "value" else np.asarray(value)
        return numpy_helper.to_array(found)

    def dims(self, name: str) -> tuple[int, ...] | None:
        """The shape of a constant tensor (without reading its data), or None when it is computed."""
        if name not in self.constants:
            return self.parent.dims(name) if self.parent is not None else None
        found = self.constants[name]
        if not hasattr(found, "op_type"):
            return tuple(found.dims)
        value = self.value(name)
        return None if value is None else value.shape

    def type_of(self, name: str) -> int | None:
        if name in self.types:
            return self.types[name]
        return self.parent.type_of(name) if self.parent is not None else None


def _check_node(node: Any, name: str, scope: _Scope, functions: dict[tuple[str, str], Any]) -> list[Problem]:
    """Problems of one node (of the nodes inside it, for a function call or a node with subgraphs)."""
    if (node.domain, node.op_type) in functions:
        body = functions[(node.domain, node.op_type)]
        inner = _Scope(body.node, (), (), (), (), None)
        return [Problem(f"{name}/{p.node}", p.op, p.reason) for i, n in enumerate(body.node)
                for p in _check_node(n, _name(n, i), inner, functions)]
    if node.domain not in ("", "ai.onnx"):
        return [Problem(name, node.op_type, f"custom operator of domain '{node.domain}': not in the {PARSER} "
                                            f"parser's table (it would need a TensorRT plugin)")]
    if node.op_type not in SUPPORTED:
        if node.op_type in NOT_SUPPORTED:
            hint = (" (ONNX Runtime's integer quantization; TensorRT builds INT8 from the static Q/DQ model)"
                    if node.op_type in _ORT_ONLY_QUANT else "")
            return [Problem(name, node.op_type, f"marked not supported in the {PARSER} operator table{hint}")]
        return [Problem(name, node.op_type, f"not in the {PARSER} operator table")]
    reasons = [r for r in _restrictions(node, scope) if r]
    problems = [Problem(name, node.op_type, r) for r in reasons]
    for attr in node.attribute:  # If / Loop / Scan bodies
        for graph in ([attr.g] if attr.HasField("g") else list(attr.graphs)):
            inner = _Scope(graph.node, graph.initializer, graph.input, graph.output, graph.value_info, scope)
            problems += [Problem(f"{name}/{p.node}", p.op, p.reason) for i, n in enumerate(graph.node)
                         for p in _check_node(n, _name(n, i), inner, functions)]
    return problems


def _attrs(node: Any) -> dict[str, Any]:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute if a.name not in ("value", "body")}


def _restrictions(node: Any, scope: _Scope) -> Iterable[str | None]:
    """Reasons (None = fine) from the table's Restrictions column and the parser's Q/DQ rules."""
    op, attrs = node.op_type, _attrs(node)
    if op in ("QuantizeLinear", "DequantizeLinear"):
        yield from _qdq(node, attrs, scope)
    if op in _AXES_INPUT and len(node.input) > _AXES_INPUT[op] and node.input[_AXES_INPUT[op]]:
        if not scope.is_constant(node.input[_AXES_INPUT[op]]):
            yield f"its {'axis' if op == 'CumSum' else 'axes'} input is computed; the table requires a constant"
    if op in _POOLS:
        if "kernel_shape" in attrs and len(attrs["kernel_shape"]) not in (2, 3):
            yield f"{len(attrs['kernel_shape'])}D pooling; the table allows 2D or 3D only"
        if any(d != 1 for d in attrs.get("dilations", [])):
            yield f"dilations {list(attrs['dilations'])}; the table requires none or all ones"
    if op in _FIRST_OUTPUT_ONLY and any(out in scope.consumed for out in node.output[1:] if out):
        yield f"its {_FIRST_OUTPUT_ONLY[op]} is used; the table supports only the first output"
    if op == "Resize":
        for key, (allowed, default) in _RESIZE_MODES.items():
            value = attrs.get(key, default)
            value = value.decode() if isinstance(value, bytes) else value
            if value not in allowed:
                yield f"{key}={value} is not supported (allowed: {', '.join(sorted(allowed))})"
        if attrs.get("antialias", 0):
            yield "antialias=1 is not supported"
    if op == "Constant":
        kinds = {a.name for a in node.attribute} & {"sparse_value", "value_string", "value_strings"}
        if kinds:
            yield f"attribute {sorted(kinds)[0]} is not supported"


def _qdq(node: Any, attrs: dict[str, Any], scope: _Scope) -> Iterable[str | None]:
    """Q/DQ rules: symmetric INT8 (or FP8/INT4), positive scales, per-channel only on constant weights."""
    from onnx import TensorProto

    def type_name(t: int) -> str:
        return TensorProto.DataType.Name(t)

    data, scale = node.input[0], node.input[1] if len(node.input) > 1 else ""
    zero = node.input[2] if len(node.input) > 2 else ""
    if node.op_type == "DequantizeLinear":
        dtype = scope.type_of(data) or (scope.type_of(zero) if zero else None)
        if dtype and type_name(dtype) not in QUANTIZED_TYPES:
            bias = " (an INT32 bias)" if dtype == TensorProto.INT32 else ""
            yield f"dequantizes {type_name(dtype)}{bias}; TensorRT takes {', '.join(QUANTIZED_TYPES)} only"
    else:
        dtype = scope.type_of(zero) if zero else attrs.get("output_dtype") or TensorProto.UINT8
        if type_name(dtype) not in QUANTIZED_TYPES:
            missing = " (no zero point: ONNX means UINT8)" if not zero else ""
            yield f"quantizes to {type_name(dtype)}{missing}; TensorRT takes symmetric INT8 (or FP8/INT4) only"
    if zero:
        values = scope.value(zero)
        if values is None:
            yield "its zero point is computed; TensorRT needs a constant zero point of 0"
        elif np.any(values.astype(np.float64) != 0):
            yield f"zero point {_short(values)} is not 0 (TensorRT takes symmetric quantization only)"
    scales = scope.value(scale) if scale else None
    if scales is not None:
        if not np.all(scales.astype(np.float64) > 0):
            yield "its scales are not all positive"
        if scales.size > 1:
            shape = scope.dims(data)
            if shape is None:
                yield f"per-channel scales ({scales.size}) on an activation; TensorRT takes them for weights only"
            elif scales.ndim == 1 and shape[attrs.get("axis", 1)] != scales.size:
                yield f"{scales.size} scales for {shape[attrs.get('axis', 1)]} channels on axis {attrs.get('axis', 1)}"


def _short(values: np.ndarray) -> str:
    flat = values.ravel()
    shown = ", ".join(f"{v:g}" for v in flat[:4]) + (", ..." if flat.size > 4 else "")
    return f"[{shown}]" if values.ndim else shown
