"""INT8 Q/DQ graphs as ONNX Runtime's x86 kernels run them fast: activations in uint8.

`osdiff calibrate` writes signed, symmetric INT8 (int8 with zero point 0), as TensorRT requires.
ONNX Runtime's CPU provider fuses DQ -> Conv -> Q into an integer QLinearConv, but its x86
integer GEMMs (VNNI, AMX) are built for uint8 activations times int8 weights: with int8
activations the same convolutions ran 2 to 3 times slower than fp32 (built-in model, chelsea's
size, Intel Xeon with AVX-512 VNNI and AMX), and ORT's own int8 -> uint8 rewrite of Q/DQ pairs
skips every Q whose output feeds more than one DQ (a convolution's output read by a GroupNorm
and a residual), leaving those convolutions in float. So the backends rewrite every activation
Q/DQ pair to uint8 with zero point 128 when they load an INT8 graph: the same 256 levels on the
same scale (q_u8 = q_s8 + 128), the same dequantized values, bit for bit; weights stay int8.

Imports no torch (serving/graph_model.py uses it).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import numpy_helper
from onnx.external_data_helper import uses_external_data

if TYPE_CHECKING:
    import onnxruntime as ort

_ZERO_POINT = "osdiff_uint8_zero_point_128"


def uint8_activations(model: onnx.ModelProto, folder: str | Path = "") -> int:
    """Rewrite, in place, every QuantizeLinear/DequantizeLinear of an activation whose zero
    point is int8 0 to uint8 zero point 128 (see the module docstring). A weight's pair (its
    QuantizeLinear reads an initializer or a Constant) is left as it is. Reads only the zero
    points (from `folder`, where they lie in external data). Returns the number of nodes
    rewritten (0 for a graph without Q/DQ)."""
    graph = model.graph
    consts = {i.name: i for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}

    def value(name: str) -> np.ndarray | None:
        if name in consts:
            return numpy_helper.to_array(consts[name], base_dir=str(folder))
        node = producer.get(name)
        if node is None:
            return None
        if node.op_type == "Constant" and node.attribute[0].name == "value":
            return numpy_helper.to_array(node.attribute[0].t)
        if node.op_type == "Cast":
            v = value(node.input[0])
            to = next(a.i for a in node.attribute if a.name == "to")
            return None if v is None else v.astype(onnx.helper.tensor_dtype_to_np_dtype(to))
        return None

    def is_weight(name: str) -> bool:
        return name in consts or (name in producer and producer[name].op_type == "Constant")

    changed: list[onnx.NodeProto] = []
    for n in graph.node:
        if n.op_type == "QuantizeLinear":
            activation = not is_weight(n.input[0])
        elif n.op_type == "DequantizeLinear":
            q = producer.get(n.input[0])
            activation = q is not None and q.op_type == "QuantizeLinear" and not is_weight(q.input[0])
        else:
            continue
        if not activation or len(n.input) < 3:
            continue
        zp = value(n.input[2])
        if zp is None or zp.dtype != np.int8 or zp.size != 1 or zp.item() != 0:
            continue
        changed.append(n)
    if changed:
        graph.initializer.append(numpy_helper.from_array(np.array(128, dtype=np.uint8), _ZERO_POINT))
        outputs = {n.output[0] for n in changed if n.op_type == "QuantizeLinear"}
        replaced = {n.input[2] for n in changed}
        for n in changed:
            n.input[2] = _ZERO_POINT
        # int8 zero points nothing reads now: ORT would warn about each one at load
        read = {i for n in graph.node for i in n.input}
        kept_initializers = [i for i in graph.initializer if i.name not in replaced or i.name in read]
        del graph.initializer[:]
        graph.initializer.extend(kept_initializers)
        # a recorded int8 type of a rewritten Q's output would contradict it: let ORT infer it
        kept = [v for v in graph.value_info if v.name not in outputs]
        del graph.value_info[:]
        graph.value_info.extend(kept)
    return len(changed)


def inference_session(path: str | Path, options: "ort.SessionOptions",
                      providers: list) -> "ort.InferenceSession":
    """An ONNX Runtime session for the graph at `path`; a graph with QuantizeLinear nodes is
    loaded with uint8 activations (see the module docstring). The rewrite touches the graph's
    structure only: a graph whose weights lie in external data files (a full-size denoiser, over
    protobuf's 2 GB) is rewritten without loading them, and ORT reads them from the graph's
    folder (its "model_external_initializers_file_folder_path", set on `options`). Raises what
    onnx.load and ort.InferenceSession raise for a missing or broken file."""
    import onnxruntime as ort

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    if not any(n.op_type == "QuantizeLinear" for n in model.graph.node):
        return ort.InferenceSession(str(path), options, providers=providers)
    uint8_activations(model, path.parent)
    if any(uses_external_data(t) for t in model.graph.initializer):
        key = "session.model_external_initializers_file_folder_path"
        if _config_entry(options, key) != str(path.parent):  # ORT warns on every overwrite
            options.add_session_config_entry(key, str(path.parent))
    return ort.InferenceSession(model.SerializeToString(), options, providers=providers)


def _config_entry(options: "ort.SessionOptions", key: str) -> str | None:
    try:
        return options.get_session_config_entry(key)
    except RuntimeError:  # an unset key
        return None
