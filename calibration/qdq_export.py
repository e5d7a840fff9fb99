"""Quantized graphs to ONNX with explicit Q/DQ nodes, and the check of what a graph holds.

A fake-quantized module (calibration/quantize.py) is written from the float graph of the module
it was quantized from, the fp32 graph of the export (export/onnx_export.py `export_graph`:
torch's dynamo exporter), without exporting anything again:

1. a QuantizeLinear -> DequantizeLinear pair where each enabled quantizer sits, with the scale
   ModelOpt's own ONNX export writes (modelopt/torch/quantization/export_onnx.py: INT8 amax / 127,
   zero point 0; FP8 E4M3 amax / 448 as TensorRT's TRT_FP8QuantizeLinear/TRT_FP8DequantizeLinear,
   custom ops only TensorRT loads): on the input and weight of every quantized layer, and on the
   output of the INT8 convolutions. A node's layer is the module path the exporter records on it
   ("pkg.torch.onnx.name_scopes");
2. every quantized layer's weight is the quantized module's (SmoothQuant scales a Linear's input
   channels: `W / s`), and SmoothQuant's input scale `s` is a Mul in front of the input's pair,
   where ModelOpt's quantizer applies it. Each weight is checked against the float graph's
   (equal, or equal once SmoothQuant's scale is undone), so a float graph of another module,
   or a weight read in the wrong layout, is refused.

Why not ModelOpt's own export (torch's TorchScript exporter tracing the fake-quant modules)? For
the full-size denoiser (1.2 G parameters) it held over 20 GB and had not finished on a 24 GB
machine. Why not export the quantized module again with the dynamo exporter, as the fp32 export
did? It gives the same graph, but took 154 s for the full-size denoiser and most of the tiny
model's calibration time in CI. ONNX Runtime computes the same bits from this export as from
ModelOpt's (tests/test_calibration.py, a toy graph of every layer kind). Where it differs from
ModelOpt's, on purpose:

- INT8 weights are stored as int8 (per output channel, zero point 0, rounded as ModelOpt's fake
  quantization rounds them) behind a DequantizeLinear alone, where ModelOpt writes the float32
  weight -> Q -> DQ: a quarter of the bytes, the same values. (FP8 weights stay float32 behind
  their pair, as ModelOpt writes them.)
- An INT8 layer reading a nearest upsampling gets a second pair of its input quantizer in front of
  the upsampling (nearest copies values: no bit changes), so that ONNX Runtime resizes 8-bit data.
- A quantized layer whose inputs are all constants (the timestep embedding's first Linear: OSDiff
  decodes at one fixed t) was computed into a constant by the exporter and stays float;
  `export_qdq` checks that their inputs are indeed constant and returns these layers.
- The attention keeps the form the fp32 graph has (the manifest's "attention"), in float.
- An INT8 residual block whose skip reads its quantized input (calibration/quantize.py
  `quantized_residuals`) has its sum read the dequantized input of its first convolution.

This is the explicit-precision form TensorRT 10/11 builds strongly typed and ONNX Runtime runs
with its INT8 kernels.
"""

from __future__ import annotations

import ast
import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn

from osdiff.calibration.quantize import LAYER_TYPES, quantized_residuals
from osdiff.config import ModelConfig
from osdiff.export.model import graph_shapes
from osdiff.export.onnx_export import EXTERNAL_DATA_BYTES

TRT_DOMAIN = "trt"  # TensorRT's custom FP8 Q/DQ ops, as ModelOpt names them

_QUANT_OPS = ("QuantizeLinear", "TRT_FP8QuantizeLinear")
_DEQUANT_OPS = ("DequantizeLinear", "TRT_FP8DequantizeLinear")
_LAYER_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")
_ROLES = ("input", "weight", "output")
# what lies between a parameter and the layer that uses it
_WEIGHT_PATH_OPS = (*_QUANT_OPS, *_DEQUANT_OPS, "Transpose", "Cast", "Identity")


def export_qdq(q: nn.Module, cfg: ModelConfig, graph: str, inputs: tuple[str, ...], float_graph: str | Path,
               path: str | Path) -> list[str]:
    """Write a fake-quantized graph (calibration/quantize.py `quantize`) to `path` (and
    `path`.data where its weights exceed 1.8 GB) from `float_graph`, the ONNX graph of the module
    `q` was quantized from (the export's fp32 graph; its weights may lie in a side file): float32
    inputs and outputs, batch, height and width dynamic, Q/DQ as the module docstring says.
    Returns the quantized layers the exporter computed into constants (their inputs do not depend
    on the graph's: they stay float). Raises ValueError where a quantized layer whose input does
    depend on the graph's has no node in `float_graph` (its record of module paths does not match
    `q`'s), and what `insert_qdq` raises."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        model = onnx.load(str(float_graph))
    except Exception as e:  # onnx raises protobuf's DecodeError, OSError, ValueError...
        raise ValueError(f"{float_graph}: not a readable ONNX graph ({type(e).__name__}: {e})") from None
    try:
        folded = insert_qdq(model, q)
    except ValueError as e:
        raise ValueError(f"{float_graph}: {e}") from None
    with switched_off([t for roles in enabled_quantizers(q).values() for t in roles.values()]):
        varying = _varying_inputs(q, cfg, graph, inputs, folded)
    if varying:
        raise ValueError(f"{float_graph}: quantized layers {varying[:3]} of {graph} have no node in this float graph, "
                         "yet their inputs are not constant: its module paths (pkg.torch.onnx.name_scopes) do not "
                         "match the module's (a graph of another module?), so their Q/DQ cannot be placed")
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)  # onnx appends to an existing data file
    big = sum(i.ByteSize() for i in model.graph.initializer) > EXTERNAL_DATA_BYTES
    onnx.save(model, str(path), save_as_external_data=big, all_tensors_to_one_file=True, location=data.name)
    if not any(n.domain == TRT_DOMAIN for n in model.graph.node):  # the checker knows no TensorRT ops
        onnx.checker.check_model(str(path), full_check=False)
    return folded


def enabled_quantizers(q: nn.Module) -> dict[str, dict[str, nn.Module]]:
    """layer -> {"input" | "weight" | "output": its enabled ModelOpt TensorQuantizer}, for every
    quantized layer of `q`."""
    out: dict[str, dict[str, nn.Module]] = {}
    for name, m in q.named_modules():
        if not isinstance(m, LAYER_TYPES):
            continue
        roles = {r: t for r in _ROLES if (t := getattr(m, f"{r}_quantizer", None)) is not None and t.is_enabled}
        if roles:
            out[name] = roles
    return out


@contextlib.contextmanager
def switched_off(quantizers: list[nn.Module]) -> Iterator[None]:
    """The quantizers pass their inputs through (but for SmoothQuant's input scale, which a
    disabled ModelOpt quantizer still applies) until the `with` block ends."""
    for t in quantizers:
        t.disable()
    try:
        yield
    finally:
        for t in quantizers:
            t.enable()


def _varying_inputs(q: nn.Module, cfg: ModelConfig, graph: str, inputs: tuple[str, ...], layers: list[str]) -> list[str]:
    """Those of `layers` whose input differs between two random inputs of the graph."""
    if not layers:
        return []
    m = cfg.pad_multiple
    shapes = graph_shapes(cfg, graph, 1, m, m)
    seen: dict[str, list[torch.Tensor]] = {layer: [] for layer in layers}
    hooks = [q.get_submodule(layer).register_forward_pre_hook(
        lambda _, args, layer=layer: seen[layer].append(args[0].detach().clone())) for layer in layers]
    try:
        with torch.no_grad():
            for seed in (1, 2):
                generator = torch.Generator().manual_seed(seed)
                q(*(torch.randn(shapes[i], generator=generator) for i in inputs))
    finally:
        for h in hooks:
            h.remove()
    return [layer for layer, xs in seen.items() if not all(torch.equal(xs[0], x) for x in xs[1:])]


def layer_of(node: onnx.NodeProto) -> str | None:
    """The module path of the layer a node was exported from ("decoder.up.1.upsample.conv"), from
    the dynamo exporter's record of the module calls around it; None where the node has none."""
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            scopes = ast.literal_eval(p.value)  # a Python list of strings: [..., module, op]
            return str(scopes[-2]) if len(scopes) >= 2 else None
    return None


def insert_qdq(model: onnx.ModelProto, q: nn.Module) -> list[str]:
    """Insert, in place, the Q/DQ pairs of the fake-quantized module `q` (its enabled quantizers)
    into `model`, the float graph of the module `q` was quantized from, and give every quantized
    layer `q`'s weight and SmoothQuant's input scale (the module docstring). Returns the quantized
    layers that no node of the graph belongs to (computed into constants by the exporter).
    Raises ValueError where no node of the graph records its module path (the dynamo exporter's
    "pkg.torch.onnx.name_scopes"), a layer's weight is not an initializer or is not the graph's
    (another shape, or other values once SmoothQuant's scale is undone), its per-channel scales
    do not match the weight's output channels, or a layer named in the graph has no node to
    quantize."""
    quantizers = enabled_quantizers(q)
    graph = model.graph
    if quantizers and not any(layer_of(n) for n in graph.node):
        raise ValueError("no node of the graph records the module it was exported from (pkg.torch.onnx.name_scopes): "
                         "export it with torch's dynamo exporter (export/onnx_export.py export_graph)")
    inits = {i.name: i for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    readers: dict[str, int] = {o.name: 1 for o in graph.output}
    for n in graph.node:
        for i in n.input:
            readers[i] = readers.get(i, 0) + 1
    if any(t.num_bits != 8 for roles in quantizers.values() for t in roles.values()):
        if TRT_DOMAIN not in {o.domain for o in model.opset_import}:
            model.opset_import.append(helper.make_opsetid(TRT_DOMAIN, 1))
    nodes: list[onnx.NodeProto] = []
    named: set[str] = set()
    dropped: set[str] = set()  # float weights now stored int8
    # (weight initializer, layer) -> its dequantized tensor: the exporter gives one initializer to
    # layers whose weights are equal, whose scales (and SmoothQuant's W / s) may still differ
    shared: dict[tuple[str, str], str] = {}

    def constant(name: str, value: np.ndarray | np.generic) -> str:
        graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def pair(x: str, t: nn.Module, name: str, out: str | None = None) -> str:
        """Q -> DQ of activation `x` on quantizer `t`'s grid (per tensor); returns the dequantized
        tensor's name (`out` where given)."""
        # an activation range calibrated to 0 (a layer calibration never reached) exports as
        # maxbound, scale 1, as in ModelOpt's own export; its fake quantization gave zeros
        amax = float(t.export_amax().detach().float().reshape(-1)[0])
        out = out or f"{name}.dequantized"
        if t.num_bits == 8:
            scale = constant(f"{name}.scale", np.float32(amax / 127))
            zero = constant(f"{name}.zero_point", np.int8(0))
            nodes.append(helper.make_node("QuantizeLinear", [x, scale, zero], [f"{name}.quantized"], f"{name}/Q"))
            nodes.append(helper.make_node("DequantizeLinear", [f"{name}.quantized", scale, zero], [out], f"{name}/DQ"))
        else:  # FP8 E4M3, per tensor, the scale as ModelOpt computes it
            scale = constant(f"{name}.scale", np.float32(1.0 / (448.0 / amax)))
            nodes.append(helper.make_node("TRT_FP8QuantizeLinear", [x, scale], [f"{name}.quantized"], f"{name}/Q",
                                          domain=TRT_DOMAIN))
            nodes.append(helper.make_node("TRT_FP8DequantizeLinear", [f"{name}.quantized", scale], [out],
                                          f"{name}/DQ", domain=TRT_DOMAIN))
        return out

    def weight(node: onnx.NodeProto, layer: str, name: str) -> np.ndarray:
        """`q`'s weight of `layer` in the layout of `node`'s weight, checked against the graph's."""
        w_name = node.input[1]
        if w_name not in inits:
            raise ValueError(f"{name}: its {node.op_type} weight {w_name!r} is not an initializer of the graph")
        m = q.get_submodule(layer)
        w = m.weight.detach().float()
        scale = _smoothquant_scale(m)
        # the float graph's weight: SmoothQuant's W / s times s (rounding aside), else W itself
        unscaled = w if scale is None else w * scale.reshape(1, -1, *([1] * (w.ndim - 2)))
        w, unscaled = (_in_graph_layout(node, t.numpy()) for t in (w, unscaled))
        theirs = numpy_helper.to_array(inits[w_name])
        if theirs.shape != w.shape:
            raise ValueError(f"{name}: the float graph's {node.op_type} weight is {list(theirs.shape)}, the "
                             f"module's {list(w.shape)} (a float graph of another model?)")
        if not np.allclose(unscaled, theirs, rtol=1e-5, atol=1e-7 * np.abs(theirs).max()):
            raise ValueError(f"{name}: the float graph's {node.op_type} weight {list(w.shape)} holds other values "
                             "than the module's (a float graph of another model?)")
        return w

    def int8_weight(node: onnx.NodeProto, layer: str, t: nn.Module, name: str) -> str:
        """The weight of `node` stored as int8 behind a DequantizeLinear; returns the dequantized
        tensor's name."""
        w_name = node.input[1]
        if (w_name, layer) in shared:  # a layer called twice: one int8 copy
            return shared[w_name, layer]
        w = weight(node, layer, name)
        axis = _output_axis(node, w.ndim)
        amax = t.export_amax().detach().float().reshape(-1).numpy()
        if w.shape[axis] != amax.size:
            raise ValueError(f"{name}: {amax.size} weight scales for {w.shape[axis]} output channels "
                             f"(weight {list(w.shape)}, axis {axis})")
        shape = [1] * w.ndim
        shape[axis] = amax.size
        # as ModelOpt's fake quantization: a channel of amax at most 2^-24 quantizes to zeros
        # (export_amax has already made an amax of 0 its maxbound; all-zero weights give zeros either way)
        live = amax > 2.0 ** -24
        # as ModelOpt's fake quantization rounds: round(w * 127 / amax), clamped to [-128, 127]
        step = np.divide(127.0, amax, out=np.zeros_like(amax), where=live).reshape(shape)
        graph.initializer.append(numpy_helper.from_array(np.clip(np.round(w * step), -128, 127).astype(np.int8),
                                                         f"{name}.int8"))
        scale = constant(f"{name}.scale", np.where(live, amax / 127, 1.0).astype(np.float32))
        zero = constant(f"{name}.zero_point", np.zeros(amax.size, np.int8))
        nodes.append(helper.make_node("DequantizeLinear", [f"{name}.int8", scale, zero], [f"{name}.dequantized"],
                                      f"{name}/DQ", axis=axis))
        dropped.add(w_name)
        shared[w_name, layer] = f"{name}.dequantized"
        return shared[w_name, layer]

    calls: dict[str, int] = {}
    for node in graph.node:
        layer = layer_of(node)
        roles = quantizers.get(layer) if layer is not None else None
        if not roles:
            nodes.append(node)
            continue
        named.add(layer)
        if node.op_type not in _LAYER_OPS:
            nodes.append(node)
            continue
        calls[layer] = calls.get(layer, 0) + 1
        key = layer if calls[layer] == 1 else f"{layer}#{calls[layer]}"  # a layer called twice
        smoothing = _smoothquant_scale(q.get_submodule(layer))
        if smoothing is not None and not {"input", "weight"} <= set(roles):
            # its weight is W / s and its input quantizer multiplies by s even when disabled
            raise ValueError(f"{layer}: SmoothQuant-scaled, but only its {'/'.join(roles)} quantizer is enabled: "
                             "the scale and the weight would not be written together")
        if "input" in roles:
            x = node.input[0]
            if smoothing is not None:  # the input quantizer scales before it quantizes
                nodes.append(helper.make_node("Mul", [x, constant(f"{key}.input.smoothquant_scale", smoothing.numpy())],
                                              [f"{key}.input.smoothed"], f"{key}/smoothquant"))
                node.input[0] = f"{key}.input.smoothed"
            node.input[0] = pair(node.input[0], roles["input"], f"{key}.input")
            src = producer.get(x)
            if (roles["input"].num_bits == 8 and smoothing is None and src is not None and _nearest_resize(src)
                    and readers[x] == 1):
                # Nearest resizing only copies values, so quantizing before it on the same grid changes
                # no bit, and the resize then moves 8-bit data: ONNX Runtime turns DQ -> Resize -> Q
                # into an integer Resize (in float it ran 10x slower than fp32's own in the full-size
                # VAE decoder). Not for FP8, which only TensorRT runs: it moves Q/DQ across a resize.
                at = next(i for i, n in enumerate(nodes) if x in n.output)
                mark = len(nodes)
                nodes[at].input[0] = pair(nodes[at].input[0], roles["input"], f"{key}.input.before_resize")
                moved = nodes[mark:]
                del nodes[mark:]
                nodes[at:at] = moved
        if "weight" in roles:
            t = roles["weight"]
            if t.num_bits == 8:
                node.input[1] = int8_weight(node, layer, t, f"{key}.weight")
            else:  # float32 behind its pair, as ModelOpt writes it
                if (node.input[1], layer) not in shared:
                    dropped.add(node.input[1])
                    shared[node.input[1], layer] = pair(
                        constant(f"{key}.weight.float", weight(node, layer, f"{key}.weight")), t, f"{key}.weight")
                node.input[1] = shared[node.input[1], layer]
        nodes.append(node)
        if "output" in roles:
            # the DQ takes over the layer's output name: every reader (or the graph output) reads it
            out = node.output[0]
            node.output[0] = f"{key}.output.float"
            pair(node.output[0], roles["output"], f"{key}.output", out=out)
    found = set(calls)
    missing = named - found
    if missing:
        raise ValueError(f"no Conv/ConvTranspose/MatMul/Gemm node of {sorted(missing)[:3]} to quantize: the graph "
                         "holds them in a form this exporter does not know")
    for block in quantized_residuals(q):
        first = f"{block}.branch.0"
        if first not in calls:
            continue  # no node of the layer at all: export_qdq refuses the graph, naming it
        if calls[first] != 1 or _smoothquant_scale(q.get_submodule(first)) is not None:
            raise ValueError(f"{block}: its first layer is not one plain call in the graph; its skip cannot be rerouted")
        x = next(n.input[0] for n in nodes if n.name == f"{first}.input/Q")
        sums = [n for n in nodes if n.op_type == "Add" and x in n.input and layer_of(n) == block]
        if len(sums) != 1:
            raise ValueError(f"{block}: {len(sums)} Add nodes of the block read its input (one expected: its sum)")
        sums[0].input[list(sums[0].input).index(x)] = f"{first}.input.dequantized"
    del graph.node[:]
    graph.node.extend(nodes)
    dropped -= {i for n in nodes for i in n.input}  # a float weight something else still reads
    if dropped:
        kept = [i for i in graph.initializer if i.name not in dropped]
        del graph.initializer[:]
        graph.initializer.extend(kept)
    return sorted(set(quantizers) - found)


def _smoothquant_scale(layer: nn.Module) -> torch.Tensor | None:
    """SmoothQuant's per-input-channel scale of a layer's input (float32, 1-D), or None."""
    t = getattr(layer, "input_quantizer", None)
    s = getattr(t, "pre_quant_scale", None) if t is not None else None
    return None if s is None else s.detach().float().reshape(-1)


def _in_graph_layout(node: onnx.NodeProto, w: np.ndarray) -> np.ndarray:
    """A module's weight (PyTorch's layout: out x in for a Linear) as `node` reads it."""
    if node.op_type == "MatMul" or (node.op_type == "Gemm" and not any(a.name == "transB" and a.i for a in node.attribute)):
        return np.ascontiguousarray(w.T)  # x @ W: in x out
    return w


def _nearest_resize(node: onnx.NodeProto) -> bool:
    mode = next((a.s for a in node.attribute if a.name == "mode"), b"nearest")
    return node.op_type == "Resize" and mode == b"nearest"


def _output_axis(node: onnx.NodeProto, ndim: int) -> int:
    """The axis of a layer's weight that holds its output channels."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    return ndim - 1  # MatMul: x @ W, W is in x out


def qdq_layers(path: str | Path) -> dict[str, dict[str, bool]]:
    """Per layer of an ONNX graph (a Conv, ConvTranspose, MatMul or Gemm node, named by the
    module it was exported from, e.g. "decoder.up.1.block.0.conv1", or by the node's name where the
    exporter recorded none): whether its input and its weight come through a DequantizeLinear, and
    whether its output goes into a QuantizeLinear. A node whose weight is computed (attention's
    own products) says weight False."""
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
        layer = layer_of(n) or n.name
        out[layer] = {"input": dq_input, "weight": dq_weight and name in params, "output": q_output}
    return out


def attention_inputs(path: str | Path) -> list[list[str]]:
    """Per com.microsoft.MultiHeadAttention node of an ONNX graph, the op types producing its
    inputs (the attention computes in float: none of them may be a DequantizeLinear)."""
    model = onnx.load(str(path), load_external_data=False)
    producer = {o: n for n in model.graph.node for o in n.output}
    return [[producer[i].op_type if i in producer else "(graph input)" for i in n.input if i]
            for n in model.graph.node if n.op_type == "MultiHeadAttention"]


def count_dequantize(path: str | Path) -> int:
    """Number of DequantizeLinear nodes (of either kind) in an ONNX graph: one per quantized
    tensor (an INT8 weight is stored quantized, behind a DequantizeLinear alone; a layer after a
    nearest upsampling has two on its input)."""
    model = onnx.load(str(path), load_external_data=False)
    return sum(n.op_type in _DEQUANT_OPS for n in model.graph.node)
