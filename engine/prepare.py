"""ONNX preparation before a TensorRT build, with Polygraphy's loaders: what
`polygraphy surgeon sanitize --fold-constants` does, through its Python API, after attention is
put in the form TensorRT fuses.

Attention: an export's graphs hold ONNX Runtime's fused com.microsoft.MultiHeadAttention ("mha",
the default form, export/models/attention.py), which TensorRT's parser does not know; each is
rewritten into the standard MatMul-Softmax-MatMul pattern, which TensorRT's builder fuses into
its own attention kernels. A graph exported with `--attention scan` (an ONNX Scan over query
blocks) is refused: no Scan or Loop reaches TensorRT, where a loop body would not be fused.
Likewise the heavy graphs' com.microsoft.Gelu nodes (export/models/gelu.py) go back to the
five-node exact GELU, which TensorRT fuses.

Then shape inference, then constant folding (passes until nothing changes, each followed by
dead-node cleanup): subgraphs that depend on no input (shape arithmetic, weight casts of the fp16
graphs, the constant text context) become initializers, so the TensorRT parser sees fewer,
simpler nodes. The dynamic input dimensions stay symbolic. Graphs over the 2 GB protobuf limit
are saved with their weights beside them (<name>.onnx.data), which TensorRT's parser reads from
the same folder.
"""

from __future__ import annotations

from pathlib import Path

import onnx
from polygraphy.backend.onnx import FoldConstants, InferShapes, OnnxFromPath, SaveOnnx

from osdiff.export.models.attention import plain_attention
from osdiff.export.models.gelu import plain_gelu

LOOPS = ("Scan", "Loop")


class PrepareError(ValueError):
    """A graph that cannot be handed to TensorRT as it is."""


def prepare_onnx(src: str | Path, dst: str | Path, partition: bool = False) -> None:
    """Rewrite attention and GELU (ONNX Runtime's fused ops) into the plain patterns, then fold
    and sanitize the ONNX graph at `src` into `dst`. partition: fold each constant subgraph that ONNX Runtime can evaluate and leave
    the others (graphs with TensorRT's own ops, such as its FP8 Q/DQ). Raises PrepareError for a
    graph with a Scan or Loop (naming how to re-export)."""
    Path(dst).parent.mkdir(parents=True, exist_ok=True)

    def with_plain_ops() -> onnx.ModelProto:
        model = InferShapes(OnnxFromPath(str(src)))()
        loops = sorted({n.op_type for n in model.graph.node if n.op_type in LOOPS})
        if loops:
            raise PrepareError(f"{src}: has a {'/'.join(loops)} node (attention exported with --attention scan?); "
                               "TensorRT gets no loops: re-export with `osdiff export --attention mha` (the default)")
        plain_attention(model)
        plain_gelu(model)
        return model

    load = FoldConstants(with_plain_ops, partitioning="basic" if partition else None, error_ok=partition)
    SaveOnnx(load, path=str(dst))()
