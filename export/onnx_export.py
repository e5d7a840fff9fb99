"""Export every graph of a model to ONNX, fp32 and fp16, with a manifest.

Output directory:
    manifest.json                 graphs, I/O names, symbolic shapes, dtypes, opset, the model
                                  config and identity, fp16 islands, entropy-model tables
    entropy_bottleneck.safetensors  the learned z prior (tables are recomputed from it)
    fp32/<graph>.onnx             every graph
    fp16/<graph>.onnx             the heavy graphs (VAE, G_s, denoiser) in fp16
    (<graph>.onnx.data beside a graph whose weights exceed what one protobuf holds, 2 GB)

Attention is written in the form of `attention=` (export/models/attention.py): by default ONNX
Runtime's fused com.microsoft.MultiHeadAttention, which `osdiff build` rewrites into the plain
pattern TensorRT fuses; every graph entry of the manifest says which form ("attention"; null
where the graph has none). In that form the heavy graphs' GELUs are ONNX Runtime's
com.microsoft.Gelu too (export/models/gelu.py), which `osdiff build` rewrites likewise. Graphs take float32 inputs and give float32 outputs in both variants: an fp16 graph
casts at its edges, so every runner binds the same buffers. Precision is decided inside the graph (the
fp32 islands are the modules' own casts, see calibration/precision.py), which is what TensorRT
11's strongly typed builds require.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import onnx
import torch
from safetensors.torch import load_file, save
from torch import Tensor, nn

from osdiff.calibration.precision import FP16_GRAPHS, FP16_ISLANDS
from osdiff.config import ModelConfig
from osdiff.export.model import OSDiffModel, graph_shapes
from osdiff.export.models import gelu
from osdiff.export.models.attention import FORMS, MHA_DOMAIN, export_form, onnx_translation, plain_attention
from osdiff.files import read_manifest, write_atomic
from osdiff.runtime.backends.base import EntropyModels
from osdiff.runtime.entropy import EntropyBottleneck, GaussianConditional

OPSET = 18
FORMAT = "osdiff-onnx"
FORMAT_VERSION = 2  # 2: model identity = weights id + canonical tables id
# Example size for tracing: batch 2 and distinct sides, so that no dynamic dimension is
# specialized (sizes 0 and 1 are) or unified with another of the same size.
_TRACE_BATCH, _TRACE_H, _TRACE_W = 2, 320, 448


class _Half(nn.Module):
    """fp16 copy of a graph, with float32 edges."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = copy.deepcopy(module).half()

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...] | Tensor:
        out = self.module(*(x.half() for x in inputs))
        return tuple(o.float() for o in out) if isinstance(out, tuple) else out.float()


def symbolic_shapes(cfg: ModelConfig, graph: str) -> dict[str, list[int | str]]:
    """Shapes with "batch", "height/8", ... for the dimensions that follow the padded image."""
    m = cfg.pad_multiple
    a = graph_shapes(cfg, graph, 1, m, 2 * m)
    b = graph_shapes(cfg, graph, 2, 2 * m, 4 * m)
    out: dict[str, list[int | str]] = {}
    for name in a:
        dims: list[int | str] = []
        for i, (x, y) in enumerate(zip(a[name], b[name])):
            if x == y:
                dims.append(x)
            elif i == 0:
                dims.append("batch")
            else:
                side, full = ("height", m) if i == 2 else ("width", 2 * m)
                dims.append(side if x == full else f"{side}/{full // x}")
        out[name] = dims
    return out


def export_onnx(model: OSDiffModel, out_dir: str | Path, fp16: bool = True,
                progress: Callable[[str], None] = lambda s: None, only: list[str] | None = None,
                attention: str = "mha") -> dict:
    """Write every graph (or those named in `only`) and the manifest; returns the manifest.
    attention: the form of every attention in the graphs, one of export/models/attention.py's
    FORMS ("mha": ONNX Runtime's fused MultiHeadAttention, the default; "plain": the
    MatMul-Softmax-MatMul pattern TensorRT fuses; "scan": query blocks in an ONNX Scan). The
    manifest records it per graph that has attention. Raises ValueError for an unknown form."""
    if attention not in FORMS:
        raise ValueError(f"attention form must be one of {', '.join(FORMS)}, got {attention!r}")
    out = Path(out_dir)
    (out / "fp32").mkdir(parents=True, exist_ok=True)
    cfg = model.config
    manifest: dict = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "opset": OPSET,
        "torch": torch.__version__, "onnx": onnx.__version__,
        "model": {"name": cfg.name, "fingerprint": model.fingerprint.hex(), "weights_id": model.weights_id.hex(),
                  "tables_id": model.entropy_models.tables_id.hex(), "config": cfg.to_dict()},
        "pad_multiple": cfg.pad_multiple,
        "fp16_islands": FP16_ISLANDS,
        "graphs": {},
    }
    graphs = model.graphs()
    names = [n for n in graphs if only is None or n in only]
    for i, name in enumerate(names, 1):
        g = graphs[name]
        entry: dict = {"inputs": g.inputs, "outputs": g.outputs, "shapes": symbolic_shapes(cfg, name), "attention": None}
        variants = [("fp32", g.module)]
        if fp16 and name in FP16_GRAPHS:
            variants.append(("fp16", _Half(g.module)))
        for precision, module in variants:
            t0 = time.perf_counter()
            path = out / precision / f"{name}.onnx"
            path.parent.mkdir(exist_ok=True)
            attentions = export_graph(cfg, name, module, g.inputs, g.outputs, path, precision == "fp16", attention)
            entry[precision] = {"file": str(path.relative_to(out)), "sha256": _sha256(path)}
            if attentions:
                entry["attention"] = attention
            progress(f"[{i}/{len(names)}] {name} {precision}: {time.perf_counter() - t0:.1f} s, "
                     f"{_size(path) / 1e6:.1f} MB")
        manifest["graphs"][name] = entry

    eb = model.entropy_bottleneck
    write_atomic(out / "entropy_bottleneck.safetensors", save({k: v.contiguous() for k, v in eb.params.items()}))
    manifest["entropy"] = {
        "bottleneck": {"params_file": "entropy_bottleneck.safetensors", "cdfs": eb.tables.cdfs,
                       "offsets": eb.tables.offsets, "medians": eb.medians.tolist()},
        "gaussian": {"scale_table": model.gaussian.scale_table.tolist(), "cdfs": model.gaussian.tables.cdfs,
                     "offsets": model.gaussian.tables.offsets},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


# weights beyond this go to a side file: one protobuf holds 2 GB at most
EXTERNAL_DATA_BYTES = 1_800_000_000


def export_graph(cfg: ModelConfig, name: str, module: nn.Module, inputs: tuple[str, ...],
                 outputs: tuple[str, ...], path: Path, half: bool, attention: str) -> int:
    """Export one graph to `path` (torch's dynamo exporter; weights over 1.8 GB go to
    `path`.data); returns how many attention operations it has. Every node keeps the module path
    the exporter records ("pkg.torch.onnx.name_scopes"), which calibration/qdq_export.py reads."""
    translation = onnx_translation()
    # contrib ops only in ONNX Runtime's form; the LFGCM graphs keep the exporter's GELU (export/models/gelu.py)
    if name in FP16_GRAPHS and attention == "mha":
        translation.update(gelu.onnx_translation())
    shapes = graph_shapes(cfg, name, _TRACE_BATCH, _TRACE_H * cfg.pad_multiple // 64, _TRACE_W * cfg.pad_multiple // 64)
    args = tuple(torch.randn(shapes[i]) for i in inputs)
    auto = torch.export.Dim.AUTO
    dynamic: tuple = tuple({0: auto, 2: auto, 3: auto} for _ in inputs)
    if half:
        dynamic = (dynamic,)  # _Half.forward takes *inputs
    module = module.eval()
    with warnings.catch_warnings(), torch.no_grad(), export_form(attention):
        warnings.simplefilter("ignore")  # the exporter's deprecation chatter
        program = torch.onnx.export(module, args, dynamo=True, opset_version=OPSET, input_names=list(inputs),
                                    output_names=list(outputs), dynamic_shapes=dynamic, verbose=False,
                                    custom_translation_table=translation)
    assert program is not None
    for f in (path, path.with_name(path.name + ".data")):
        f.unlink(missing_ok=True)
    # weights go to a side file only when the graph cannot hold them (2 GB protobuf limit)
    big = sum(p.numel() * p.element_size() for p in module.parameters()) > EXTERNAL_DATA_BYTES
    program.save(str(path), external_data=big)
    graph = onnx.load(str(path), load_external_data=False)
    count = sum(n.op_type == "MultiHeadAttention" and n.domain == MHA_DOMAIN for n in graph.graph.node)
    if attention == "plain" and count:
        plain_attention(graph)
        onnx.save(graph, str(path))  # the weights, in the graph or beside it, are unchanged
    elif attention == "scan":
        count = sum(n.op_type == "Scan" for n in graph.graph.node)
    onnx.checker.check_model(str(path), full_check=False)
    return count


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    for f in (path, path.with_name(path.name + ".data")):
        if f.exists():
            with f.open("rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 24), b""):
                    h.update(chunk)
    return h.hexdigest()


def _size(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


class ExportError(ValueError):
    """An export directory is missing, incomplete, or does not match this build."""


def load_export(directory: str | Path) -> tuple[dict, EntropyModels]:
    """Read and check an export directory's manifest; rebuild the entropy models from it.

    The tables are derived again here, canonically (runtime/entropy.py), and must equal the
    ones the export recorded: an export made by a build that derived them differently (or a
    manifest edited by hand) is refused before it can code a stream nobody else can read.
    """
    d = Path(directory)
    manifest = read_manifest(d, FORMAT, FORMAT_VERSION, ExportError, "re-export with `osdiff export`")
    cfg = ModelConfig.from_dict(manifest["model"]["config"])
    ent = manifest["entropy"]
    eb = EntropyBottleneck(load_file(str(d / ent["bottleneck"]["params_file"])), cfg.entropy.precision)
    gaussian = GaussianConditional(cfg.entropy)
    recorded = (("bottleneck", eb.tables, ent["bottleneck"]), ("gaussian", gaussian.tables, ent["gaussian"]))
    for what, ours, theirs in recorded:
        if ours.cdfs != theirs["cdfs"] or ours.offsets != theirs["offsets"]:
            raise ExportError(f"{d}: the {what} CDF tables in manifest.json differ from the ones this build derives "
                              "(exported by another version?); re-export with `osdiff export`")
    models = EntropyModels(cfg, eb, gaussian, bytes.fromhex(manifest["model"]["weights_id"]))
    if models.fingerprint.hex() != manifest["model"]["fingerprint"]:
        raise ExportError(f"{d}: manifest.json's model identity is inconsistent; re-export with `osdiff export`")
    return manifest, models
