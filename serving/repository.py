"""`osdiff triton-repo`: a model repository for standalone tritonservers (a fleet behind a load
balancer), from an `osdiff export` (ONNX) or an `osdiff build` (TensorRT) directory.

    osdiff_compress/      Python backend, CPU instances: the codec (serving/codec_model.py), with
    osdiff_decompress/    the entropy coding and the entropy-model graphs run in the instance;
        config.pbtxt      the heavy graphs are requests (BLS) to the graph models below
        1/model.py, 1/export/ (manifest, entropy-bottleneck parameters, the graphs run in the instance)
    osdiff_<graph>/       one per heavy graph: onnxruntime backend (1/model.onnx), TensorRT
        config.pbtxt      (1/model.plan, and then every graph of the build is a model), or, with
        1/...             python_only, ONNX Runtime in a Python-backend model (serving/graph_model.py)

The heavy graphs (VAE encoder, G_a, G_s, the denoiser, the VAE decoder) batch dynamically across
the codec instances that call them. The entropy-model graphs stay in the codec instance, on the
CPU in fp32 wherever it runs, so that every server of a fleet derives the same CDF indexes
(streams are the contract between machines). A TensorRT build has no ONNX to run them from: its
entropy-model engines become graph models too.

Every config.pbtxt is built as Triton's ModelConfig protobuf (tritonclient's model_config_pb2,
which rejects unknown fields and enum values) and read back by `validate_repository`.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from osdiff.export.onnx_export import ExportError, load_export
from osdiff.runtime.backends.onnxruntime_backend import graph_variants
from osdiff.engine.manifest import FORMAT as ENGINE_FORMAT
from osdiff.serving.codec_model import EXPORT_DIR
from osdiff.serving.models import COMPRESS, DECOMPRESS, INPUTS, OUTPUTS, TensorSpec

ENCODE_ONLY = ("vae_encoder", "analysis")
DECODE_ONLY = ("synthesis", "denoiser", "vae_decoder")
HEAVY_GRAPHS = ENCODE_ONLY + DECODE_ONLY
MODEL_PY = {
    "codec": "from osdiff.serving.codec_model import CodecModel as TritonPythonModel\n",
    "graph": "from osdiff.serving.graph_model import OnnxGraphModel as TritonPythonModel\n",
}
_MODEL_PY_HEADER = ("# Written by `osdiff triton-repo`. The model is code of the osdiff-engine package, which the\n"
                    "# server's Python environment must have installed (pip install osdiff-engine).\n")
_TRITON_TYPES = {"UINT8": "TYPE_UINT8", "UINT32": "TYPE_UINT32", "BYTES": "TYPE_STRING", "FP32": "TYPE_FP32"}


@dataclass
class RepositoryOptions:
    python_only: bool = False  # graph models on Triton's Python backend (ONNX Runtime CPU), e.g. PyTriton's tritonserver
    precision: str = "fp32"  # ONNX variant of the heavy graphs (ExportError where the export lacks it)
    max_batch: int = 8  # dynamic batcher of the graph models
    queue_delay_us: int = 500
    gpu: bool = True  # graph models on GPU instances (TensorRT: always)
    instances: int = 1  # per GPU (or in all, on the CPU), per graph model
    codec_instances: int = 2  # CPU instances of osdiff_compress and of osdiff_decompress


def model_config_pb2() -> Any:
    try:
        from tritonclient.grpc import model_config_pb2 as pb
    except ImportError as e:
        raise ExportError(f"writing a Triton repository needs the serve extra: pip install 'osdiff-engine[serve]' ({e})") from e
    return pb


def write_repository(source: str | Path, out: str | Path, options: RepositoryOptions = RepositoryOptions()) -> list[str]:
    """Write the repository; returns the model names. Raises ExportError (a ValueError) for a
    source that is neither an export nor an engine build, or an output folder in use."""
    src, out = Path(source), Path(out)
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"{out}: exists and is not empty")
    tensorrt = _format(src) == ENGINE_FORMAT
    if tensorrt:
        if options.python_only:
            raise ExportError(f"{src}: TensorRT engines need Triton's tensorrt backend; python_only takes an ONNX export")
        from osdiff.engine.manifest import MODEL_DIR, EngineManifest

        engines = EngineManifest.read(src)
        model_dir = src / MODEL_DIR
        manifest, _ = load_export(model_dir)
        remote = list(engines.graphs)
        max_batch = max(p.max.batch for p in engines.shape_profiles())
    else:
        model_dir = src
        manifest, _ = load_export(src)
        variants = graph_variants(src, manifest, options.precision)  # before anything is written
        remote = [g for g in HEAVY_GRAPHS if g in manifest["graphs"]]
        max_batch = options.max_batch
    out.mkdir(parents=True, exist_ok=True)
    names = []
    for graph in remote:
        entry = manifest["graphs"][graph]
        version = out / f"osdiff_{graph}" / "1"
        version.mkdir(parents=True)
        if tensorrt:
            shutil.copyfile(src / engines.graphs[graph]["engine"], version / "model.plan")
            platform = {"platform": "tensorrt_plan"}
        else:
            onnx = src / variants[graph]["file"]
            shutil.copyfile(onnx, version / "model.onnx")
            if onnx.with_name(onnx.name + ".data").exists():  # weights over 2 GB: the graph names this file
                shutil.copyfile(onnx.with_name(onnx.name + ".data"), version / (onnx.name + ".data"))
            if options.python_only:
                (version / "model.py").write_text(_MODEL_PY_HEADER + MODEL_PY["graph"])
                platform = {"backend": "python"}
            else:
                platform = {"backend": "onnxruntime"}
        kind = "KIND_GPU" if tensorrt or (options.gpu and not options.python_only) else "KIND_CPU"
        batch = max_batch > 0
        config = {
            "name": f"osdiff_{graph}", **platform, "max_batch_size": max_batch,
            "input": [_graph_tensor(n, entry["shapes"][n], batch) for n in entry["inputs"]],
            "output": [_graph_tensor(n, entry["shapes"][n], batch) for n in entry["outputs"]],
            "instance_group": [{"count": options.instances, "kind": kind}],
        }
        if batch:
            config["dynamic_batching"] = {"max_queue_delay_microseconds": options.queue_delay_us}
        _write_config(version.parent, config)
        names.append(config["name"])

    skip = {COMPRESS: DECODE_ONLY, DECOMPRESS: ENCODE_ONLY}
    local = [] if tensorrt else [g for g in manifest["graphs"] if g not in remote and g not in HEAVY_GRAPHS]
    for name in (COMPRESS, DECOMPRESS):
        version = out / name / "1"
        _copy_export(model_dir, version / EXPORT_DIR, manifest, local)
        (version / "model.py").write_text(_MODEL_PY_HEADER + MODEL_PY["codec"])
        config = {
            "name": name, "backend": "python", "max_batch_size": 0,
            "input": [_codec_tensor(s) for s in INPUTS[name]],
            "output": [_codec_tensor(s) for s in OUTPUTS[name]],
            "instance_group": [{"count": options.codec_instances, "kind": "KIND_CPU"}],
            "parameters": {"remote_graphs": {"string_value": ",".join(g for g in remote if g not in skip[name])}},
        }
        _write_config(version.parent, config)
        names.append(name)
    validate_repository(out)
    return names


def validate_repository(repo: str | Path) -> dict[str, Any]:
    """Parse every model's config.pbtxt with Triton's ModelConfig protobuf; returns the messages
    by model name. Raises ExportError naming the file and the problem."""
    from google.protobuf import text_format

    pb = model_config_pb2()
    configs = {}
    for path in sorted(Path(repo).glob("*/config.pbtxt")):
        message = pb.ModelConfig()
        try:
            text_format.Parse(path.read_text(), message)
        except text_format.ParseError as e:
            raise ExportError(f"{path}: not a valid Triton model config: {e}") from e
        if message.name != path.parent.name:
            raise ExportError(f"{path}: names model {message.name!r}, but Triton names it by its folder {path.parent.name!r}")
        configs[message.name] = message
    if not configs:
        raise ExportError(f"{repo}: no config.pbtxt found")
    return configs


def _format(directory: Path) -> str | None:
    try:
        return json.loads((directory / "manifest.json").read_text()).get("format")
    except (OSError, ValueError, AttributeError):
        return None  # load_export says what is wrong


def _graph_tensor(name: str, shape: list[int | str], batch: bool) -> dict[str, Any]:
    dims = [d if isinstance(d, int) else -1 for d in (shape[1:] if batch else shape)]
    return {"name": name, "data_type": "TYPE_FP32", "dims": dims}


def _codec_tensor(spec: TensorSpec) -> dict[str, Any]:
    tensor = {"name": spec.name, "data_type": _TRITON_TYPES[spec.triton_dtype], "dims": list(spec.shape)}
    return tensor | ({"optional": True} if spec.optional else {})


def _write_config(model: Path, config: dict[str, Any]) -> None:
    from google.protobuf import json_format, text_format

    message = json_format.ParseDict(config, model_config_pb2().ModelConfig())  # unknown fields or enums raise
    (model / "config.pbtxt").write_text(f"# Written by `osdiff triton-repo`.\n{text_format.MessageToString(message)}")


def _copy_export(src: Path, dst: Path, manifest: dict[str, Any], local: list[str]) -> None:
    """What the codec instance reads: the manifest, the entropy-bottleneck parameters and the
    graphs it runs itself (fp32: they decide CDF indexes)."""
    (dst / "fp32").mkdir(parents=True)
    shutil.copyfile(src / "manifest.json", dst / "manifest.json")
    params = manifest["entropy"]["bottleneck"]["params_file"]
    shutil.copyfile(src / params, dst / params)
    for graph in local:
        onnx = src / manifest["graphs"][graph]["fp32"]["file"]
        shutil.copyfile(onnx, dst / manifest["graphs"][graph]["fp32"]["file"])
