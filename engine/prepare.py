"""ONNX preparation before a TensorRT build, with Polygraphy's loaders: what
`polygraphy surgeon sanitize --fold-constants` does, through its Python API.

Shape inference, then constant folding (passes until nothing changes, each followed by dead-node
cleanup): subgraphs that depend on no input (shape arithmetic, weight casts of the fp16 graphs,
the constant text context) become initializers, so the TensorRT parser sees fewer, simpler nodes.
The dynamic input dimensions stay symbolic. Graphs over the 2 GB protobuf limit are saved with
their weights beside them (<name>.onnx.data), which TensorRT's parser reads from the same folder.
"""

from __future__ import annotations

from pathlib import Path

from polygraphy.backend.onnx import FoldConstants, InferShapes, OnnxFromPath, SaveOnnx


def prepare_onnx(src: str | Path, dst: str | Path, partition: bool = False) -> None:
    """Fold and sanitize the ONNX graph at `src` into `dst`. partition: fold each constant
    subgraph that ONNX Runtime can evaluate and leave the others (graphs with TensorRT's own
    ops, such as its FP8 Q/DQ)."""
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    load = FoldConstants(InferShapes(OnnxFromPath(str(src))), partitioning="basic" if partition else None,
                         error_ok=partition)
    SaveOnnx(load, path=str(dst))()
