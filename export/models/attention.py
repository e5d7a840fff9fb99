"""Exact attention, shaped for the runtime that runs it.

softmax(q k^T / sqrt(d)) v over N positions holds an N x N score matrix when a kernel computes
it in one piece: 64 GB for the VAE's mid-block at 12 Mpixel (N = 189,504), 17 GB for the small
`demo` VAE at 4 Mpixel. Fused kernels never hold it (flash attention keeps a tile of scores
and a running softmax), so their memory is linear in N. Each runtime gets the form it fuses
(../shared/DESIGN.md, "Graphs are shaped for the runtime that runs them"):

- PyTorch (eager, CUDA graphs): one F.scaled_dot_product_attention call when the kernel SDPA
  will pick is memory-linear (CUDA flash, memory-efficient or cuDNN; the CPU flash kernel,
  which needs inputs contiguous in their last dimension). Only where SDPA falls back to its
  math kernel, which materializes the scores, are the queries split into blocks of at most
  CHUNK_BYTES of scores (each query's row of scores is independent of the others', so the
  result is the same attention to float rounding). The choice is PyTorch's own
  (`torch._fused_sdp_choice`, the function SDPA dispatches with; it honours
  `torch.nn.attention.sdpa_kernel`). Under torch.compile the call stays one SDPA op, which
  picks its kernel when it runs, as in eager.
- Exported graphs (`export_form`), one of FORMS:
  "mha":   ONNX Runtime's fused `com.microsoft.MultiHeadAttention` (float32 and float16; on the
           CPU its flash path, memory-linear, runs without mask, bias or past state). The default.
           In this form the heavy graphs' GELU is ONNX Runtime's too (export/models/gelu.py).
  "plain": the standard MatMul-Softmax-MatMul pattern, which TensorRT's builder fuses into its
           attention kernels (`osdiff build` rewrites "mha" graphs into it: plain_attention()).
  "scan":  an ONNX Scan over blocks of queries: bounded memory on any runtime, fused by none;
           the fallback for runtimes without a fused attention kernel.

Every form computes the same attention; tests/test_attention.py checks each against SDPA.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import onnx
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend

FORMS = ("mha", "plain", "scan")

# Scores of one block of queries, in bytes (float32 elements: block x keys x heads x batch x 4).
CHUNK_BYTES = 64 * 2**20

# SDPA's kernels that never hold the N x N scores
_MEMORY_LINEAR = {int(SDPBackend.FLASH_ATTENTION), int(SDPBackend.EFFICIENT_ATTENTION), int(SDPBackend.CUDNN_ATTENTION)}

# Process-wide switches, set by the context managers below. Plain module globals, not
# ContextVars: torch.compile reads (and guards on) globals but cannot trace ContextVar.get.
_export_form: str | None = None
_always_blocks = False


@contextmanager
def export_form(form: str) -> Iterator[None]:
    """Trace attention as `form` (one of FORMS) inside this block: set by the ONNX exporter
    (export/onnx_export.py), never by run-time code. Raises ValueError for an unknown form."""
    global _export_form
    if form not in FORMS:
        raise ValueError(f"attention form must be one of {FORMS}, got {form!r}")
    before, _export_form = _export_form, form
    try:
        yield
    finally:
        _export_form = before


@contextmanager
def always_query_blocks() -> Iterator[None]:
    """Split the queries into blocks whatever kernel SDPA would pick: how every attention ran
    before the single call (the GPU check compares the two)."""
    global _always_blocks
    before, _always_blocks = _always_blocks, True
    try:
        yield
    finally:
        _always_blocks = before


def attention(q: Tensor, k: Tensor, v: Tensor, heads: int) -> Tensor:
    """Exact multi-head attention, scale head_size^-0.5 (the reference's and SDPA's default).

    q: B x S x (heads * d), k: B x L x (heads * d), v: B x L x (heads * dv), channels split
    head-major (the reference's `rearrange(t, 'b n (h d) -> b h n d')`) -> B x S x (heads * dv),
    the dtype of q. Self-attention passes the same positions as q, k and v.
    """
    form = _export_form
    if form in ("mha", "plain"):
        # plain graphs are written as mha and rewritten (plain_attention), one decomposition for both;
        # the channels are static, so the scale is a constant of the graph
        return torch.ops.osdiff.attention(q, k, v, heads, float(q.shape[-1] // heads) ** -0.5)
    qh, kh, vh = (_split_heads(t, heads) for t in (q, k, v))
    out = _scan_blocks(qh, kh, vh) if form == "scan" else sdpa(qh, kh, vh)
    return out.transpose(1, 2).flatten(2)


def _split_heads(t: Tensor, heads: int) -> Tensor:
    # SDPA's CPU flash kernel needs the last dimension contiguous (the VAE's B x HW x C view of
    # a B x C x H x W tensor is not); otherwise it falls back to the math kernel
    t = t if t.stride(-1) == 1 else t.contiguous()
    return t.unflatten(-1, (heads, -1)).transpose(1, 2)


def sdpa(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """B x H x S x d, B x H x L x d, B x H x L x dv -> B x H x S x dv: one SDPA call where its
    kernel is memory-linear, else blocks of queries (see the module docstring)."""
    if not _always_blocks and (torch.compiler.is_compiling() or memory_linear_kernel(q, k, v)):
        return F.scaled_dot_product_attention(q, k, v)
    b, h, s, _ = q.shape
    block = query_block(b, h, k.shape[2])
    if block >= s:
        return F.scaled_dot_product_attention(q, k, v)
    return torch.cat([F.scaled_dot_product_attention(qb, k, v) for qb in q.split(block, dim=2)], dim=2)


def memory_linear_kernel(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Whether SDPA would run these inputs (no mask, no dropout) on a kernel that never holds
    the scores. The meta device (runtime/memory.py's estimates) answers the math kernel, so the
    estimate counts the blocks' scores: at most CHUNK_BYTES more than a fused kernel takes."""
    return int(torch._fused_sdp_choice(q, k, v)) in _MEMORY_LINEAR


def query_block(b: int, h: int, n: int) -> int:
    """Queries per block for B x H x S x N scores: as many as CHUNK_BYTES hold, at least 1, at
    most N. The cap at N matters to the Scan, which pads q to whole blocks: a block sized for
    CHUNK_BYTES on a small image is many times N (a 64x64 image on the full-size model took
    18 GB of padding and scores in ONNX Runtime before it). torch.sym_* keep the value symbolic
    when exporting and are plain min/max on ints."""
    return torch.sym_min(n, torch.sym_max(1, CHUNK_BYTES // (4 * b * h * n)))


def query_blocks(q: Tensor, n: int) -> Tensor:
    """B x H x S x d -> blocks x B x H x block x d: q padded with zeros to whole blocks, for N keys."""
    b, h, s, _ = q.shape
    block = query_block(b, h, n)
    return F.pad(q, (0, 0, 0, (-s) % block)).unflatten(2, (-1, block)).permute(2, 0, 1, 3, 4)


def _scan_blocks(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """The blocks as one Scan (the "scan" form): q is padded to whole blocks, scanned block by
    block, and the padding cut off again. Shapes stay symbolic, so the block size follows N at
    run time."""
    from torch._higher_order_ops.scan import scan

    s = q.shape[2]
    blocks = query_blocks(q, k.shape[2])

    def step(carry: Tensor, q_block: Tensor) -> tuple[Tensor, Tensor]:
        # scan needs a carried value; this one only passes through
        return carry + 0, F.scaled_dot_product_attention(q_block, k, v)

    _, out = scan(step, torch.zeros(1, dtype=q.dtype, device=q.device), blocks)
    return out.permute(1, 2, 0, 3, 4).flatten(2, 3)[:, :, :s]


# ---------------------------------------------------------------------------------------------
# The "mha" and "plain" forms: a custom op that the exporter translates to MultiHeadAttention
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("osdiff::attention", mutates_args=())
def _attention_op(q: Tensor, k: Tensor, v: Tensor, heads: int, scale: float) -> Tensor:
    # scale is head_size^-0.5, SDPA's default: an argument only so that exporters can write it
    qh, kh, vh = (_split_heads(t, heads) for t in (q, k, v))
    return sdpa(qh, kh, vh).transpose(1, 2).flatten(2)


@_attention_op.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, heads: int, scale: float) -> Tensor:
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


MHA_DOMAIN = "com.microsoft"


def onnx_translation() -> dict:
    """torch.onnx.export's custom_translation_table entry writing osdiff::attention as one
    com.microsoft.MultiHeadAttention node (inputs B x S x D, attributes num_heads and scale).
    onnxscript builds nodes from ONNX schemas and ONNX Runtime's contrib ops have none in
    onnx's registry, so the op's signature (the part of ONNX Runtime's schema used here) is
    registered once."""
    from onnx.defs import OpSchema
    from onnxscript.values import Opset

    if not onnx.defs.has("MultiHeadAttention", MHA_DOMAIN):
        param = OpSchema.FormalParameter
        onnx.defs.register_schema(OpSchema(
            "MultiHeadAttention", MHA_DOMAIN, 1,
            inputs=[param("query", "T"), param("key", "T"), param("value", "T")], outputs=[param("output", "T")],
            type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "")],
            attributes=[OpSchema.Attribute("num_heads", OpSchema.AttrType.INT, "heads"),
                        OpSchema.Attribute("scale", OpSchema.AttrType.FLOAT, "scale of q k^T")]))
    mha = Opset(MHA_DOMAIN, 1).MultiHeadAttention

    def multi_head_attention(q, k, v, heads: int, scale: float):  # type: ignore[no-untyped-def]
        return mha(q, k, v, num_heads=heads, scale=scale)

    return {torch.ops.osdiff.attention.default: multi_head_attention}


def plain_attention(model: onnx.ModelProto) -> int:
    """Rewrite every com.microsoft.MultiHeadAttention node of `model` (in place) into the
    standard pattern: split heads, MatMul(q, k^T), Mul(scale), Softmax, MatMul(., v), merge
    heads, in the node's own dtype. Returns the number of nodes rewritten. Only the attributes
    this exporter writes (num_heads, scale) are understood; a node with more inputs (mask, bias,
    past state) raises ValueError."""
    from onnx import TensorProto, helper, numpy_helper

    dtypes = value_types(model)
    graph = model.graph
    nodes = []
    count = 0
    for node in graph.node:
        if not (node.op_type == "MultiHeadAttention" and node.domain == MHA_DOMAIN):
            nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if len([i for i in node.input if i]) != 3 or set(attrs) - {"num_heads", "scale"} or "scale" not in attrs:
            raise ValueError(f"MultiHeadAttention node {node.name!r}: only q, k, v with num_heads and scale are "
                             "rewritten (the form osdiff export writes)")
        count += 1
        p = f"{node.name or node.output[0]}/plain"
        q, k, v = node.input
        dtype = dtypes.get(q, TensorProto.FLOAT)
        np_dtype = helper.tensor_dtype_to_np_dtype(dtype)
        heads_shape = numpy_helper.from_array(torch.tensor([0, 0, attrs["num_heads"], -1]).numpy(), f"{p}/heads")
        merged_shape = numpy_helper.from_array(torch.tensor([0, 0, -1]).numpy(), f"{p}/merged")
        scale = numpy_helper.from_array(torch.tensor(attrs["scale"]).numpy().astype(np_dtype), f"{p}/scale")
        graph.initializer.extend([heads_shape, merged_shape, scale])
        nodes += [
            helper.make_node("Reshape", [q, heads_shape.name], [f"{p}/q4"]),
            helper.make_node("Transpose", [f"{p}/q4"], [f"{p}/q"], perm=[0, 2, 1, 3]),  # B H S d
            helper.make_node("Reshape", [k, heads_shape.name], [f"{p}/k4"]),
            helper.make_node("Transpose", [f"{p}/k4"], [f"{p}/kT"], perm=[0, 2, 3, 1]),  # B H d L
            helper.make_node("Reshape", [v, heads_shape.name], [f"{p}/v4"]),
            helper.make_node("Transpose", [f"{p}/v4"], [f"{p}/v"], perm=[0, 2, 1, 3]),  # B H L dv
            helper.make_node("MatMul", [f"{p}/q", f"{p}/kT"], [f"{p}/logits"]),
            helper.make_node("Mul", [f"{p}/logits", scale.name], [f"{p}/scaled"]),
            helper.make_node("Softmax", [f"{p}/scaled"], [f"{p}/probs"], axis=-1),
            helper.make_node("MatMul", [f"{p}/probs", f"{p}/v"], [f"{p}/o"]),
            helper.make_node("Transpose", [f"{p}/o"], [f"{p}/o4"], perm=[0, 2, 1, 3]),
            helper.make_node("Reshape", [f"{p}/o4", merged_shape.name], list(node.output[:1])),
        ]
    del graph.node[:]
    graph.node.extend(nodes)
    drop_unused_opset(model, MHA_DOMAIN)
    return count


def drop_unused_opset(model: onnx.ModelProto, domain: str) -> None:
    """Remove `domain` from `model`'s opset imports (in place) when no node uses it any more."""
    if not any(n.domain == domain for n in model.graph.node):
        kept = [o for o in model.opset_import if o.domain != domain]
        del model.opset_import[:]
        model.opset_import.extend(kept)


def value_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every named value the graph declares (inputs, value_info, outputs)."""
    graph = model.graph
    if not graph.value_info:
        graph = onnx.shape_inference.infer_shapes(model).graph
    return {vi.name: vi.type.tensor_type.elem_type for vi in [*graph.input, *graph.value_info, *graph.output]}
