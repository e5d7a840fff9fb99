"""Quantized graphs to ONNX with explicit Q/DQ nodes, and the check of what a graph holds.

ModelOpt's fake-quant layers export through torch's TorchScript exporter (torch.onnx.export with
dynamo=False), where each enabled quantizer becomes a QuantizeLinear -> DequantizeLinear pair
(INT8: standard ONNX ops, per-channel on the weights; FP8: TensorRT's TRT_FP8QuantizeLinear /
TRT_FP8DequantizeLinear custom ops, which only TensorRT loads). This is the explicit-precision
form TensorRT 10/11 builds strongly typed and ONNX Runtime runs with its INT8 kernels.

Attention is exported as ONNX Runtime's fused MultiHeadAttention in float, as in every other
export (export/models/attention.py, "mha": its CPU flash path keeps memory linear in the positions;
`osdiff build` rewrites it into the plain pattern TensorRT fuses). ModelOpt's quantizers sit on the
convolutions and linear layers around it, never inside it.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from unittest import mock

import onnx
import torch
from torch import nn

from osdiff.config import ModelConfig
from osdiff.export.model import graph_shapes
from osdiff.export.models.attention import export_form, register_torchscript_symbolic

OPSET = 18  # as export/onnx_export.py: QuantizeLinear/DequantizeLinear with per-axis scales
ATTENTION_FORM = "mha"  # the manifest's word for it, as export/onnx_export.py writes it


def export_qdq(module: nn.Module, cfg: ModelConfig, graph: str, inputs: tuple[str, ...], outputs: tuple[str, ...],
               path: str | Path) -> None:
    """Write a fake-quantized graph (calibration/quantize.py) to `path`: float32 inputs and
    outputs, batch, height and width dynamic."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    m = cfg.pad_multiple
    shapes = graph_shapes(cfg, graph, 2, 2 * m, 3 * m)
    args = tuple(torch.randn(shapes[i]) for i in inputs)
    dynamic = {n: {0: "batch", 2: f"{n}_height", 3: f"{n}_width"} for n in inputs + outputs}
    register_torchscript_symbolic()
    # The TorchScript exporter runs its graph lint (a consistency check of the traced graph that
    # no later step needs) ten times, and on a fake-quantized graph, thousands of nodes, those
    # runs are half the export (tiny model's denoiser: 17.7 of 38 s). The ONNX checker below
    # still checks what is written. A private hook: where a torch lacks it, the lint just runs.
    no_lint = (mock.patch.object(torch._C, "_jit_pass_lint", lambda graph: None) if hasattr(torch._C, "_jit_pass_lint")
               else contextlib.nullcontext())
    with export_form(ATTENTION_FORM), torch.no_grad(), warnings.catch_warnings(), no_lint:
        warnings.simplefilter("ignore")  # tracer warnings about Python values taken as constants
        # no constant folding: every weight keeps its parameter's name (which qdq_layers reads);
        # ONNX Runtime and Polygraphy fold the constants when they load the graph
        torch.onnx.export(module.eval(), args, str(path), dynamo=False, opset_version=OPSET, input_names=list(inputs),
                          output_names=list(outputs), dynamic_axes=dynamic, do_constant_folding=False)
    model = onnx.load(str(path))
    if not any(n.domain == "trt" for n in model.graph.node):  # the checker knows no TensorRT ops
        onnx.checker.check_model(model, full_check=False)


_QUANT_OPS = ("QuantizeLinear", "TRT_FP8QuantizeLinear")
_DEQUANT_OPS = ("DequantizeLinear", "TRT_FP8DequantizeLinear")
_LAYER_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")


def qdq_layers(path: str | Path) -> dict[str, dict[str, bool]]:
    """Per layer of an ONNX graph (a Conv, ConvTranspose, MatMul or Gemm whose weight is a
    parameter, named by the parameter's module path, e.g. "decoder.up.1.block.0.conv1"):
    whether its input and its weight come through a DequantizeLinear, and whether its output
    goes into a QuantizeLinear. Nodes whose second operand is computed are listed under their
    node name, with weight False."""
    model = onnx.load(str(path), load_external_data=False)
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    params = {i.name for i in model.graph.initializer}
    out: dict[str, dict[str, bool]] = {}
    for n in model.graph.node:
        if n.op_type not in _LAYER_OPS:
            continue
        src = producer.get(n.input[0])
        dq_input = src is not None and src.op_type in _DEQUANT_OPS
        q_output = any(c.op_type in _QUANT_OPS for c in consumers.get(n.output[0], []))
        name, dq_weight = n.input[1], False
        while name not in params and name in producer and producer[name].op_type in _WEIGHT_PATH_OPS:
            dq_weight |= producer[name].op_type in _DEQUANT_OPS
            name = producer[name].input[0]
        if name in params and name.endswith(".weight"):
            out[name.removesuffix(".weight")] = {"input": dq_input, "weight": dq_weight, "output": q_output}
        else:
            out[n.name] = {"input": dq_input, "weight": False, "output": q_output}
    return out


def attention_inputs(path: str | Path) -> list[list[str]]:
    """Per com.microsoft.MultiHeadAttention node of an ONNX graph, the op types producing its
    inputs (the attention computes in float: none of them may be a DequantizeLinear)."""
    model = onnx.load(str(path), load_external_data=False)
    producer = {o: n for n in model.graph.node for o in n.output}
    return [[producer[i].op_type if i in producer else "(graph input)" for i in n.input if i]
            for n in model.graph.node if n.op_type == "MultiHeadAttention"]


# what lies between a parameter and the layer that uses it
_WEIGHT_PATH_OPS = (*_QUANT_OPS, *_DEQUANT_OPS, "Transpose", "Cast", "Identity")


def count_qdq(path: str | Path) -> int:
    """Number of QuantizeLinear nodes (of either kind) in an ONNX graph."""
    model = onnx.load(str(path), load_external_data=False)
    return sum(n.op_type in _QUANT_OPS for n in model.graph.node)
