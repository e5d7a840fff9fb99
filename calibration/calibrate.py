"""`osdiff calibrate`: INT8 (and FP8) versions of the heavy graphs of an export, measured.

    1. the fp32 codec runs on the calibration crops (calibration/pipeline.py), recording the
       real inputs of the VAE encoder, G_s, the denoiser and the VAE decoder, which set the
       activation ranges; and on the validation pictures (calibration/images.py: whole
       pictures the ranges never saw), on which every loss below is measured;
    2. sensitivity: each graph is quantized whole (calibration/quantize.py), then one block at
       a time is left quantized and the validation pictures are decoded: the drop in decoded
       PSNR against the originals (mean over pictures) is that block's cost;
    3. the skip list: every block whose own cost exceeds `max_block_loss_db`; then all four
       graphs are quantized together without them, and while the end-to-end loss is over `aim`
       times the targets (calibration/precision.py TARGETS; the margin is for photos the
       validation pictures do not represent) the costliest remaining block (PSNR and MS-SSIM
       drops as fractions of their targets) is skipped too;
    4. INT8 graphs are written as ONNX with Q/DQ nodes (int8/<graph>.onnx) and FP8 ones with
       TensorRT's FP8 Q/DQ ops (fp8/<graph>.onnx), from the export's fp32 graphs (nothing is
       exported again; the attention keeps the export's form), each with a manifest entry: precision,
       calibrator, images, skipped blocks, measured loss. A calibration over the targets is
       written but not entered in the manifest unless `accept_loss` (so nothing runs it by
       accident); calibration.json beside the manifest keeps every number.

The entropy-model graphs are never touched: their fp32 outputs decide the stream's symbols.
"""

from __future__ import annotations

import json
import shlex
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from osdiff.calibration.images import CalibrationImage
from osdiff.calibration.pipeline import CalibrationRun, Recorded, decode_with, latent_error, quality, run_fp32
from osdiff.calibration.precision import QUANTIZED_GRAPHS, TARGETS
from osdiff.calibration.qdq_export import count_dequantize, export_qdq
from osdiff.calibration.quantize import (Recipe, blocks, folded, keep_float, modelopt_version, partly_quantized,
                                         quantize)
from osdiff.export.model import OSDiffModel
from osdiff.export.onnx_export import ExportError, _sha256, load_export
from osdiff.files import write_atomic

REPORT = "calibration.json"
STAGING = ".calibrating"  # in the export directory, while the graphs are written


@dataclass
class Settings:
    precisions: tuple[str, ...] = ("int8",)
    calibrator: str = "percentile"
    # 99.999, not 99.99: measured when the default calibration photos were the wheels' six only, on
    # whole training photographs that then set no range (the four wallpaper ones, 480x768; they are
    # calibration photos now): the built-in model's INT8 graphs lost 0.59 dB at 99.999, 0.73 dB at 99.99
    # (the denoiser alone 0.27 against 0.55: clipping its rare large activations costs more than
    # the coarser steps); max 0.82, 99.9999 0.72
    percentile: float = 99.999
    smoothquant_alpha: float | None = 0.8
    # a block whose own cost (decoded PSNR drop, dB) exceeds this stays float
    max_block_loss_db: float = 0.05
    # at most this many further blocks are skipped to meet the targets
    max_extra_skips: int = 8
    # further blocks are skipped until the validation loss is under this fraction of each target:
    # a few validation pictures understate the loss on unseen photos (the built-in model, INT8,
    # validated on two pictures: 0.0042 MS-SSIM there, 0.0057 on the held-out trio, 1.4x; PSNR 1.9x)
    aim: float = 0.7
    sensitivity: bool = True
    graphs: tuple[str, ...] = QUANTIZED_GRAPHS
    skip: dict[str, list[str]] = field(default_factory=dict)  # graph -> blocks kept float from the start

    def recipe(self, precision: str) -> Recipe:
        if precision == "fp8":
            return Recipe.fp8()
        return Recipe("int8", self.calibrator, self.percentile, self.smoothquant_alpha)


@dataclass
class PrecisionResult:
    precision: str
    recipe: dict
    skipped: dict[str, list[str]]  # graph -> blocks kept float
    sensitivity: dict[str, dict[str, dict[str, float]]]  # graph -> block -> quality
    per_graph: dict[str, dict[str, Any]]  # graph -> loss of that graph alone, latent error, file
    end_to_end: dict[str, float]
    within_targets: bool
    registered: bool
    seconds: float
    # the fake-quantized graphs themselves (PyTorch), for measuring them further; not in the report
    modules: dict[str, nn.Module] = field(default_factory=dict, repr=False)

    def report(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if k != "modules"}


def within(q: dict[str, float], fraction: float = 1.0) -> bool:
    """Whether every drop in `q` is at most `fraction` of its target (calibration/precision.py TARGETS)."""
    return all(q.get(k, 0.0) <= fraction * v for k, v in TARGETS.items())


def calibrate(model: OSDiffModel, export_dir: str | Path, images: list[CalibrationImage], settings: Settings,
              accept_loss: bool = False, echo: Callable[[str], None] = print,
              validation: list[CalibrationImage] | None = None) -> list[PrecisionResult]:
    """Calibrate, measure and write (see the module docstring): ranges from `images`, losses
    measured on `validation` (calibration/images.py load_calibration_set; None: on `images`
    themselves, which flatters the loss). Raises ExportError when the export is of another
    model or one of its fp32 graphs to quantize is missing, not the file the export wrote (the
    Q/DQ graphs are written from them) or has its attention as a Scan, CalibrationUnavailable
    without modelopt. The graphs are written aside and moved into the export at the end: a
    calibration that fails before leaves the export as it was."""
    version = modelopt_version()
    export_dir = Path(export_dir)
    manifest, _ = load_export(export_dir)
    if manifest["model"]["fingerprint"] != model.fingerprint.hex():
        raise ExportError(f"{export_dir}: exported from another model than the one given to calibrate "
                          f"({manifest['model']['fingerprint'][:16]} vs {model.fingerprint.hex()[:16]})")
    unknown = set(settings.graphs) - set(QUANTIZED_GRAPHS)
    if unknown:
        raise ValueError(f"only {', '.join(QUANTIZED_GRAPHS)} are quantized, not {sorted(unknown)}")
    # graph -> its fp32 file, which its Q/DQ graphs are written from: checked before the long work
    float_graphs = {}
    for g in settings.graphs:
        graph = manifest["graphs"].get(g, {})
        if "fp32" not in graph:
            raise ExportError(f"{export_dir}: has no fp32 graph {g!r} to write its quantized graph from; export it "
                              "with `osdiff export`")
        if graph.get("attention") == "scan":
            raise ExportError(f"{export_dir}: {g}'s attention was exported as a Scan, which the quantized graph "
                              "would keep and TensorRT cannot build; re-export with `osdiff export --attention mha` "
                              "(the default)")
        entry = graph["fp32"]
        path = export_dir / entry["file"]
        if not path.exists():
            raise ExportError(f"{path}: missing; re-export with `osdiff export`")
        if _sha256(path) != entry["sha256"]:
            raise ExportError(f"{path}: not the file the export wrote (its sha256 differs from manifest.json's); "
                              "re-export with `osdiff export`")
        float_graphs[g] = path
    t0 = time.perf_counter()
    echo(f"running the fp32 codec on {len(images)} calibration crops"
         + (f" and {len(validation)} validation pictures ..." if validation else " ..."))
    run = run_fp32(model, images)
    measured = run_fp32(model, validation) if validation else run
    echo(f"  {time.perf_counter() - t0:.1f} s")
    graphs = model.graphs()
    results = []
    # graphs are written here first and moved into the export only once every one of them is: a
    # calibration that fails (or is interrupted) leaves the export as it was
    staging = export_dir / STAGING
    shutil.rmtree(staging, ignore_errors=True)
    try:
        for precision in settings.precisions:
            results.append(_calibrate_precision(model, graphs, run, measured, settings, precision, float_graphs,
                                                staging, accept_loss, echo))
        # the earlier calibration's entries go first: no entry ever names a file it did not hash
        _unregister(export_dir, settings.precisions)
        for graph_file in sorted(staging.rglob("*.onnx")):
            target = export_dir / graph_file.relative_to(staging)
            target.parent.mkdir(exist_ok=True)
            for f in (graph_file, graph_file.with_name(graph_file.name + ".data")):
                to = target.with_name(f.name)
                if f.exists():
                    f.replace(to)
                else:  # an earlier calibration's side file would count in the graph's sha256
                    to.unlink(missing_ok=True)
        echo(f"moved the Q/DQ graphs into {export_dir}")
        _write(export_dir, results, images, validation, settings, version, accept_loss)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return results


def _calibrate_precision(model: OSDiffModel, graphs: dict, run: CalibrationRun, measured: CalibrationRun,
                         settings: Settings, precision: str, float_graphs: dict[str, Path], staging: Path,
                         accept_loss: bool, echo: Callable[[str], None]) -> PrecisionResult:
    """`run`: the fp32 codec on the crops that set the ranges; `measured`: on the pictures the
    losses are measured on (the same run when there are no validation pictures). The graphs are
    written from `float_graphs` (graph -> the export's fp32 file) under `staging`, as they will
    lie in the export."""
    t0 = time.perf_counter()
    recipe = settings.recipe(precision)
    originals = [im.pixels for im in measured.images]
    skipped = {g: list(settings.skip.get(g, [])) for g in settings.graphs}
    sensitivity: dict[str, dict[str, dict[str, float]]] = {}
    costs: list[tuple[float, str, str]] = []  # (cost against the targets, graph, block), for the extra skips
    quantized = {}
    for g in settings.graphs:
        module = graphs[g].module
        quantized[g] = quantize(module, run.inputs[g], recipe)
        if not settings.sensitivity:
            continue
        q = folded(quantized[g])  # the decodes below measure it; the export writes quantized[g]
        sensitivity[g] = {}
        block_layers = blocks(module)
        for i, (block, layers) in enumerate(block_layers.items(), 1):
            with partly_quantized(module, q, layers) as m:
                decoded, stream_bytes = decode_with(model, measured, {g: m})
            sensitivity[g][block] = quality(decoded, measured.decoded, originals) | {
                "rate_change": stream_bytes / measured.bytes - 1}
            costs.append((_against_targets(sensitivity[g][block]), g, block))
            echo(f"  {precision} {g} [{i}/{len(block_layers)}] {block}: {_fmt(sensitivity[g][block])}")
            if sensitivity[g][block]["psnr_drop_db"] > settings.max_block_loss_db and block not in skipped[g]:
                skipped[g].append(block)
        decoded, stream_bytes = decode_with(model, measured, {g: q})
        sensitivity[g]["(all blocks)"] = quality(decoded, measured.decoded, originals) | {
            "rate_change": stream_bytes / measured.bytes - 1}
        echo(f"{precision} {g}: {len(block_layers)} blocks measured, all quantized: "
             f"{_fmt(sensitivity[g]['(all blocks)'])}; over {settings.max_block_loss_db} dB alone: "
             f"{', '.join(skipped[g]) or 'none'}")
    costs.sort(reverse=True)
    extra = [(g, b) for c, g, b in costs if b not in skipped[g] and c > 0][: settings.max_extra_skips]
    for g, q in quantized.items():
        keep_float(q, graphs[g].module, _layers(graphs[g].module, skipped[g]))

    def measure() -> dict[str, float]:
        decoded, stream_bytes = decode_with(model, measured, {g: folded(q) for g, q in quantized.items()})
        q = quality(decoded, measured.decoded, originals) | {"rate_change": stream_bytes / measured.bytes - 1}
        echo(f"{precision} all graphs, skipping {sum(map(len, skipped.values()))} block(s): {_fmt(q)}")
        return q

    def skip(g: str, b: str) -> None:
        skipped[g].append(b)
        keep_float(quantized[g], graphs[g].module, _layers(graphs[g].module, [b]))

    end_to_end = skip_until_within(extra, measure, skip, settings.aim, echo)
    ok = within(end_to_end)
    registered = ok or accept_loss
    per_graph = {}
    for g, q in quantized.items():
        path = staging / precision / f"{g}.onnx"
        constant = export_qdq(q, model.config, g, graphs[g].inputs, float_graphs[g], path)
        # layers the exporter computed into constants are float in the graph: so they are in what
        # is measured from here on (the end-to-end loss above was measured with them quantized)
        keep_float(q, graphs[g].module, constant)
        # that graph alone: it runs on the fp32 run's inputs for it, in order (decode_with)
        recorded = Recorded(folded(q))
        alone, _ = decode_with(model, measured, {g: recorded})
        per_graph[g] = {"file": str(path.relative_to(staging)), "sha256": _sha256(path),
                        "dequantize_nodes": count_dequantize(path), "constant_layers": constant,
                        "quality": quality(alone, measured.decoded, originals),
                        "latent_error": latent_error(recorded.outputs, graphs[g].module, measured.inputs[g])}
        echo(f"{precision} {g}: Q/DQ graph for {per_graph[g]['file']} written ({per_graph[g]['dequantize_nodes']} "
             "DequantizeLinear nodes)")
    result = PrecisionResult(precision, recipe.describe(), skipped, sensitivity, per_graph, end_to_end, ok, registered,
                             time.perf_counter() - t0, quantized)
    echo(verdict(result))
    return result


def skip_until_within(candidates: list[tuple[str, str]], measure: Callable[[], dict[str, float]],
                      skip: Callable[[str, str], None], aim: float, echo: Callable[[str], None]) -> dict[str, float]:
    """Step 3's extra skips: measure, and while the loss is over `aim` x the targets, keep the
    next (graph, block) of `candidates` (costliest first) float and measure again. Returns the
    last measurement; says so when the candidates run out above the aim."""
    taken = 0
    while True:
        q = measure()
        if within(q, aim):
            return q
        if taken == len(candidates):
            # no candidates: the sensitivity search, which ranks the blocks, was off
            kept = (f" with every candidate block ({taken}, at most max_extra_skips) kept float" if candidates
                    else ", and no block was measured to keep float (sensitivity off)")
            echo(f"  still over {aim:g} x the targets {TARGETS}{kept}: {'within' if within(q) else 'over'} the "
                 "targets themselves")
            return q
        g, b = candidates[taken]
        taken += 1
        skip(g, b)
        echo(f"  over {aim:g} x the targets {TARGETS}: {g} {b} stays float too")


def _against_targets(q: dict[str, float]) -> float:
    """A block's cost as fractions of the targets, summed: the MS-SSIM target is the one a
    quantized diffusion decoder misses first (many blocks losing a little each), so a block is
    ranked by both drops, not by PSNR alone."""
    return sum(q.get(k, 0.0) / v for k, v in TARGETS.items())


def verdict(r: PrecisionResult) -> str:
    """One line: what a precision loses end to end on the validation pictures, against the
    targets, and whether its graphs were entered in the manifest."""
    q = r.end_to_end
    loss = f"PSNR drop {q['psnr_drop_db']:.3f} dB, " + (f"MS-SSIM drop {q['ms_ssim_drop']:.4f}" if "ms_ssim_drop" in q
                                                          else "MS-SSIM not measured (pictures of 160 pixels or less)")
    targets = f"{TARGETS['psnr_drop_db']} dB, {TARGETS['ms_ssim_drop']} MS-SSIM"
    if r.within_targets and "ms_ssim_drop" not in q:
        return (f"{r.precision}: within the PSNR target ({TARGETS['psnr_drop_db']} dB) on the validation pictures; "
                f"the MS-SSIM one unchecked: {loss}")
    if r.within_targets:
        return f"{r.precision}: within the targets ({targets}) on the validation pictures: {loss}"
    return (f"WARNING: {r.precision} loses more than the targets ({targets}) on the validation pictures: {loss}; "
            + ("entered in the manifest anyway (--accept-loss)" if r.registered
               else "written, but NOT entered in the manifest (--accept-loss to use it)"))


def _layers(module: nn.Module, skip_blocks: list[str]) -> list[str]:
    by_block = blocks(module)
    return [layer for b in skip_blocks for layer in by_block.get(b, [])]


def _fmt(q: dict[str, float]) -> str:
    s = f"PSNR drop {q['psnr_drop_db']:+.3f} dB ({q['psnr_vs_fp32_db']:.1f} dB vs fp32)"
    if "ms_ssim_drop" in q:
        s += f", MS-SSIM drop {q['ms_ssim_drop']:+.4f}"
    return s


def _unregister(export_dir: Path, precisions: tuple[str, ...]) -> None:
    """Remove `precisions`' entries (an earlier calibration's) from the export's manifest."""
    manifest = json.loads((export_dir / "manifest.json").read_text())
    for entry in manifest["graphs"].values():
        for p in precisions:
            entry.pop(p, None)
    for p in precisions:
        manifest.get("calibration", {}).pop(p, None)
    write_atomic(export_dir / "manifest.json", json.dumps(manifest, indent=1).encode())


def _write(export_dir: Path, results: list[PrecisionResult], images: list[CalibrationImage],
           validation: list[CalibrationImage] | None, settings: Settings, version: str, accept_loss: bool) -> None:
    """calibration.json with every number, and the registered graphs in manifest.json."""
    command = shlex.join(["osdiff", *sys.argv[1:]]) if Path(sys.argv[0]).name == "osdiff" else None
    names = [im.name for im in images]
    measured_on = [f"{im.name} ({im.pixels.shape[0]}x{im.pixels.shape[1]})" for im in validation or images]
    report = {"command": command, "modelopt": version, "images": names, "crop": list(images[0].pixels.shape[:2]),
              "measured_on": measured_on,
              "settings": asdict(settings), "targets": TARGETS,
              "results": {r.precision: r.report() for r in results}}
    write_atomic(export_dir / REPORT, json.dumps(report, indent=1).encode())
    manifest = json.loads((export_dir / "manifest.json").read_text())
    for r in results:
        for g, entry in manifest["graphs"].items():  # an earlier calibration's entries are gone (_unregister)
            if r.registered and g in r.per_graph:
                p = r.per_graph[g]
                entry[r.precision] = {
                    "file": p["file"], "sha256": p["sha256"], "calibrator": r.recipe["calibrator"],
                    "recipe": r.recipe, "images": names, "measured_on": measured_on, "skipped_blocks": r.skipped[g],
                    "constant_layers": p["constant_layers"], "loss": p["quality"],
                    "latent_error": p["latent_error"],
                    "runs_on": "onnxruntime, tensorrt" if r.precision == "int8" else "tensorrt",
                }
        manifest.setdefault("calibration", {})[r.precision] = {
            "report": REPORT, "end_to_end": r.end_to_end, "within_targets": r.within_targets, "registered": r.registered}
    write_atomic(export_dir / "manifest.json", json.dumps(manifest, indent=1).encode())
