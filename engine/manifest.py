"""The manifest of an `osdiff build` directory, and the checks that an engine set fits this machine
and this model.

Engine directory:
    manifest.json        TensorRT version, GPU, model fingerprint, source ONNX files and their
                         sha256, profiles, build settings, per graph: file, I/O and profile shapes
    <graph>.engine       one serialized TensorRT engine per graph
    timing.cache         TensorRT's timing cache, reused by the next build on this machine
    model/               the export's manifest.json and entropy-bottleneck parameters: what the
                         codec needs besides the networks, so that the engines run without the ONNX

A serialized engine runs only with the TensorRT version and on the GPU architecture that built it,
so every mismatch is reported with the exact command that rebuilds the engines.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from osdiff.engine.profiles import ShapeProfile
from osdiff.files import read_manifest, write_atomic

FORMAT = "osdiff-tensorrt"
FORMAT_VERSION = 1
TIMING_CACHE = "timing.cache"
MODEL_DIR = "model"


class EngineError(ValueError):
    """An engine directory is missing, incomplete, or does not fit this machine or model."""


@dataclass(frozen=True)
class Gpu:
    name: str
    compute_capability: str  # "9.0"

    def __str__(self) -> str:
        return f"{self.name} (compute capability {self.compute_capability})"


@dataclass
class EngineManifest:
    tensorrt: str
    gpu: Gpu
    model_name: str
    fingerprint: str  # hex, as in the export manifest
    onnx_dir: str  # absolute
    profiles: list[str]  # ShapeProfile strings, in profile-index order
    workspace_mib: int
    optimization_level: int
    # per graph: engine (file), onnx (file in onnx_dir), precision, onnx_sha256, inputs, outputs,
    # shapes (symbolic), profile_shapes (per profile: input -> [min, opt, max]), build_seconds
    graphs: dict[str, dict[str, Any]] = field(default_factory=dict)
    # the variant asked for at build time (engine/build.py graph_precision decides per graph)
    precision: str = "fp16"

    def shape_profiles(self) -> list[ShapeProfile]:
        return [ShapeProfile.parse(p) for p in self.profiles]

    def write(self, directory: str | Path) -> None:
        data = {"format": FORMAT, "format_version": FORMAT_VERSION, **asdict(self)}
        write_atomic(Path(directory) / "manifest.json", json.dumps(data, indent=1).encode())

    @staticmethod
    def read(directory: str | Path) -> "EngineManifest":
        d = Path(directory)
        data = read_manifest(d, FORMAT, FORMAT_VERSION, EngineError, "rebuild the engines with `osdiff build`")
        try:
            fields = {k: v for k, v in data.items() if k not in ("format", "format_version")}
            return EngineManifest(**{**fields, "gpu": Gpu(**fields["gpu"])})
        except (KeyError, TypeError) as e:
            raise EngineError(f"{d}: manifest.json is incomplete ({e}); rebuild the engines with `osdiff build`") from e

    def rebuild_command(self, directory: str | Path, onnx_dir: str | Path | None = None,
                        extra_profile: ShapeProfile | None = None) -> str:
        return build_command(onnx_dir or self.onnx_dir, directory,
                             self.shape_profiles() + ([extra_profile] if extra_profile else []),
                             self.workspace_mib, self.optimization_level, self.precision)

    def check_machine(self, directory: str | Path, tensorrt_version: str, gpu: Gpu) -> None:
        """Engines run only with the TensorRT version and on the GPU that built them."""
        problems = []
        if self.tensorrt != tensorrt_version:
            problems.append(f"built with TensorRT {self.tensorrt}, this is TensorRT {tensorrt_version}")
        if self.gpu != gpu:
            problems.append(f"built on {self.gpu}, this is {gpu}")
        if problems:
            raise EngineError(f"{directory}: the engines do not fit this machine ({'; '.join(problems)}); "
                              f"rebuild them: {self.rebuild_command(directory)}")

    def check_model(self, directory: str | Path, fingerprint: str) -> None:
        if self.fingerprint != fingerprint:
            raise EngineError(f"{directory}: the engines are of model {self.fingerprint[:16]}, not of model "
                              f"{fingerprint[:16]}; rebuild them: {self.rebuild_command(directory)}")

    def check_export(self, directory: str | Path, onnx_dir: str | Path, onnx_manifest: dict[str, Any]) -> None:
        """The engines were built from the ONNX files of this export, unchanged."""
        command = self.rebuild_command(directory, onnx_dir)
        if onnx_manifest["model"]["fingerprint"] != self.fingerprint:
            raise EngineError(f"{directory}: the engines are of model {self.fingerprint[:16]}, {onnx_dir} of model "
                              f"{onnx_manifest['model']['fingerprint'][:16]}; rebuild them: {command}")
        for name, entry in self.graphs.items():
            exported = onnx_manifest["graphs"].get(name, {}).get(entry["precision"], {})
            if exported.get("sha256") != entry["onnx_sha256"]:
                raise EngineError(f"{directory}: the {name} engine was built from another ONNX file than "
                                  f"{Path(onnx_dir) / entry['onnx']}; rebuild the engines: {command}")


def build_command(onnx_dir: str | Path, engine_dir: str | Path, profiles: list[ShapeProfile], workspace_mib: int,
                  optimization_level: int, precision: str = "fp16") -> str:
    """The `osdiff build` command line that (re)builds an engine directory."""
    args = ["osdiff", "build", str(Path(onnx_dir).absolute()), "-o", str(Path(engine_dir).absolute())]
    for p in profiles:
        args += ["--profile", str(p)]
    args += ["--workspace", str(workspace_mib), "--opt-level", str(optimization_level)]
    if precision != "fp16":
        args += ["--precision", precision]
    return shlex.join(args)
