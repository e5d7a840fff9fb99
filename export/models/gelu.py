"""Exact GELU, x * 0.5 * (1 + erf(x / sqrt(2))), as one node where ONNX Runtime runs the graph.

torch's dynamo exporter writes nn.GELU as five nodes (Div, Erf, Add, Mul(0.5, .), Mul(x, .)),
an order ONNX Runtime's own GELU fusion does not match, so its CPU provider runs five passes
over the tensor, and in an INT8 graph two DequantizeLinear of the GELU's input (one per reader).
In the heavy graphs the export writes every GELU as ONNX Runtime's `com.microsoft.Gelu` instead
(the attention form "mha": the form of ONNX Runtime's fused ops; export/models/attention.py).
Measured on the full-size G_s, random weights, 512x768, ONNX Runtime 1.31 CPU, 2 threads, Intel
Xeon with AVX-512 VNNI: fp32 64.1 -> 58.6 ms, INT8 43.9 -> 37.8 ms. The LFGCM graphs keep the
five nodes: their outputs decide the stream's CDF indexes, and the streams written before stay
decodable to the same bits.

TensorRT fuses the five-node pattern itself and has no com.microsoft ops: `plain_gelu` writes
them back before a build (engine/prepare.py). The export's "plain" and "scan" forms never write
the one node.
"""

from __future__ import annotations

import math

import onnx
import torch

GELU_DOMAIN = "com.microsoft"


def onnx_translation() -> dict:
    """torch.onnx.export's custom_translation_table entry writing aten::gelu (exact) as one
    com.microsoft.Gelu node. Its signature is registered in onnx's schema registry once (as for
    MultiHeadAttention in export/models/attention.py). Tracing a tanh-approximate GELU raises
    ValueError: no model here has one, and com.microsoft.Gelu is the exact one."""
    from onnx.defs import OpSchema
    from onnxscript.values import Opset

    if not onnx.defs.has("Gelu", GELU_DOMAIN):
        param = OpSchema.FormalParameter
        onnx.defs.register_schema(OpSchema(
            "Gelu", GELU_DOMAIN, 1, inputs=[param("X", "T")], outputs=[param("Y", "T")],
            type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "")]))
    gelu = Opset(GELU_DOMAIN, 1).Gelu

    def exact_gelu(x, approximate: str = "none"):  # type: ignore[no-untyped-def]
        if approximate != "none":
            raise ValueError(f"GELU with approximate={approximate!r}: only the exact GELU is exported as one node")
        return gelu(x)

    return {torch.ops.aten.gelu.default: exact_gelu}


def plain_gelu(model: onnx.ModelProto) -> int:
    """Rewrite every com.microsoft.Gelu node of `model` (in place) into the five nodes torch's
    exporter writes for exact GELU, in the node's own dtype. Returns the number rewritten."""
    from onnx import TensorProto, helper, numpy_helper

    from osdiff.export.models.attention import drop_unused_opset, value_types

    graph = model.graph
    if not any(n.op_type == "Gelu" and n.domain == GELU_DOMAIN for n in graph.node):
        return 0
    dtypes = value_types(model)
    nodes = []
    count = 0
    for node in graph.node:
        if not (node.op_type == "Gelu" and node.domain == GELU_DOMAIN):
            nodes.append(node)
            continue
        count += 1
        p = f"{node.name or node.output[0]}/plain"
        x = node.input[0]
        np_dtype = helper.tensor_dtype_to_np_dtype(dtypes.get(x, TensorProto.FLOAT))
        for name, value in (("sqrt2", math.sqrt(2.0)), ("one", 1.0), ("half", 0.5)):
            graph.initializer.append(numpy_helper.from_array(torch.tensor(value).numpy().astype(np_dtype), f"{p}/{name}"))
        nodes += [
            helper.make_node("Div", [x, f"{p}/sqrt2"], [f"{p}/scaled"]),
            helper.make_node("Erf", [f"{p}/scaled"], [f"{p}/erf"]),
            helper.make_node("Add", [f"{p}/erf", f"{p}/one"], [f"{p}/plus1"]),
            helper.make_node("Mul", [f"{p}/half", f"{p}/plus1"], [f"{p}/cdf"]),
            helper.make_node("Mul", [x, f"{p}/cdf"], list(node.output[:1])),
        ]
    del graph.node[:]
    graph.node.extend(nodes)
    drop_unused_opset(model, GELU_DOMAIN)
    return count
