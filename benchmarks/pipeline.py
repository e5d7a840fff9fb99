"""The whole codec, backends side by side in one process on the same image.

Every backend encodes and decodes the same image with the same model; each is timed end to end
(pixels to bytes, bytes to pixels, synchronized) and per stage by runtime/profiler.py. The
baseline every speedup is measured against is, with --original, the ORIGINAL implementation
itself, imported at run time from that checkout with our weights (benchmarks/original.py);
without it, the re-created reference-style path: our stages in fp32 eager PyTorch with the
reference implementation's entropy loop (padded CDF lists, 63-pass index building, per-round
list conversions; see benchmarks/entropy.py), labelled as such.

    python benchmarks/pipeline.py                                  # full size, 512x768, CPU backends
    python benchmarks/pipeline.py --config demo --size 256x384     # quick look on a CPU
    python benchmarks/pipeline.py --original .gpu-kit/OSDiff       # against the original code itself
    python benchmarks/pipeline.py --onnx DIR --engines DIR         # add exported / built models
    python benchmarks/pipeline.py --backends onnxruntime --attention scan,mha   # attention forms side by side

On a GPU machine use benchmarks/gpu_check.sh, which times every CUDA variant.

Prints a table with ratios to the baseline (the first row), writes JSON (--json) and a PNG bar
chart of the per-stage breakdown (--chart). Random weights unless --sd/--osdiff are given.
--attention exports the model once per attention form (export/models/attention.py; "scan" is
the form every graph had before ONNX Runtime's MultiHeadAttention) and runs ONNX Runtime on each,
recording each graph's export time.
"""

from __future__ import annotations

import atexit
import json
import shutil
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).parent))
from entropy import NaiveGaussian, Rounds, cpu_flags, cpu_model, naive_compress_y, naive_decompress_y  # noqa: E402

from osdiff.config import ModelConfig  # noqa: E402
from osdiff.export.model import OSDiffModel  # noqa: E402
from osdiff.files import read_image  # noqa: E402
from osdiff.runtime.backends.torch_backend import TorchBackend  # noqa: E402
from osdiff.runtime.bitstream import MAGIC, OsdStream, read_reference, write_reference  # noqa: E402
from osdiff.runtime.codec import REFERENCE_PADDING, Codec, image_to_tensor, tensor_to_image  # noqa: E402
from osdiff.runtime.profiler import Profile, Stats, profile  # noqa: E402
from osdiff.runtime.profiling import NO_TRACE, Trace, stage_of  # noqa: E402

RESULTS = Path(__file__).parent / "results"


class ReferenceStyleCodec(Codec):
    """Our stages in fp32 eager PyTorch, with the reference's entropy loop and its raw stream
    format (no check value: the reference computes none), so it does the reference's work and
    nothing more. That format does not store the image size; the size of the last compressed
    image is remembered for decompress_batch."""

    size = (0, 0)

    def compress_batch(self, images: list[np.ndarray], seeds: list[int] | None = None, trace: Trace = NO_TRACE,
                       tile: int | str | None = None, padding: str = REFERENCE_PADDING) -> list[bytes]:
        # whole, zero-padded images only, as the reference codes them: `tile` and `padding` are
        # accepted for Codec.compress
        if padding != REFERENCE_PADDING:
            raise ValueError(f"the reference style pads with zeros, not {padding!r}")
        self.size = images[0].shape[:2]
        out = []
        for image in images:
            x = image_to_tensor(image)
            hp, wp = self.padded_size(*x.shape[2:])
            x = torch.nn.functional.pad(x, (0, wp - x.shape[3], 0, hp - x.shape[2]))
            with trace("vae_encoder"):
                (y0,) = self.backend.run("vae_encoder", x)
            with trace("analysis"):
                y, z = self.backend.run("analysis", y0)
            with trace("z_coding"):
                z_string, z_hat, _ = self.models.entropy_bottleneck.compress(z)
            with trace("hyper_synthesis"):
                (hyper,) = self.backend.run("hyper_synthesis", z_hat)
            y_string = naive_compress_y(Rounds(self.backend, self.cfg, hyper), NaiveGaussian(self.models.gaussian), y, trace)
            out.append(write_reference((z.shape[2], z.shape[3]), y_string, z_string))
        return out

    def decompress_batch(self, datas: list[bytes], trace: Trace = NO_TRACE) -> list[np.ndarray]:
        out = []
        for data in datas:
            z_shape, y_string, z_string = read_reference(data)
            with trace("z_coding"):
                z_hat, _ = self.models.entropy_bottleneck.decompress(z_string, z_shape)
            with trace("hyper_synthesis"):
                (hyper,) = self.backend.run("hyper_synthesis", z_hat)
            rounds = Rounds(self.backend, self.cfg, hyper)
            y_hat, _ = naive_decompress_y(rounds, NaiveGaussian(self.models.gaussian), y_string, trace)
            out.append(tensor_to_image(self.decode_image(y_hat, 0, self.size, trace)))
        return out


class ExportTimes:
    """export_onnx's progress callback, keeping the seconds each graph took ("[i/n] name fp32: 12.3 s, ...")."""

    def __init__(self, into: dict[str, float]) -> None:
        self.into = into

    def __call__(self, line: str) -> None:
        print("  " + line, file=sys.stderr)
        name, seconds = line.split("] ", 1)[1].split(": ", 1)
        self.into[name.rsplit(" ", 1)[0]] = float(seconds.split(" s", 1)[0])


def merged(profiles: list[Profile]) -> Profile:
    """Profiles of one timed round trip each, as one profile of all of them."""
    def stages(which: str) -> dict[str, Stats]:
        names = getattr(profiles[0], which)
        return {n: Stats.of([getattr(p, which)[n].median for p in profiles if n in getattr(p, which)]) for n in names}

    return replace(profiles[-1], runs=len(profiles), encode=Stats.of([p.encode.median for p in profiles]),
                   decode=Stats.of([p.decode.median for p in profiles]), encode_stages=stages("encode_stages"),
                   decode_stages=stages("decode_stages"))


def strings(data: bytes) -> tuple[bytes, bytes]:
    """(y, z) strings of an .osd or a reference-format stream."""
    if data[:2] == MAGIC:
        s = OsdStream.from_bytes(data)
        return s.y_string, s.z_string
    _, y, z = read_reference(data)
    return y, z


def stages(p: Profile, which: str) -> dict[str, float]:
    """Median ms per stage bucket (the twenty entropy rounds summed into network/index/coder)."""
    out: dict[str, float] = {}
    for name, s in (p.encode_stages if which == "encode" else p.decode_stages).items():
        key = stage_of(name)
        out[key] = out.get(key, 0.0) + s.median
    return out


COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
          (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (57, 59, 121), (99, 121, 57),
          (140, 109, 49), (132, 60, 57), (123, 65, 115), (0, 0, 0)]


def chart(per: dict[str, dict[str, float]], title: str) -> Image.Image:
    """Horizontal stacked bars, one per row name, segments per stage in ms (Pillow: no plotting
    dependency)."""
    per = {name: s for name, s in per.items() if s}
    keys = list(dict.fromkeys(k for s in per.values() for k in s))
    color = {k: COLORS[i % len(COLORS)] for i, k in enumerate(keys)}
    longest = max([sum(s.values()) for s in per.values()] + [1e-9])
    w, left, bar_h, gap = 1100, 260, 34, 18
    h = 70 + len(per) * (bar_h + gap) + 24 * ((len(keys) + 3) // 4) + 20
    im = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(im)
    d.text((10, 10), title, fill="black")
    scale = (w - left - 80) / longest
    y = 40
    for name, s in per.items():
        d.text((10, y + 10), name, fill="black")
        x = left
        for k, ms in s.items():
            d.rectangle([x, y, x + max(1, ms * scale), y + bar_h], fill=color[k])
            x += ms * scale
        d.text((x + 6, y + 10), f"{sum(s.values()):.1f} ms", fill="black")
        y += bar_h + gap
    for i, k in enumerate(keys):
        lx, ly = 10 + (i % 4) * 270, y + 24 * (i // 4)
        d.rectangle([lx, ly, lx + 14, ly + 14], fill=color[k])
        d.text((lx + 20, ly + 2), k, fill="black")
    return im


@click.command()
@click.option("--config", default="full", show_default=True, help='"full", "demo" or a JSON config.')
@click.option("--sd", default=None, help="SD 2.1 checkpoint (default: random weights).")
@click.option("--osdiff", "osdiff_ckpt", default=None, help="OSDiff checkpoint.")
@click.option("--size", default="512x768", show_default=True)
@click.option("--warmup", default=1, show_default=True)
@click.option("--runs", default=3, show_default=True)
@click.option("--onnx", "onnx_dir", default=None, help="An `osdiff export` directory (else exported to a temp dir).")
@click.option("--engines", default=None, help="An `osdiff build` directory: adds the TensorRT backend.")
@click.option("--original", "checkout", default=None, type=click.Path(exists=True, file_okay=False),
              help="A checkout of cheesejiang/OSDiff: the baseline is then the original implementation (on the CPU).")
@click.option("--backends", default="baseline,torch,onnxruntime", show_default=True,
              help="Which rows to run: baseline (the original or reference-style), torch, onnxruntime.")
@click.option("--attention", "forms", default="mha", show_default=True,
              help="Attention forms of the exported graphs (comma-separated), one ONNX Runtime row each.")
@click.option("--json", "json_path", default=None, help="Default: benchmarks/results/pipeline_<device>_<config>.json")
@click.option("--chart", "chart_path", default=None, help="Default: the JSON path with .png")
def main(config: str, sd: str | None, osdiff_ckpt: str | None, size: str, warmup: int, runs: int,
         onnx_dir: str | None, engines: str | None, checkout: str | None, backends: str, forms: str,
         json_path: str | None, chart_path: str | None) -> None:
    rows = backends.split(",")
    height, width = (int(v) for v in size.lower().split("x"))
    cfg = ModelConfig.named(config)
    load = lambda: OSDiffModel.load(sd, osdiff_ckpt, cfg) if (sd or osdiff_ckpt) else OSDiffModel.random(cfg, 0)  # noqa: E731
    model = load()
    demo = Path(__file__).resolve().parents[1] / "osdiff" / "assets" / "demo.png"
    image = np.asarray(Image.fromarray(read_image(demo)).resize((width, height), Image.BICUBIC))

    exports: dict[str, str] = {}  # attention form -> export directory
    export_s: dict[str, dict[str, float]] = {}  # attention form -> graph -> seconds
    if "onnxruntime" in rows:  # before the original is imported: its stand-ins must not meet the exporter
        if onnx_dir is not None:
            exports["given"] = onnx_dir
        else:
            from osdiff.export.onnx_export import export_onnx

            for form in forms.split(","):
                exports[form] = tempfile.mkdtemp(prefix=f"osdiff-bench-{form}-")
                atexit.register(shutil.rmtree, exports[form], ignore_errors=True)  # gigabytes at full size
                print(f"exporting with attention {form} to {exports[form]} ...", file=sys.stderr)
                export_s[form] = {}
                timed = ExportTimes(export_s[form])
                export_onnx(model, exports[form], fp16=False, attention=form, progress=timed)

    codecs: dict[str, Any] = {}
    baseline = ""
    if "baseline" in rows:
        if checkout:
            import original

            baseline = "original (fp32 eager, its inference.py)"
            codecs[baseline] = original.OriginalCodec(checkout, original.build(checkout, cfg, "cpu", weights=model))
        else:
            baseline = "reference-style (re-created, fp32 eager)"
            codecs[baseline] = ReferenceStyleCodec(TorchBackend(model))
    cuda = torch.cuda.is_available()
    if "torch" in rows:
        codecs["torch fp32"] = Codec(TorchBackend(model))
        if cuda:  # a backend moves and casts its model in place: each device and precision gets its own
            codecs["torch cuda fp32"] = Codec(TorchBackend(load(), device="cuda"))
            codecs["torch cuda fp16 + graphs"] = Codec(TorchBackend(load(), device="cuda", half=True,
                                                                    channels_last=True, cuda_graphs=True))
    from osdiff.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend

    for form, directory in exports.items():
        label = "onnxruntime cpu fp32" + ("" if form == "given" else f" (attention {form})")
        codecs[label] = Codec(OnnxRuntimeBackend(directory))
    if engines:
        from osdiff.runtime.backends.tensorrt_backend import TensorRTBackend

        codecs["tensorrt"] = Codec(TensorRTBackend(engines))

    results: dict[str, Profile] = {}
    streams: dict[str, bytes] = {}
    # round robin: each round times one round trip of every backend, so that a load that comes
    # and goes on a shared machine falls on all of them alike, not on whichever ran at the time
    rounds: dict[str, list[Profile]] = {name: [] for name in codecs}
    for r in range(runs):
        for name, codec in codecs.items():
            print(f"{name}: round {r + 1} of {runs} ...", file=sys.stderr)
            rounds[name].append(profile(codec, [image], warmup=warmup if r == 0 else 0, runs=1, backend_name=name))
    for name, codec in codecs.items():
        results[name] = merged(rounds[name])
        streams[name] = codec.compress(image, padding=REFERENCE_PADDING)  # the baseline's zero padding
    baseline = baseline or next(iter(results))
    reference = strings(streams[baseline])
    base = results[baseline]

    device = torch.cuda.get_device_name(0) if cuda else cpu_model()
    lines = [f"{cfg.name} model, {height}x{width}, {runs} runs after {warmup} warm-up; {device}",
             f"{'backend':<42}{'encode ms':>11}{'decode ms':>11}{'encode x':>10}{'decode x':>10}  same y/z strings as baseline"]
    for name, p in results.items():
        lines.append(f"{name:<42}{p.encode.median:>11.1f}{p.decode.median:>11.1f}"
                     f"{base.encode.median / p.encode.median:>10.2f}{base.decode.median / p.decode.median:>10.2f}"
                     f"  {strings(streams[name]) == reference}")
    lines.append(f"x: speedup over the baseline, {baseline}, measured in this run (median end to end, synchronized)")
    for form, times in export_s.items():
        lines.append(f"export (attention {form}): " + ", ".join(f"{g} {t:.1f} s" for g, t in times.items()
                                                                 if g in ("denoiser", "vae_decoder", "vae_encoder"))
                     + f", all graphs {sum(times.values()):.0f} s")
    print("\n".join(lines))
    for name, p in results.items():
        print(f"\n{name}, decode stages (median ms): " + ", ".join(f"{k} {v:.1f}" for k, v in stages(p, "decode").items()))

    tag = ("cuda" if cuda else "cpu") + "_" + cfg.name
    out = Path(json_path) if json_path else RESULTS / f"pipeline_{tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "command": " ".join(sys.argv), "device": device, "cpu_flags": cpu_flags(), "torch": torch.__version__,
        "config": cfg.name, "height": height, "width": width, "runs": runs, "export_s": export_s,
        "results": {name: p.to_json() for name, p in results.items()},
        "baseline": baseline,
        "speedup_over_baseline": {name: {"encode": base.encode.median / p.encode.median,
                                         "decode": base.decode.median / p.decode.median} for name, p in results.items()},
    }, indent=1))
    png = Path(chart_path) if chart_path else out.with_suffix(".png")
    chart({name: stages(p, "decode") for name, p in results.items()},
          "decode: median ms per stage (one image; lower is better)").save(png)
    print(f"\nwrote {out} and {png}")


if __name__ == "__main__":
    main()
