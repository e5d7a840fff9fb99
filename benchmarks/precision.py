"""Reduced precision, measured: fp32, fp16, INT8 and FP8 on held-out photographs, per graph and
end to end, and the decode time of INT8 against fp32 on this CPU.

Part 1, the built-in model (real quality): export it (fp32 + fp16), calibrate INT8 and FP8 on its
training photographs (`osdiff calibrate`'s defaults; with `--export DIR` holding a calibration
already, that calibration is used: its INT8 graphs as they are, FP8's fake quantization rebuilt from
its skip lists on the default calibration crops), then on the held-out photographs chelsea, coffee
and rocket (`--held-out all`: the twelve of training/data.py HELD_OUT_SET; never used by training
or calibration), whole:
  - fp32, fp16, INT8: ONNX Runtime CPU (INT8: the real Q/DQ graphs); FP8: PyTorch with ModelOpt's
    fake quantization (its ONNX uses TensorRT-only ops);
  - end to end (every heavy graph in that precision, encode and decode) and per graph (that graph
    alone, the others fp32): PSNR and MS-SSIM of the decoded image against fp32's decode and
    against the original; the graph's output error (max and mean |x - fp32|) on its own inputs;
  - decode (and VAE encoder) time per stage on chelsea, INT8 against fp32 and fp16, medians of
    interleaved runs in this one process, with the CPU's model name and flags, and where the time
    goes per op type (ONNX Runtime's profiler).
Part 2, the full-size architecture with seeded random weights (numerics only: the pictures mean
nothing), at 128x192: INT8 and FP8 fake quantization in PyTorch, every layer quantized (no
sensitivity search at this size), calibrated on 128-pixel crops of the training photographs.
Part 3 (before part 2 when both run), speed where the convolutions are SD 2.1's size: the full-size
architecture (random weights, timing only), the VAE encoder, G_s and the VAE decoder each exported
fp32 and INT8 (Q/DQ), ONNX Runtime CPU, INT8 against fp32 side by side on random inputs shaped for a
256x384 image (`--speed-size`), each for at least 10 s, with the time per op type; the denoiser (UNet +
control module, 1.2 G parameters) too, last (`--speed-graph` picks graphs).

Writes benchmarks/results/precision_cpu.json (`--json`) and prints the tables. Heavy (the denoiser's
timing step peaked at 16.2 GB): run it under the shared lock,

    flock /tmp/osdiff-heavy.lock python benchmarks/precision.py [--export DIR] [--held-out trio|all]
        [--skip-full] [--skip-speed] [--speed-graph G ...] [--speed-size HxW] [--runs 5] [--json PATH]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # a shared CPU: spinning OpenMP workers cost 10x here

import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import click  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from entropy import cpu_model  # noqa: E402

from osdiff.calibration.calibrate import Settings, calibrate  # noqa: E402
from osdiff.calibration.images import load_calibration_images, load_calibration_set  # noqa: E402
from osdiff.calibration.islands import island_ranges, summary  # noqa: E402
from osdiff.calibration.pipeline import _Backend, quality, run_fp32  # noqa: E402
from osdiff.calibration.precision import QUANTIZED_GRAPHS, TARGETS  # noqa: E402
from osdiff.calibration.quantize import Recipe, blocks, folded, quantize  # noqa: E402
from osdiff.config import ModelConfig  # noqa: E402
from osdiff.export.model import OSDiffModel  # noqa: E402
from osdiff.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend  # noqa: E402
from osdiff.runtime.codec import Codec  # noqa: E402
from osdiff.runtime.profiling import Trace, per_stage  # noqa: E402

PHOTOS = ("chelsea.png", "coffee.png", "rocket.jpg")
RESULTS = Path(__file__).parent / "results" / "precision_cpu.json"
ENCODE_GRAPHS = ("vae_encoder",)
# the full-size graphs part 3 times
SPEED_GRAPHS = ("vae_encoder", "synthesis", "vae_decoder", "denoiser")


def cpu_flags() -> dict[str, bool]:
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    return {f: f in flags for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "avx512_bf16")}


class Mixed:
    """Graphs run by per-graph backends (the rest by `base`): one graph in another precision."""

    def __init__(self, base, others: dict) -> None:  # type: ignore[no-untyped-def]
        self.base, self.others = base, others
        self.name, self.models, self.device = base.name, base.models, base.device

    def run(self, graph: str, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.others.get(graph, self.base).run(graph, *inputs)


class Recorder:
    """Keeps the inputs and outputs of every heavy-graph run."""

    def __init__(self, backend) -> None:  # type: ignore[no-untyped-def]
        self.backend = backend
        self.name, self.models, self.device = backend.name, backend.models, backend.device
        self.io: dict[str, tuple] = {}

    def run(self, graph: str, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.backend.run(graph, *inputs)
        if graph in QUANTIZED_GRAPHS:
            self.io[graph] = (inputs, out)
        return out


def latent_errors(backends: dict, ref_io: dict) -> dict[str, dict[str, float]]:
    """Each graph's output error against fp32's, on fp32's inputs for that graph."""
    out = {}
    for g, backend in backends.items():
        inputs, (ref,) = ref_io[g]
        (y,) = backend.run(g, *inputs)
        d = (y.float() - ref.float()).abs()
        out[g] = {"max_abs": float(d.max()), "mean_abs": float(d.mean()), "rms_fp32": float(ref.pow(2).mean().sqrt())}
    return out


def measure(codec_of, graph_backends: dict[str, dict], ref_codec: Codec, photos: dict[str, np.ndarray]) -> dict:
    """Per precision: end to end and per graph, quality against fp32 and the original, per photo
    and the mean; latent errors per graph."""
    out: dict = {}
    for precision, per_graph in graph_backends.items():
        rows: dict = {"end_to_end": {}, "per_graph": {g: {} for g in QUANTIZED_GRAPHS}, "latent_error": {}}
        for name, pixels in photos.items():
            rec = Recorder(ref_codec.backend)
            ref = Codec(rec).decompress(Codec(rec).compress(pixels))
            e2e = codec_of(precision, None)
            decoded = e2e.decompress(e2e.compress(pixels))
            rows["end_to_end"][name] = quality([decoded], [ref], [pixels])
            for g in QUANTIZED_GRAPHS:
                c = codec_of(precision, g)
                d = c.decompress(c.compress(pixels))
                rows["per_graph"][g][name] = quality([d], [ref], [pixels])
            rows["latent_error"][name] = latent_errors(per_graph, rec.io)
        out[precision] = rows
    return out


def mean_rows(rows: dict[str, dict[str, float]]) -> dict[str, float]:
    keys = next(iter(rows.values())).keys()
    return {k: float(np.mean([r[k] for r in rows.values()])) for k in keys}


def timings(codecs: dict[str, Codec], pixels: np.ndarray, runs: int) -> dict:
    """Median ms per stage of decode and encode, precisions interleaved run by run."""
    spans: dict[str, dict[str, list[float]]] = {p: {} for p in codecs}
    streams = {p: c.compress(pixels) for p, c in codecs.items()}
    for p, c in codecs.items():  # warm-up: sessions are created on first use
        c.decompress(streams[p])
    for _ in range(runs):
        for p, c in codecs.items():
            enc, dec = Trace(), Trace()
            c.compress(pixels, trace=enc)
            c.decompress(streams[p], trace=dec)
            for stage, ms in (per_stage(enc.spans()) | per_stage(dec.spans())).items():
                spans[p].setdefault(stage, []).append(ms)
    return {p: {s: statistics.median(v) for s, v in st.items()} for p, st in spans.items()}


def builtin_part(runs: int, export: Path | None, names: tuple[str, ...], echo) -> dict:  # type: ignore[no-untyped-def]
    from osdiff.builtin import load_builtin
    from osdiff.export.onnx_export import export_onnx
    from osdiff.training.data import held_out_photo

    model = load_builtin()
    tmp = tempfile.TemporaryDirectory()
    d = export or Path(tmp.name) / "export"
    if not (d / "manifest.json").exists():
        echo(f"exporting the built-in model to {d} (fp32 + fp16) ...")
        export_onnx(model, d, fp16=True)
    report_path = d / "calibration.json"
    if report_path.exists() and {"int8", "fp8"} <= set(json.loads(report_path.read_text())["results"]):
        echo(f"reusing the calibration in {d} (FP8's fake-quantized graphs rebuilt from its skip lists) ...")
        report = json.loads(report_path.read_text())
        # the crops it was calibrated on: the crop size, and how many crops per photo
        per_photo = len(report["images"]) // len({n.split("@")[0] for n in report["images"]})
        run = run_fp32(model, load_calibration_set(None, report["crop"][0], per_photo).crops)
        graphs = model.graphs()
        fp8 = {g: quantize(graphs[g].module, run.inputs[g], Recipe.fp8(),
                           [layer for b in report["results"]["fp8"]["skipped"][g] for layer in blocks(graphs[g].module)[b]])
               for g in QUANTIZED_GRAPHS}
        calibration = {p: {k: r[k] for k in ("skipped", "end_to_end", "within_targets", "recipe")}
                       for p, r in report["results"].items()}
    else:
        echo("calibrating INT8 and FP8 (osdiff calibrate's defaults) ...")
        calibration_set = load_calibration_set(None, 256, 1)
        results = {r.precision: r for r in calibrate(model, d, calibration_set.crops, Settings(precisions=("int8", "fp8")),
                                                      accept_loss=True, echo=lambda s: echo("  " + s),
                                                      validation=calibration_set.validation)}
        fp8 = results["fp8"].modules
        calibration = {p: {"skipped": r.skipped, "end_to_end": r.end_to_end, "within_targets": r.within_targets,
                           "recipe": r.recipe} for p, r in results.items()}
        run = run_fp32(model, calibration_set.crops)
    fp8 = {g: folded(m) for g, m in fp8.items()}  # the same computation, weights quantized once
    echo("fp16 islands: activation ranges on the calibration images ...")
    islands = summary(island_ranges(model, run))
    photos = {n: held_out_photo(n) for n in names}
    ort = {p: OnnxRuntimeBackend(d, precision=p) for p in ("fp32", "fp16", "int8")}
    torch_fp32 = _Backend(model, {})

    def codec_of(precision: str, graph: str | None) -> Codec:
        if precision == "fp8":
            swaps = fp8 if graph is None else {graph: fp8[graph]}
            return Codec(_Backend(model, swaps))
        if graph is None:
            return Codec(ort[precision])
        return Codec(Mixed(ort["fp32"], {graph: ort[precision]}))

    echo("measuring fp16 and INT8 (ONNX Runtime) on " + ", ".join(names) + " ...")
    onnx_rows = measure(codec_of, {"fp16": {g: ort["fp16"] for g in QUANTIZED_GRAPHS},
                                   "int8": {g: ort["int8"] for g in QUANTIZED_GRAPHS}}, Codec(ort["fp32"]), photos)
    echo("measuring FP8 (PyTorch fake quantization) ...")
    fp8_graphs = {g: _Backend(model, {g: fp8[g]}) for g in QUANTIZED_GRAPHS}
    torch_rows = measure(codec_of, {"fp8": fp8_graphs}, Codec(torch_fp32), photos)
    echo(f"timing fp32, fp16 and INT8 decode on ONNX Runtime ({runs} interleaved runs, chelsea) ...")
    times = timings({p: Codec(b) for p, b in ort.items()}, photos["chelsea.png"], runs)
    echo("where the time goes: ONNX Runtime's profiler, fp32 and INT8, per op type (chelsea) ...")
    rec = Recorder(ort["fp32"])
    Codec(rec).decompress(Codec(rec).compress(photos["chelsea.png"]))
    graphs = model.graphs()
    ops = {g: op_profile({p: d / ort[p].variants[g]["file"] for p in ("fp32", "int8")},
                         {name: x.numpy() for name, x in zip(graphs[g].inputs, rec.io[g][0])}, runs)
           for g in QUANTIZED_GRAPHS}
    tmp.cleanup()
    return {"model": "built-in (demo config)", "photos": list(names), "calibration": calibration,
            "calibration_note": "end_to_end: calibration's own measure, on its validation pictures (training photos "
                                "whole, which set no range)", "fp16_islands": islands,
            "quality": onnx_rows | torch_rows, "decode_ms": times, "ops_ms": ops,
            "backends": {"fp32": "onnxruntime CPU", "fp16": "onnxruntime CPU", "int8": "onnxruntime CPU (Q/DQ)",
                         "fp8": "PyTorch CPU, ModelOpt fake quantization"}}


def full_part(size: tuple[int, int], echo) -> dict:  # type: ignore[no-untyped-def]
    from osdiff.training.data import bundled_photo

    echo("full-size architecture, random weights: building ...")
    model = OSDiffModel.random(ModelConfig.full(), 0)
    images = load_calibration_images(None, min(size), 1)
    run = run_fp32(model, images)
    islands = summary(island_ranges(model, run))
    graphs = model.graphs()
    photos = {n: np.asarray(Image.fromarray(bundled_photo(n)).resize(size[::-1], Image.LANCZOS)) for n in PHOTOS}
    ref = Codec(_Backend(model, {}))
    out: dict = {}
    for precision in ("int8", "fp8"):
        recipe = Recipe.fp8() if precision == "fp8" else Recipe()
        t0 = time.perf_counter()
        q = {g: quantize(graphs[g].module, run.inputs[g], recipe) for g in QUANTIZED_GRAPHS}
        echo(f"  {precision}: quantized in {time.perf_counter() - t0:.0f} s")
        rows: dict = {"end_to_end": {}, "per_graph": {g: {} for g in QUANTIZED_GRAPHS}, "latent_error": {}}
        for name, pixels in photos.items():
            rec = Recorder(ref.backend)
            r = Codec(rec).decompress(Codec(rec).compress(pixels))
            c = Codec(_Backend(model, q))
            rows["end_to_end"][name] = quality([c.decompress(c.compress(pixels))], [r], [pixels])
            for g in QUANTIZED_GRAPHS:
                c = Codec(_Backend(model, {g: q[g]}))
                rows["per_graph"][g][name] = quality([c.decompress(c.compress(pixels))], [r], [pixels])
            rows["latent_error"][name] = latent_errors({g: _Backend(model, {g: q[g]}) for g in QUANTIZED_GRAPHS}, rec.io)
        out[precision] = rows
        del q
    return {"model": "full-size architecture, seeded random weights (numerics only)", "size": list(size),
            "fp16_islands": islands, "quality": out, "backends": {"int8": "PyTorch CPU, ModelOpt fake quantization",
                                         "fp8": "PyTorch CPU, ModelOpt fake quantization"}}


def op_profile(paths: dict[str, Path], feeds: dict[str, np.ndarray], runs: int) -> dict[str, dict[str, float]]:
    """Per precision (fp32, int8): ms per run spent in each ONNX Runtime op type (its profiler's
    kernel times, after graph optimization: QLinearConv, the Transposes of its NHWC layout,
    ReorderInput/Output of fp32's NCHWc one), mean of `runs` runs after one warm-up, the
    precisions interleaved run by run (this CPU is shared)."""
    import onnxruntime as ort

    from osdiff.runtime.backends.onnxruntime_int8 import inference_session

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        sessions = {}
        for precision, path in paths.items():
            options = ort.SessionOptions()
            options.intra_op_num_threads = torch.get_num_threads()
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            options.enable_profiling = True
            options.profile_file_prefix = str(Path(tmp) / precision)
            sessions[precision] = inference_session(path, options, ["CPUExecutionProvider"])
        for _ in range(runs + 1):
            for session in sessions.values():
                session.run(None, feeds)
        for precision, session in sessions.items():
            events = json.loads(Path(session.end_profiling()).read_text())
            warm_up = next(e for e in events if e.get("cat") == "Session" and e["name"] == "model_run")
            by_op: dict[str, float] = {}
            for e in events:
                if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] > warm_up["ts"] + warm_up["dur"]:
                    by_op[e["args"]["op_name"]] = by_op.get(e["args"]["op_name"], 0.0) + e["dur"] / 1000 / runs
            out[precision] = dict(sorted(by_op.items(), key=lambda kv: -kv[1]))
    return out


def speed_part(size: tuple[int, int], runs: int, echo, graphs: tuple[str, ...] = SPEED_GRAPHS) -> dict:  # type: ignore[no-untyped-def]
    """The full-size architecture (seeded random weights: timing only), graph by graph: the fp32
    ONNX export against the INT8 Q/DQ graph (ranges from ModelOpt on the graph's inputs from two
    calibration crops of 128 pixels, every layer quantized; written from the fp32 graph by
    calibration/qdq_export.py), ONNX Runtime CPU, medians of interleaved runs (`runs`, or more for
    10 s: `interleaved_ms`) on random normal inputs shaped for a `size` image, and where the time
    goes per op type (one profiled run each). The denoiser comes last: the PyTorch model is let go before its Q/DQ
    export, so that this 24 GB machine holds the quantized copy (4.8 GB), the export and the ONNX
    Runtime sessions one after another."""
    from osdiff.calibration.qdq_export import export_qdq
    from osdiff.export.model import graph_shapes
    from osdiff.export.onnx_export import export_onnx

    echo("speed, full-size architecture (random weights): building ...")
    model = OSDiffModel.random(ModelConfig.full(), 0)
    cfg = model.config
    inputs = run_fp32(model, load_calibration_images(None, 128, 1)[:2]).inputs
    order = sorted(graphs, key=lambda g: g == "denoiser")
    out: dict = {}
    for g in order:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            export_onnx(model, Path(tmp), fp16=False, only=[g])
            paths = {"fp32": Path(tmp) / "fp32" / f"{g}.onnx", "int8": Path(tmp) / "int8" / f"{g}.onnx"}
            spec = model.graphs()[g]
            q = quantize(spec.module, inputs[g], Recipe())
            names = spec.inputs
            del spec
            if g == order[-1]:
                del model, inputs  # nothing reads them any more: their memory goes before the Q/DQ export
            export_qdq(q, cfg, g, names, paths["fp32"], paths["int8"])
            del q
            echo(f"  {g}: exported fp32 and INT8 in {time.perf_counter() - t0:.0f} s; timing ...")
            shapes = graph_shapes(cfg, g, 1, *size)
            rng = np.random.default_rng(0)
            feeds = {i: rng.standard_normal(shapes[i]).astype(np.float32) for i in names}
            ms, done = interleaved_ms(paths, feeds, runs)
            out[g] = {"ms": ms, "speed_up": ms["fp32"] / ms["int8"], "runs": done, "ops_ms": op_profile(paths, feeds, 1)}
            echo(f"  {g}: fp32 {ms['fp32']:.0f} ms, INT8 {ms['int8']:.0f} ms ({out[g]['speed_up']:.2f}x)")
    return {"model": "full-size architecture, seeded random weights (timing only)", "size": list(size),
            "runs": f"at least {runs}, or more for 10 s (per graph: 'runs')", "graphs": out}


def interleaved_ms(paths: dict[str, Path], feeds: dict[str, np.ndarray], runs: int,
                   min_seconds: float = 10.0) -> tuple[dict[str, float], int]:
    """Per precision, the median ms of ONNX Runtime CPU runs after one warm-up, the precisions
    interleaved run by run (this CPU is shared): `runs` runs, or more until `min_seconds` have
    passed (a graph of a few ms gets hundreds: one noisy run moves a median of three). Returns the
    medians and the number of runs."""
    import onnxruntime as ort

    from osdiff.runtime.backends.onnxruntime_int8 import inference_session

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sessions = {p: inference_session(path, options, ["CPUExecutionProvider"]) for p, path in paths.items()}
    spans: dict[str, list[float]] = {p: [] for p in sessions}
    for session in sessions.values():  # warm-up
        session.run(None, feeds)
    start = time.perf_counter()
    done = 0
    while done < runs or time.perf_counter() - start < min_seconds:
        for p, session in sessions.items():
            t = time.perf_counter()
            session.run(None, feeds)
            spans[p].append((time.perf_counter() - t) * 1000)
        done += 1
    return {p: statistics.median(v) for p, v in spans.items()}, done


def ops_table(ops: dict[str, dict[str, float]], top: int = 8) -> str:
    names = sorted(set(ops["fp32"]) | set(ops["int8"]), key=lambda k: -max(ops["fp32"].get(k, 0), ops["int8"].get(k, 0)))
    lines = [f"  {'op type':<24}{'fp32 ms':>9}{'int8 ms':>9}"]
    lines += [f"  {k:<24}{ops['fp32'].get(k, 0):>9.1f}{ops['int8'].get(k, 0):>9.1f}" for k in names[:top]]
    lines.append(f"  {'(all)':<24}{sum(ops['fp32'].values()):>9.1f}{sum(ops['int8'].values()):>9.1f}")
    return "\n".join(lines)


def table(part: dict) -> str:
    lines = [f"{part['model']}: mean over {', '.join(part.get('photos', PHOTOS))}",
             f"{'precision':<10}{'graph':<14}{'PSNR vs fp32':>13}{'dPSNR orig':>11}{'MS-SSIM vs fp32':>16}"
             f"{'dMS-SSIM':>10}{'latent max':>11}{'latent mean':>12}"]
    for precision, rows in part["quality"].items():
        for g in ("end_to_end", *QUANTIZED_GRAPHS):
            q = mean_rows(rows["end_to_end"] if g == "end_to_end" else rows["per_graph"][g])
            lat = "" if g == "end_to_end" else (
                f"{np.mean([r[g]['max_abs'] for r in rows['latent_error'].values()]):>11.4f}"
                f"{np.mean([r[g]['mean_abs'] for r in rows['latent_error'].values()]):>12.5f}")
            lines.append(f"{precision:<10}{g:<14}{q['psnr_vs_fp32_db']:>13.2f}{-q['psnr_drop_db']:>+11.3f}"
                         f"{q.get('ms_ssim_vs_fp32', float('nan')):>16.4f}{-q.get('ms_ssim_drop', float('nan')):>+10.4f}{lat}")
    return "\n".join(lines)


def time_table(times: dict) -> str:
    stages = [s for s in ("vae_encoder", "synthesis", "denoiser", "vae_decoder") if s in times["fp32"]]
    lines = [f"{'stage':<14}" + "".join(f"{p + ' ms':>11}" for p in times) + f"{'int8 speed-up':>15}"]
    for s in stages:
        lines.append(f"{s:<14}" + "".join(f"{times[p][s]:>11.1f}" for p in times) + f"{times['fp32'][s] / times['int8'][s]:>14.2f}x")
    return "\n".join(lines)


@click.command()
@click.option("--runs", default=5, show_default=True, help="Timed decodes per precision (interleaved).")
@click.option("--export", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Reuse (or write) the built-in model's export here instead of a temporary folder.")
@click.option("--skip-full", is_flag=True, help="Without the full-size quality part.")
@click.option("--held-out", type=click.Choice(["trio", "all"]), default="trio", show_default=True,
              help="The built-in model's photos: chelsea, coffee and rocket, or the whole held-out set (twelve, "
                   "training/data.py HELD_OUT_SET; the wallpapers need `make photos`).")
@click.option("--full-size", default="128x192", show_default=True, help="HxW of the full-size part's images.")
@click.option("--skip-speed", is_flag=True, help="Without the full-size INT8 timing (ONNX Runtime, graph by graph).")
@click.option("--speed-graph", "speed_graphs", multiple=True, type=click.Choice(SPEED_GRAPHS),
              default=SPEED_GRAPHS, show_default=True, help="The full-size graphs timed (repeat the option).")
@click.option("--speed-size", default="256x384", show_default=True, help="HxW of the image the full-size timing's "
              "inputs are for.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=RESULTS, show_default=True)
def main(runs: int, export: Path | None, skip_full: bool, held_out: str, full_size: str, skip_speed: bool,
         speed_size: str, speed_graphs: tuple[str, ...], json_path: Path) -> None:
    echo = lambda s: click.echo(s, err=True)  # noqa: E731
    t0 = time.perf_counter()
    result: dict = {
        "command": "python benchmarks/precision.py " + " ".join(sys.argv[1:]),
        "cpu": {"model": cpu_model(), "flags": cpu_flags(), "cores": os.cpu_count(), "machine": platform.machine(),
                "load_before": os.getloadavg()},
        "torch": torch.__version__, "threads": torch.get_num_threads(), "targets": TARGETS,
    }
    import modelopt
    import onnxruntime

    result["onnxruntime"], result["modelopt"] = onnxruntime.__version__, modelopt.__version__
    from osdiff.training.data import HELD_OUT_SET

    result["builtin"] = builtin_part(runs, export, PHOTOS if held_out == "trio" else HELD_OUT_SET, echo)
    click.echo(table(result["builtin"]))
    click.echo(f"\ndecode stages on {result['cpu']['model']} ({', '.join(f for f, v in result['cpu']['flags'].items() if v)}):")
    click.echo(time_table(result["builtin"]["decode_ms"]))
    for g in ("denoiser", "vae_decoder"):
        click.echo(f"\n{g}, where the time goes (ONNX Runtime profiler, chelsea):\n" + ops_table(result["builtin"]["ops_ms"][g]))
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=1))
    if not skip_speed:
        h, w = (int(v) for v in speed_size.split("x"))
        result["full_speed"] = speed_part((h, w), runs, echo, speed_graphs)
        click.echo(f"\nfull-size architecture, INT8 against fp32 (ONNX Runtime CPU, inputs for {h}x{w}):")
        click.echo(f"{'graph':<14}{'fp32 ms':>10}{'int8 ms':>10}{'speed-up':>10}")
        for g, r in result["full_speed"]["graphs"].items():
            click.echo(f"{g:<14}{r['ms']['fp32']:>10.0f}{r['ms']['int8']:>10.0f}{r['speed_up']:>9.2f}x")
        json_path.write_text(json.dumps(result, indent=1))
    if not skip_full:
        h, w = (int(v) for v in full_size.split("x"))
        result["full_random"] = full_part((h, w), echo)
        click.echo("\n" + table(result["full_random"]))
    result["seconds"] = time.perf_counter() - t0
    result["cpu"]["load_after"] = os.getloadavg()
    json_path.write_text(json.dumps(result, indent=1))
    click.echo(f"\nwrote {json_path}")


if __name__ == "__main__":
    main()
