"""Commands that run the codec: compress, decompress, the demo, and per-stage profiling."""

from __future__ import annotations

import time
import warnings
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import numpy as np

from osdiff.cli.common import (HxW, RunProgress, backend_options, checkpoint_options, existing_file, info, load_model,
                               open_backend, open_codec, outputs_for, quiet_option, run_each, show_progress,
                               user_errors)
from osdiff.config import ModelConfig
from osdiff.files import ImageWarning, png_bytes, psnr, read_image, write_atomic
from osdiff.runtime.bitstream import OsdStream, tile_grid

if TYPE_CHECKING:
    from osdiff.runtime.backends.base import Backend
    from osdiff.runtime.profiling import Trace

@click.command()
@click.argument("images", nargs=-1, required=True, type=existing_file)
@click.option("-o", "--output", required=True, help="Output file (one image) or directory.")
@click.option("--seed", default=0, show_default=True, help="Diffusion noise seed stored in the stream.")
@click.option("--format", "fmt", type=click.Choice(["osd", "reference"]), default="osd", show_default=True,
              help="reference: the original implementation's raw stream (no size, seed or check value), coded with "
                   "the entropy tables the original derives on this CPU (docs/entropy-tables.md).")
@click.option("--tile", default="auto", show_default=True,
              help='VAE tiles for images too large for memory: "auto" (whole image when it fits, else the largest '
                   'tile that does), "off", or a tile side in pixels. The grid is stored in the stream.')
@quiet_option
@backend_options
@user_errors
def compress(images: tuple[str, ...], output: str, seed: int, fmt: str, tile: str, quiet: bool, **options: Any) -> None:
    """Compress images (PNG, JPEG, ...) to .osd streams."""
    if tile not in ("auto", "off") and not tile.isdigit():
        raise click.UsageError(f'--tile must be "auto", "off" or a number of pixels, got {tile!r}')
    tiles: int | str | None = None if tile == "off" else tile if tile == "auto" else int(tile)
    outputs = outputs_for(images, output, ".osd" if fmt == "osd" else ".bin")
    codec = open_codec(quiet=quiet, **options)

    def work(src: str, dst: Path, trace: "Trace") -> str:
        with warnings.catch_warnings(record=True) as notes:
            warnings.simplefilter("always", ImageWarning)
            image = read_image(src)
        for note in notes:
            click.echo(f"note: {note.message}", err=True)
        if fmt == "osd":
            data = codec.compress(image, seed=seed, trace=trace, tile=tiles)
        else:
            data = codec.compress_reference(image, trace=trace)
        write_atomic(dst, data)
        grid = tile_grid(OsdStream.from_bytes(data)) if fmt == "osd" else None
        if grid and tile == "auto":
            click.echo(f"note: {src}: the VAE ran in {grid[0]}-pixel tiles (overlap {grid[1]}): the whole image did not "
                       "fit in memory; the tiles are in the stream, and the picture differs slightly from an untiled "
                       "one", err=True)
        return f"{len(data)} bytes, {len(data) * 8 / (image.shape[0] * image.shape[1]):.4f} bpp"

    run_each(list(zip(images, outputs)), work, codec, quiet)


@click.command()
@click.argument("streams", nargs=-1, required=True, type=existing_file)
@click.option("-o", "--output", required=True, help="Output PNG (one stream) or directory.")
@click.option("--format", "fmt", type=click.Choice(["osd", "reference"]), default="osd", show_default=True,
              help="reference: a stream the original implementation wrote, read with the entropy tables it derives "
                   "on this CPU (docs/entropy-tables.md).")
@click.option("--size", type=HxW(), default=None,
              help="HxW of the image, for --format reference (which does not store it).")
@click.option("--seed", default=0, show_default=True, help="Noise seed for --format reference.")
@quiet_option
@backend_options
@user_errors
def decompress(streams: tuple[str, ...], output: str, fmt: str, size: tuple[int, int] | None, seed: int, quiet: bool,
               **options: Any) -> None:
    """Decompress .osd streams to PNG images."""
    if fmt == "reference":
        if size is None:
            raise click.UsageError("--format reference needs --size HxW")
        height, width = size
    outputs = outputs_for(streams, output, ".png")
    codec = open_codec(quiet=quiet, **options)

    def work(src: str, dst: Path, trace: "Trace") -> str:
        data = Path(src).read_bytes()
        if fmt == "osd":
            image = codec.decompress(data, trace=trace)
        else:
            image = codec.decompress_reference(data, height, width, seed=seed, trace=trace)
        write_atomic(dst, png_bytes(image))
        return f"{image.shape[0]}x{image.shape[1]} (HxW)"

    run_each(list(zip(streams, outputs)), work, codec, quiet)


@click.command()
@click.option("-o", "--output", default="osdiff-demo", show_default=True, type=click.Path(file_okay=False),
              help="Folder for the ONNX export, the stream and the decoded image.")
@click.option("--image", type=existing_file, default=None, help="Compress this image instead of the bundled photo.")
@click.option("--random-weights", is_flag=True, help="Seeded random weights instead of the built-in trained ones.")
@user_errors
def demo(output: str, image: str | None, random_weights: bool) -> None:
    """Run the codec through ONNX Runtime with the built-in demo model (small, trained by
    `osdiff train --builtin`): export it, compress a photo, decompress it, and write the input
    and the reconstruction side by side. Needs no checkpoint and no network."""
    from osdiff.export.model import OSDiffModel
    from osdiff.export.onnx_export import export_onnx
    from osdiff.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
    from osdiff.runtime.codec import Codec
    from osdiff.runtime.profiling import Trace, per_stage

    if random_weights:
        click.echo("osdiff demo --random-weights: the weights are RANDOM (seeded), so the decoded picture\n"
                   "is not a real reconstruction: it shows the pipeline running end to end.\n")
        model = OSDiffModel.random(ModelConfig.demo(), seed=0)
    else:
        from osdiff.builtin import load_builtin

        click.echo("osdiff demo: the built-in model, a small configuration of the OSDiff architecture\n"
                   "trained on a CPU with the paper's objective (far from the published model's quality).\n")
        model = load_builtin()
    t_start = time.perf_counter()
    out = Path(output)
    click.echo(f"exporting the model to {out / 'onnx'} ...")
    export_onnx(model, out / "onnx", fp16=False, progress=lambda s: click.echo("  " + s))
    codec = Codec(OnnxRuntimeBackend(out / "onnx"))
    if image is None:
        with resources.as_file(resources.files("osdiff") / "assets" / "demo.png") as bundled:
            pixels = read_image(bundled)
    else:
        pixels = read_image(image)
    codec.decompress(codec.compress(pixels))  # warm-up: sessions are created on first use
    enc, dec = Trace(), Trace()
    data = codec.compress(pixels, trace=enc)
    decoded = codec.decompress(data, trace=dec)
    write_atomic(out / "demo.osd", data)
    write_atomic(out / "input.png", png_bytes(pixels))
    write_atomic(out / "decoded.png", png_bytes(decoded))
    write_atomic(out / "side_by_side.png", png_bytes(np.concatenate([pixels, decoded], axis=1)))

    h, w = pixels.shape[:2]
    note = " (random weights)" if random_weights else ""
    click.echo(f"\nimage {h}x{w} (HxW): {len(data)} bytes, {len(data) * 8 / (h * w):.4f} bpp, "
               f"PSNR {psnr(pixels, decoded):.2f} dB against the input{note}")
    for title, trace in (("encode", enc), ("decode", dec)):
        stages = per_stage(trace.spans())
        click.echo(f"{title} ({sum(stages.values()):.0f} ms, onnxruntime CPU):")
        for name, ms in stages.items():
            click.echo(f"  {name:<28}{ms:9.1f} ms")
    click.echo(f"\nwrote {out / 'side_by_side.png'} (input | reconstruction), {out / 'demo.osd'}, "
               f"{out / 'input.png'}, {out / 'decoded.png'} and the ONNX export in {out / 'onnx'} "
               f"({time.perf_counter() - t_start:.0f} s in all)")



@click.command()
@click.option("--backend", type=click.Choice(["torch", "torch-cuda", "onnxruntime", "tensorrt"]), default="torch",
              show_default=True, help="torch-cuda: fp16 heavy stages, channels_last and CUDA graphs on the GPU.")
@click.option("--engines", type=click.Path(exists=True, file_okay=False), help="Export (onnxruntime) or engine (tensorrt) directory.")
@click.option("--provider", type=click.Choice(["cpu", "cuda", "tensorrt"]), default="cpu", show_default=True)
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default=None,
              help="Default: fp16 for torch-cuda, else fp32. int8: the calibrated graphs (onnxruntime).")
@click.option("--size", type=HxW(), default="512x768", show_default=True, help="HxW of the image.")
@click.option("--batch", default=1, show_default=True)
@click.option("--warmup", default=5, show_default=True)
@click.option("--runs", default=50, show_default=True)
@click.option("--image", type=existing_file, default=None, help="Image to resize to --size (default: the bundled one).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the results as JSON.")
@click.option("--trace", "trace_path", type=click.Path(dir_okay=False), help="Write the last run as a Chrome trace.")
@quiet_option
@checkpoint_options
@user_errors
def profile(backend: str, engines: str | None, provider: str, precision: str | None, size: tuple[int, int], batch: int,
            warmup: int, runs: int, image: str | None, json_path: str | None, trace_path: str | None, quiet: bool,
            **checkpoints: Any) -> None:
    """Per-stage latency (median, p90, min) and end-to-end encode/decode, bytes to pixels."""
    import json

    from PIL import Image

    from osdiff.runtime.codec import Codec
    from osdiff.runtime.profiler import profile as run_profile

    height, width = size
    if checkpoints["random_weights"] and checkpoints["config"] is None:
        checkpoints["config"] = "full"
    if backend == "torch-cuda":
        from osdiff.runtime.backends.torch_backend import TorchBackend

        half = (precision or "fp16") == "fp16"
        be: Backend = TorchBackend(load_model(quiet=quiet, **checkpoints), device="cuda", half=half, channels_last=half,
                                   cuda_graphs=True)
    else:
        be = open_backend(backend, engines, "cpu", precision or "fp32", provider, quiet=quiet, **checkpoints)
    if image is None:
        with resources.as_file(resources.files("osdiff") / "assets" / "demo.png") as bundled:
            pixels = read_image(bundled)
    else:
        pixels = read_image(image)
    pixels = np.asarray(Image.fromarray(pixels).resize((width, height), Image.BICUBIC))
    info(f"profiling {backend}: {warmup} warm-up and {runs} measured runs ...", quiet)
    shown = show_progress(quiet)
    progress = RunProgress(1 + warmup, runs, shown)  # the first compress warms up too
    try:
        # no stage callback inside the timed runs unless the bar is shown
        result = run_profile(Codec(be), [pixels] * batch, warmup=warmup, runs=runs, backend_name=backend,
                             on_stage=progress.stage if shown else None, on_run=progress.run_done)
    finally:
        progress.close()
    click.echo(result.table())
    if json_path:
        write_atomic(json_path, json.dumps(result.to_json(), indent=1).encode())
    if trace_path:
        write_atomic(trace_path, json.dumps(result.chrome_trace()).encode())


COMMANDS = [compress, decompress, demo, profile]
