"""The `osdiff` command line.

Every command turns the project's own error types (bad checkpoint, bad stream, bad export,
bad config, unreadable image) into a one-line message and exit code 1; a traceback means a
bug in osdiff.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import numpy as np

from osdiff.config import ConfigError, ModelConfig
from osdiff.engine.profiles import DEFAULT_PROFILE
from osdiff.export.checkpoint import CheckpointError
from osdiff.files import ImageError, png_bytes, psnr, read_image, write_atomic
from osdiff.runtime.coder import CODERS, StreamError, use_coder

if TYPE_CHECKING:
    from osdiff.export.model import OSDiffModel
    from osdiff.runtime.backends.base import Backend

# ImageError, ExportError and the TensorRT errors are ValueErrors too
USER_ERRORS: tuple[type[Exception], ...] = (CheckpointError, StreamError, ConfigError, ImageError, ValueError, OSError)


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as e:
            raise click.ClickException(str(e)) from e

    return wrapper


@click.group()
@click.version_option(package_name="osdiff-engine")
@click.option("--coder", type=click.Choice(CODERS), default=None,
              help="rANS coder: native (the default) or compressai (CompressAI's own, the reference; slower). "
                   "Streams do not depend on it.")
def main(coder: str | None) -> None:
    """osdiff-engine: the OSDiff one-step diffusion image codec."""
    if coder:
        use_coder(coder)


# ---------------------------------------------------------------------------------------------
# Choosing the model and the backend
# ---------------------------------------------------------------------------------------------

_file = click.Path(exists=True, dir_okay=False)


def checkpoint_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed([
        click.option("--sd", type=_file, help="SD 2.1 checkpoint (v2-1_512-ema-pruned.ckpt or .safetensors)."),
        click.option("--osdiff", "osdiff_ckpt", type=_file, help="OSDiff checkpoint (lambda_*.ckpt), or a combined file."),
        click.option("--config", default=None, help='Model config: "full" (default), "demo", or a JSON file.'),
        click.option("--random-weights", is_flag=True, help="Seeded random weights instead of checkpoints."),
        click.option("--weights-seed", default=0, show_default=True, help="Seed of --random-weights."),
    ]):
        fn = option(fn)
    return fn


def backend_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed([
        click.option("--backend", type=click.Choice(["torch", "onnxruntime", "tensorrt"]), default=None,
                     help="Default: onnxruntime with --engines, torch with checkpoints."),
        click.option("--engines", type=click.Path(exists=True, file_okay=False),
                     help="`osdiff export` directory (onnxruntime) or `osdiff build` directory (tensorrt)."),
        click.option("--device", default="cpu", show_default=True, help="torch device (cpu, cuda, cuda:1, ...)."),
        click.option("--precision", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True,
                     help="Precision of the heavy stages; entropy-model graphs always run fp32."),
        click.option("--provider", type=click.Choice(["cpu", "cuda", "tensorrt"]), default="cpu", show_default=True,
                     help="onnxruntime execution provider."),
    ]):
        fn = option(fn)
    return checkpoint_options(fn)


def load_model(sd: str | None, osdiff_ckpt: str | None, config: str | None, random_weights: bool,
               weights_seed: int = 0) -> "OSDiffModel":
    from osdiff.export.model import OSDiffModel

    cfg = ModelConfig.named(config)
    if random_weights:
        if sd or osdiff_ckpt:
            raise click.UsageError("--random-weights takes no checkpoints")
        click.echo(f"building the '{cfg.name}' model with random weights (seed {weights_seed}) ...", err=True)
        return OSDiffModel.random(cfg, weights_seed)
    if not (sd or osdiff_ckpt):
        raise click.UsageError("give --sd and --osdiff checkpoints (or --random-weights)")
    click.echo("loading checkpoints ...", err=True)
    return OSDiffModel.load(sd, osdiff_ckpt, cfg)


def open_backend(backend: str | None, engines: str | None, device: str, precision: str, provider: str,
                 **checkpoints: Any) -> "Backend":
    backend = backend or ("onnxruntime" if engines else "torch")
    if backend == "torch":
        from osdiff.runtime.backends.torch_backend import TorchBackend

        return TorchBackend(load_model(**checkpoints), device=device, half=precision == "fp16")
    if engines is None:
        raise click.UsageError(f"--backend {backend} needs --engines DIR")
    if backend == "onnxruntime":
        from osdiff.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend

        return OnnxRuntimeBackend(engines, precision=precision, provider=provider)
    from osdiff.runtime.backends.tensorrt_backend import TensorRTBackend

    return TensorRTBackend(engines)


def _outputs(inputs: tuple[str, ...], output: str, suffix: str) -> list[Path]:
    """One file for one input (unless OUT is a folder), else OUT/<stem><suffix> per input."""
    out = Path(output)
    if len(inputs) == 1 and not out.is_dir() and out.suffix:
        return [out]
    paths = [out / (Path(i).stem + suffix) for i in inputs]
    if len(set(paths)) != len(paths):
        raise click.UsageError("two inputs share a file name; they would overwrite each other's output")
    return paths


def _run_each(items: list[tuple[str, Path]], work: Callable[[str, Path], str]) -> None:
    """Run `work` per file, report each, go on after a bad file, exit 1 if any failed."""
    failed = 0
    for i, (src, dst) in enumerate(items, 1):
        t0 = time.perf_counter()
        try:
            note = work(src, dst)
        except USER_ERRORS as e:
            failed += 1
            click.echo(f"[{i}/{len(items)}] {src}: error: {e}", err=True)
            continue
        click.echo(f"[{i}/{len(items)}] {src} -> {dst}: {note}, {time.perf_counter() - t0:.2f} s")
    if failed:
        raise click.ClickException(f"{failed} of {len(items)} file(s) failed")


# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------


@main.command()
@checkpoint_options
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option("--fp16/--no-fp16", default=True, show_default=True, help="Also write fp16 variants of the heavy graphs.")
@click.option("--only", multiple=True, help="Export only these graphs (repeatable).")
@user_errors
def export(output: str, fp16: bool, only: tuple[str, ...], **checkpoints: Any) -> None:
    """Export every stage of a model to ONNX (fp32, and fp16 with fp32 islands)."""
    from osdiff.export.onnx_export import export_onnx

    model = load_model(**checkpoints)
    t0 = time.perf_counter()
    export_onnx(model, output, fp16=fp16, progress=click.echo, only=list(only) or None)
    click.echo(f"exported to {output} in {time.perf_counter() - t0:.0f} s")


@main.command()
@click.argument("images", nargs=-1, required=True, type=_file)
@click.option("-o", "--output", required=True, help="Output file (one image) or directory.")
@click.option("--seed", default=0, show_default=True, help="Diffusion noise seed stored in the stream.")
@click.option("--format", "fmt", type=click.Choice(["osd", "reference"]), default="osd", show_default=True,
              help="reference: the original implementation's raw stream (no size, seed or check value).")
@backend_options
@user_errors
def compress(images: tuple[str, ...], output: str, seed: int, fmt: str, **options: Any) -> None:
    """Compress images (PNG, JPEG, ...) to .osd streams."""
    from osdiff.runtime.codec import Codec

    codec = Codec(open_backend(**options))

    def work(src: str, dst: Path) -> str:
        image = read_image(src)
        data = codec.compress(image, seed=seed) if fmt == "osd" else codec.compress_reference(image)
        write_atomic(dst, data)
        return f"{len(data)} bytes, {len(data) * 8 / (image.shape[0] * image.shape[1]):.4f} bpp"

    _run_each(list(zip(images, _outputs(images, output, ".osd" if fmt == "osd" else ".bin"))), work)


@main.command()
@click.argument("streams", nargs=-1, required=True, type=_file)
@click.option("-o", "--output", required=True, help="Output PNG (one stream) or directory.")
@click.option("--format", "fmt", type=click.Choice(["osd", "reference"]), default="osd", show_default=True)
@click.option("--size", default=None, help="HxW of the image, for --format reference (which does not store it).")
@click.option("--seed", default=0, show_default=True, help="Noise seed for --format reference.")
@backend_options
@user_errors
def decompress(streams: tuple[str, ...], output: str, fmt: str, size: str | None, seed: int, **options: Any) -> None:
    """Decompress .osd streams to PNG images."""
    from osdiff.runtime.codec import Codec

    if fmt == "reference":
        if not size:
            raise click.UsageError("--format reference needs --size HxW")
        try:
            height, width = (int(v) for v in size.lower().split("x"))
        except ValueError:
            raise click.UsageError(f"--size must be HxW, got {size!r}") from None
    codec = Codec(open_backend(**options))

    def work(src: str, dst: Path) -> str:
        data = Path(src).read_bytes()
        if fmt == "osd":
            image = codec.decompress(data)
        else:
            image = codec.decompress_reference(data, height, width, seed=seed)
        write_atomic(dst, png_bytes(image))
        return f"{image.shape[0]}x{image.shape[1]}"

    _run_each(list(zip(streams, _outputs(streams, output, ".png"))), work)


@main.command()
@click.option("-o", "--output", default="osdiff-demo", show_default=True, type=click.Path(file_okay=False),
              help="Folder for the ONNX export, the stream and the decoded image.")
@click.option("--image", type=_file, default=None, help="Compress this image instead of the bundled one.")
@user_errors
def demo(output: str, image: str | None) -> None:
    """Build a small model with random weights, export it, and run the codec on an image
    through ONNX Runtime. Needs no checkpoint and no network."""
    from osdiff.export.model import OSDiffModel
    from osdiff.export.onnx_export import export_onnx
    from osdiff.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
    from osdiff.runtime.codec import Codec
    from osdiff.runtime.profiling import Trace, per_stage

    click.echo("osdiff demo: the weights are RANDOM (seeded), in a small configuration of the real\n"
               "architecture, so the decoded picture is not a real reconstruction: it shows the\n"
               "pipeline running end to end, not OSDiff's quality.\n")
    t_start = time.perf_counter()
    out = Path(output)
    model = OSDiffModel.random(ModelConfig.demo(), seed=0)
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

    h, w = pixels.shape[:2]
    click.echo(f"\nimage {w}x{h}: {len(data)} bytes, {len(data) * 8 / (h * w):.4f} bpp, "
               f"PSNR {psnr(pixels, decoded):.2f} dB against the input (random weights)")
    for title, trace in (("encode", enc), ("decode", dec)):
        stages = per_stage(trace.spans())
        click.echo(f"{title} ({sum(stages.values()):.0f} ms, onnxruntime CPU):")
        for name, ms in stages.items():
            click.echo(f"  {name:<28}{ms:9.1f} ms")
    click.echo(f"\nwrote {out / 'demo.osd'}, {out / 'input.png'}, {out / 'decoded.png'} and the ONNX export "
               f"in {out / 'onnx'} ({time.perf_counter() - t_start:.0f} s in all)")


@main.command()
@click.option("--backend", type=click.Choice(["torch", "torch-cuda", "onnxruntime", "tensorrt"]), default="torch",
              show_default=True, help="torch-cuda: fp16 heavy stages, channels_last and CUDA graphs on the GPU.")
@click.option("--engines", type=click.Path(exists=True, file_okay=False), help="Export (onnxruntime) or engine (tensorrt) directory.")
@click.option("--provider", type=click.Choice(["cpu", "cuda", "tensorrt"]), default="cpu", show_default=True)
@click.option("--precision", type=click.Choice(["fp32", "fp16"]), default=None, help="Default: fp16 for torch-cuda, else fp32.")
@click.option("--size", default="512x768", show_default=True, help="HxW of the image.")
@click.option("--batch", default=1, show_default=True)
@click.option("--warmup", default=5, show_default=True)
@click.option("--runs", default=50, show_default=True)
@click.option("--image", type=_file, default=None, help="Image to resize to --size (default: the bundled one).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the results as JSON.")
@click.option("--trace", "trace_path", type=click.Path(dir_okay=False), help="Write the last run as a Chrome trace.")
@checkpoint_options
@user_errors
def profile(backend: str, engines: str | None, provider: str, precision: str | None, size: str, batch: int,
            warmup: int, runs: int, image: str | None, json_path: str | None, trace_path: str | None,
            **checkpoints: Any) -> None:
    """Per-stage latency (median, p90, min) and end-to-end encode/decode, bytes to pixels."""
    import json

    from PIL import Image

    from osdiff.runtime.codec import Codec
    from osdiff.runtime.profiler import profile as run_profile

    try:
        height, width = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise click.UsageError(f"--size must be HxW, got {size!r}") from None
    if checkpoints["random_weights"] and checkpoints["config"] is None:
        checkpoints["config"] = "full"
    if backend == "torch-cuda":
        from osdiff.runtime.backends.torch_backend import TorchBackend

        half = (precision or "fp16") == "fp16"
        be: Backend = TorchBackend(load_model(**checkpoints), device="cuda", half=half, channels_last=half, cuda_graphs=True)
    else:
        be = open_backend(backend, engines, "cpu", precision or "fp32", provider, **checkpoints)
    if image is None:
        with resources.as_file(resources.files("osdiff") / "assets" / "demo.png") as bundled:
            pixels = read_image(bundled)
    else:
        pixels = read_image(image)
    pixels = np.asarray(Image.fromarray(pixels).resize((width, height), Image.BICUBIC))
    click.echo(f"profiling {backend}: {warmup} warm-up and {runs} measured runs ...", err=True)
    result = run_profile(Codec(be), [pixels] * batch, warmup=warmup, runs=runs, backend_name=backend)
    click.echo(result.table())
    if json_path:
        write_atomic(json_path, json.dumps(result.to_json(), indent=1).encode())
    if trace_path:
        write_atomic(trace_path, json.dumps(result.chrome_trace()).encode())


@main.command("verify-reference")
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@user_errors
def verify_reference(directory: str) -> None:
    """Check this install against a golden set of the original implementation (its checkpoints,
    config.json and golden tensors): every stage in fp32 on the CPU, fed the golden inputs.
    Prints one row per tensor; exits 1 if any check fails."""
    from osdiff.verify import format_table, verify_reference as run_checks

    checks = run_checks(directory)
    click.echo(format_table(checks))
    if not all(c.passed for c in checks):
        raise SystemExit(1)


@main.command()
@click.argument("onnx_dir", type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="Engine directory.")
@click.option("--profile", "profiles", multiple=True, default=[DEFAULT_PROFILE], show_default=True,
              metavar="MIN:OPT:MAX", help="Optimization profile over padded image sizes, each BATCHxHEIGHTxWIDTH "
                                          "(repeatable: one profile each).")
@click.option("--workspace", default=8192, show_default=True, type=click.IntRange(min=1),
              help="Builder workspace limit, MiB.")
@click.option("--opt-level", default=3, show_default=True, type=click.IntRange(0, 5),
              help="Builder optimization level (higher: longer builds, maybe faster engines).")
@user_errors
def build(onnx_dir: str, output: str, profiles: tuple[str, ...], workspace: int, opt_level: int) -> None:
    """Build a TensorRT engine per graph of an `osdiff export` directory (needs TensorRT and a GPU)."""
    from osdiff.engine.build import build_engines
    from osdiff.engine.profiles import ShapeProfile

    t0 = time.perf_counter()
    build_engines(onnx_dir, output, [ShapeProfile.parse(p) for p in profiles], workspace, opt_level, echo=click.echo)
    click.echo(f"built the engines in {output} in {time.perf_counter() - t0:.0f} s")


@main.command()
@click.argument("engine_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("onnx_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--size", default="1x512x768", show_default=True, metavar="BxHxW",
              help="Padded image size to compare at (batch x height x width).")
@click.option("--graph", "graphs", multiple=True, help="Compare only these graphs (repeatable).")
@click.option("--min-psnr", default=40.0, show_default=True, help="Least PSNR per output, dB.")
@click.option("--atol", default=1e-2, show_default=True, help="Mean absolute error allowed per output...")
@click.option("--rtol", default=1e-2, show_default=True, help="...unless the mean relative error is within this.")
@user_errors
def compare(engine_dir: str, onnx_dir: str, size: str, graphs: tuple[str, ...], min_psnr: float, atol: float,
            rtol: float) -> None:
    """Run the TensorRT engines against ONNX Runtime on the fp32 ONNX (Polygraphy's Comparator)."""
    from osdiff.engine.compare import compare as run_compare
    from osdiff.engine.profiles import ImageSize

    if not run_compare(engine_dir, onnx_dir, ImageSize.parse(size), list(graphs) or None, min_psnr, atol, rtol,
                       echo=click.echo):
        raise click.ClickException("some outputs differ beyond the tolerances")
    click.echo("all outputs within the tolerances")


if __name__ == "__main__":
    main()
