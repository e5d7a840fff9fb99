"""`osdiff build`: one serialized TensorRT engine per graph of an `osdiff export` directory.

The engines are built in the form TensorRT 11 requires and TensorRT 10.x accepts:
- strongly typed networks (NetworkDefinitionCreationFlag.STRONGLY_TYPED): every tensor keeps the
  type the ONNX graph gives it, so precision is the export's decision: per graph the variant asked
  for (`precision`: the fp16 graph with its fp32 islands, or the INT8/FP8 Q/DQ graph that
  `osdiff calibrate` wrote) where the export has it, else fp16, else fp32. INT8 and FP8 come from
  the explicit Q/DQ nodes: no FP16/INT8 builder flag, no calibrator, no per-layer precision: 11.0
  removed them. Explicit batch is the only mode since 10.0.
- the ONNX folded and sanitized with Polygraphy first (engine/prepare.py);
- one optimization profile per image-size range, turned into shapes per input by engine/profiles.py;
- a workspace limit and a builder optimization level;
- a timing cache kept beside the engines and reused by the next build on the same machine.

tensorrt is imported inside the functions (it is an optional extra); see engine/environment.py.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from osdiff.calibration.precision import FP16_GRAPHS
from osdiff.engine.environment import TensorRTMissing, current_gpu, tensorrt_version
from osdiff.engine.manifest import MODEL_DIR, TIMING_CACHE, EngineError, EngineManifest
from osdiff.engine.prepare import prepare_onnx
from osdiff.engine.profiles import ShapeProfile
from osdiff.files import write_atomic
from osdiff.export.onnx_export import load_export

if TYPE_CHECKING:
    import tensorrt as trt

Shapes = dict[str, tuple[tuple[int, ...], ...]]  # input -> (min, opt, max) of one profile


PRECISIONS = ("fp16", "int8", "fp8")


def graph_precision(entry: dict[str, Any], precision: str) -> str:
    """The variant of one graph an engine is built from: `precision` where the export has it,
    else fp16, else fp32 (the entropy-model graphs)."""
    return next(p for p in (precision, "fp16", "fp32") if p in entry)


def build_engines(onnx_dir: str | Path, engine_dir: str | Path, profiles: list[ShapeProfile], workspace_mib: int,
                  optimization_level: int, echo: Callable[[str], None] = print, precision: str = "fp16") -> EngineManifest:
    """Build every graph of the export; returns the manifest written beside the engines.
    optimization_level: 0 (fastest build) to 5; TensorRT's default is 3. precision: fp16, or the
    int8/fp8 graphs of `osdiff calibrate` (EngineError if the export has none)."""
    onnx_manifest, _ = load_export(onnx_dir)
    if precision not in PRECISIONS:
        raise EngineError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    if precision != "fp16" and not any(precision in e for e in onnx_manifest["graphs"].values()):
        try:  # before anyone spends minutes calibrating on a machine that cannot build anyway
            tensorrt_version()
            also = ""
        except TensorRTMissing as e:
            also = f"; the build needs TensorRT too: {e}"
        raise EngineError(f"{onnx_dir}: the export has no {precision} graphs; run `osdiff calibrate --precision "
                          f"{precision}` first{also}")
    if not profiles:
        raise EngineError("give at least one optimization profile")
    for p in profiles:
        p.check(onnx_manifest["pad_multiple"])
    if not 0 <= optimization_level <= 5:
        raise EngineError(f"the builder optimization level is 0 to 5, not {optimization_level}")
    version, gpu = tensorrt_version(), current_gpu()
    import tensorrt as trt

    src, out = Path(onnx_dir), Path(engine_dir)
    out.mkdir(parents=True, exist_ok=True)
    _copy_model(src, out / MODEL_DIR, onnx_manifest)
    manifest = EngineManifest(tensorrt=version, gpu=gpu, model_name=onnx_manifest["model"]["name"],
                              fingerprint=onnx_manifest["model"]["fingerprint"], onnx_dir=str(src.absolute()),
                              profiles=[str(p) for p in profiles], workspace_mib=workspace_mib,
                              optimization_level=optimization_level, precision=precision)
    echo(f"building with TensorRT {version} on {gpu}; profiles {', '.join(manifest.profiles)}")

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    cache_path = out / TIMING_CACHE
    cache = _timing_cache(builder, cache_path, echo)
    monitor = _progress_monitor(echo)  # must outlive every build that reports to it
    graphs = onnx_manifest["graphs"]
    with tempfile.TemporaryDirectory(dir=out, prefix=".prepared-") as tmp:
        for i, (name, entry) in enumerate(graphs.items(), 1):
            variant = graph_precision(entry, precision)
            t0 = time.perf_counter()
            echo(f"[{i}/{len(graphs)}] {name} ({variant}): folding the ONNX graph with Polygraphy")
            prepared = Path(tmp) / name / "model.onnx"
            # ONNX Runtime, which folds the constants, cannot evaluate TensorRT's FP8 Q/DQ ops: fold around them
            prepare_onnx(src / entry[variant]["file"], prepared, partition=variant == "fp8")
            shapes = [p.input_shapes(entry["shapes"], entry["inputs"]) for p in profiles]
            config = _config(builder, workspace_mib, optimization_level, cache, monitor,
                             tf32=name in FP16_GRAPHS)
            plan = _build(builder, config, name, prepared, entry["inputs"], shapes)
            write_atomic(out / f"{name}.engine", plan)
            write_atomic(cache_path, bytes(cache.serialize()))  # after each engine: a failed build keeps the timings
            seconds = time.perf_counter() - t0
            manifest.graphs[name] = {
                "engine": f"{name}.engine", "onnx": entry[variant]["file"], "precision": variant,
                "onnx_sha256": entry[variant]["sha256"], "inputs": entry["inputs"], "outputs": entry["outputs"],
                "shapes": entry["shapes"], "profile_shapes": shapes, "build_seconds": round(seconds, 1),
            }
            echo(f"[{i}/{len(graphs)}] {name}: built in {seconds:.1f} s, {len(plan) / 1e6:.1f} MB")
    manifest.write(out)
    return manifest


def _copy_model(src: Path, dst: Path, onnx_manifest: dict[str, Any]) -> None:
    """What the codec needs besides the networks (see engine/manifest.py)."""
    dst.mkdir(exist_ok=True)
    shutil.copyfile(src / "manifest.json", dst / "manifest.json")
    params = onnx_manifest["entropy"]["bottleneck"]["params_file"]
    shutil.copyfile(src / params, dst / params)


def _config(builder: "trt.Builder", workspace_mib: int, optimization_level: int, cache: "trt.ITimingCache",
            monitor: "trt.IProgressMonitor", tf32: bool) -> "trt.IBuilderConfig":
    import tensorrt as trt

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    config.builder_optimization_level = optimization_level
    config.progress_monitor = monitor
    if not tf32:
        # TF32 (on by default) rounds fp32 products to 10-bit mantissas. The LFGCM graphs decide
        # CDF indexes, which must come out as the encoder's fp32 arithmetic gave them.
        config.clear_flag(trt.BuilderFlag.TF32)
    if not config.set_timing_cache(cache, False):
        raise EngineError("TensorRT refused the timing cache it has just accepted")
    return config


def _timing_cache(builder: "trt.Builder", path: Path, echo: Callable[[str], None]) -> "trt.ITimingCache":
    """The cache a previous build left beside the engines, unless it is from another GPU or
    TensorRT version (ignore_mismatch=False: foreign timings would pick the wrong tactics)."""
    config = builder.create_builder_config()
    if path.exists():
        cache = config.create_timing_cache(path.read_bytes())
        if cache is not None and config.set_timing_cache(cache, False):
            echo(f"reusing the timing cache {path}")
            return cache
        echo(f"{path} is from another GPU or TensorRT version; starting a new timing cache")
    return config.create_timing_cache(b"")


def _build(builder: "trt.Builder", config: "trt.IBuilderConfig", name: str, onnx: Path, inputs: list[str],
           shapes: list[Shapes]) -> bytes:
    import tensorrt as trt

    # Required on 10.x; 11.x builds strongly typed networks only and ignores the flag. The enum's
    # value differs between the two (EXPLICIT_BATCH, 0 in 10.x, is gone in 11), so never hard-code it.
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, builder.logger)
    if not parser.parse_from_file(str(onnx)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"{name}: TensorRT cannot parse the ONNX graph: {errors}")
    found = [network.get_input(i).name for i in range(network.num_inputs)]
    if found != inputs:
        raise EngineError(f"{name}: the ONNX graph has inputs {found}, the export manifest says {inputs}")
    for profile_shapes in shapes:
        profile = builder.create_optimization_profile()
        for tensor, (lo, mid, hi) in profile_shapes.items():
            profile.set_shape(tensor, trt.Dims(list(lo)), trt.Dims(list(mid)), trt.Dims(list(hi)))
        if config.add_optimization_profile(profile) < 0:
            raise EngineError(f"{name}: TensorRT rejected the optimization profile {profile_shapes}")
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineError(f"{name}: TensorRT could not build the engine (its log above says why)")
    return bytes(plan)


def _progress_monitor(echo: Callable[[str], None]) -> "trt.IProgressMonitor":
    import tensorrt as trt

    class Progress(trt.IProgressMonitor):
        """Prints TensorRT's two outer levels of build phases, with the time each took."""

        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self.depth: dict[str, int] = {}
            self.start: dict[str, float] = {}

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            self.depth[phase_name] = depth = 0 if parent_phase is None else self.depth.get(parent_phase, 0) + 1
            if depth < 2:
                self.start[phase_name] = time.perf_counter()
                echo(f"    {'  ' * depth}{phase_name} ({num_steps} steps)")

        def step_complete(self, phase_name: str, step: int) -> bool:
            return True  # never cancel

        def phase_finish(self, phase_name: str) -> None:
            t0 = self.start.pop(phase_name, None)
            if t0 is not None:
                echo(f"    {'  ' * self.depth[phase_name]}{phase_name}: {time.perf_counter() - t0:.1f} s")

    return Progress()
