"""The `osdiff` command line.

Every command turns the project's own error types (bad checkpoint, bad stream, bad export,
bad config, unreadable image) into a one-line message and exit code 1; a traceback means a
bug in osdiff.
"""

from __future__ import annotations

import functools
import time
import warnings
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import numpy as np

from osdiff.config import ConfigError, ModelConfig
from osdiff.engine.profiles import DEFAULT_PROFILE
from osdiff.export.checkpoint import CheckpointError, CheckpointWarning
from osdiff.files import ImageError, ImageWarning, png_bytes, psnr, read_image, write_atomic
from osdiff.runtime.bitstream import OsdStream, tile_grid
from osdiff.runtime.coder import CODERS, StreamError, use_coder

if TYPE_CHECKING:
    from osdiff.export.model import OSDiffModel
    from osdiff.runtime.backends.base import Backend
    from osdiff.runtime.codec import Codec

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


class HxW(click.ParamType):
    """An image size written height x width ("512x768"), as every size this CLI prints."""

    name = "HxW"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[int, int]:
        if isinstance(value, tuple):
            return value
        try:
            height, width = (int(v) for v in str(value).lower().split("x"))
        except ValueError:
            self.fail(f"must be HxW (e.g. 512x768), got {value!r}", param, ctx)
        if height <= 0 or width <= 0:
            self.fail(f"height and width must be positive, got {value!r}", param, ctx)
        return height, width


def checkpoint_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed([
        click.option("--sd", type=_file, help="SD 2.1 checkpoint (v2-1_512-ema-pruned.ckpt or .safetensors)."),
        click.option("--osdiff", "osdiff_ckpt", type=_file, help="OSDiff checkpoint (lambda_*.ckpt), or a combined file."),
        click.option("--config", default=None, help='Model config: "full" (default), "demo" (without checkpoints: the '
                                                    'built-in trained weights), or a JSON file.'),
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
        click.option("--max-memory", default=None, metavar="SIZE",
                     help="Memory a run may take in all (e.g. 6G); default: what the machine has free. A run "
                          "that would need more is refused before it starts."),
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
        if config == "demo":
            from osdiff.builtin import load_builtin

            click.echo("loading the built-in demo model ...", err=True)
            return load_builtin()
        raise click.UsageError("give --sd and --osdiff checkpoints (or --config demo, or --random-weights)")
    click.echo("loading checkpoints ...", err=True)
    with warnings.catch_warnings(record=True) as notes:
        warnings.simplefilter("always", CheckpointWarning)
        model = OSDiffModel.load(sd, osdiff_ckpt, cfg)
    for note in notes:
        if issubclass(note.category, CheckpointWarning):
            click.echo(f"note: {note.message}", err=True)
        else:
            warnings.showwarning(note.message, note.category, note.filename, note.lineno)
    return model


def open_codec(max_memory: str | None, **options: Any) -> "Codec":
    from osdiff.runtime.codec import Codec
    from osdiff.runtime.memory import parse_size

    limit = parse_size(max_memory) if max_memory else None
    return Codec(open_backend(**options), max_memory=limit)


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
            # library errors name their file for callers without this prefix: not twice here
            message = str(e).removeprefix(f"{src}: ")
            click.echo(f"[{i}/{len(items)}] {src}: error: {message}", err=True)
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
              help="reference: the original implementation's raw stream (no size, seed or check value), coded with "
                   "the entropy tables the original derives on this CPU (docs/entropy-tables.md).")
@click.option("--tile", default="auto", show_default=True,
              help='VAE tiles for images too large for memory: "auto" (whole image when it fits, else the largest '
                   'tile that does), "off", or a tile side in pixels. The grid is stored in the stream.')
@backend_options
@user_errors
def compress(images: tuple[str, ...], output: str, seed: int, fmt: str, tile: str, **options: Any) -> None:
    """Compress images (PNG, JPEG, ...) to .osd streams."""
    if tile not in ("auto", "off") and not tile.isdigit():
        raise click.UsageError(f'--tile must be "auto", "off" or a number of pixels, got {tile!r}')
    tiles: int | str | None = None if tile == "off" else tile if tile == "auto" else int(tile)
    codec = open_codec(**options)

    def work(src: str, dst: Path) -> str:
        with warnings.catch_warnings(record=True) as notes:
            warnings.simplefilter("always", ImageWarning)
            image = read_image(src)
        for note in notes:
            click.echo(f"note: {note.message}", err=True)
        data = codec.compress(image, seed=seed, tile=tiles) if fmt == "osd" else codec.compress_reference(image)
        write_atomic(dst, data)
        grid = tile_grid(OsdStream.from_bytes(data)) if fmt == "osd" else None
        if grid and tile == "auto":
            click.echo(f"note: {src}: the VAE ran in {grid[0]}-pixel tiles (overlap {grid[1]}): the whole image did not "
                       "fit in memory; the tiles are in the stream, and the picture differs slightly from an untiled "
                       "one", err=True)
        return f"{len(data)} bytes, {len(data) * 8 / (image.shape[0] * image.shape[1]):.4f} bpp"

    _run_each(list(zip(images, _outputs(images, output, ".osd" if fmt == "osd" else ".bin"))), work)


@main.command()
@click.argument("streams", nargs=-1, required=True, type=_file)
@click.option("-o", "--output", required=True, help="Output PNG (one stream) or directory.")
@click.option("--format", "fmt", type=click.Choice(["osd", "reference"]), default="osd", show_default=True,
              help="reference: a stream the original implementation wrote, read with the entropy tables it derives "
                   "on this CPU (docs/entropy-tables.md).")
@click.option("--size", type=HxW(), default=None,
              help="HxW of the image, for --format reference (which does not store it).")
@click.option("--seed", default=0, show_default=True, help="Noise seed for --format reference.")
@backend_options
@user_errors
def decompress(streams: tuple[str, ...], output: str, fmt: str, size: tuple[int, int] | None, seed: int,
               **options: Any) -> None:
    """Decompress .osd streams to PNG images."""
    if fmt == "reference":
        if size is None:
            raise click.UsageError("--format reference needs --size HxW")
        height, width = size
    codec = open_codec(**options)

    def work(src: str, dst: Path) -> str:
        data = Path(src).read_bytes()
        if fmt == "osd":
            image = codec.decompress(data)
        else:
            image = codec.decompress_reference(data, height, width, seed=seed)
        write_atomic(dst, png_bytes(image))
        return f"{image.shape[0]}x{image.shape[1]} (HxW)"

    _run_each(list(zip(streams, _outputs(streams, output, ".png"))), work)


@main.command()
@click.option("-o", "--output", default="osdiff-demo", show_default=True, type=click.Path(file_okay=False),
              help="Folder for the ONNX export, the stream and the decoded image.")
@click.option("--image", type=_file, default=None, help="Compress this image instead of the bundled photo.")
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


@main.command()
@click.option("-o", "--output", required=True, type=click.Path(),
              help="The training checkpoint to write (with --builtin: a folder for every stage's output).")
@click.option("--builtin", is_flag=True, help="Reproduce the built-in demo model from its fixed recipe and seed "
                                              "(training/builtin.py; photographs scikit-image and matplotlib ship).")
@click.option("--images", type=click.Path(exists=True, file_okay=False), help="Folder of training images.")
@click.option("--resume", type=_file, help="Continue from a checkpoint that `osdiff train` wrote.")
@click.option("--sd", type=_file, help="SD 2.1 checkpoint to start from (the OSDiff parts start untrained).")
@click.option("--osdiff", "osdiff_ckpt", type=_file, help="OSDiff checkpoint to start from (with --sd, or combined).")
@click.option("--config", default=None, help='Model config: "full" (default), "demo", or a JSON file.')
@click.option("--steps", default=100_000, show_default=True, help="Train until this global step.")
@click.option("--batch", default=4, show_default=True)
@click.option("--crop", default=512, show_default=True, help="Side of the random training crops, pixels.")
@click.option("--lambda", "rate_weight", default=1.0, show_default=True, help="Weight of the rate (the paper: 1 or 2).")
@click.option("--lr", default=1e-4, show_default=True, help="AdamW learning rate (generator and discriminator).")
@click.option("--seed", default=0, show_default=True)
@click.option("--device", default="cpu", show_default=True, help="torch device (cpu, cuda, ...).")
@click.option("--checkpoint-every", default=1000, show_default=True, help="Steps between checkpoints.")
@click.option("--threads", default=None, type=int, help="torch CPU threads (default: torch's choice).")
@click.option("--results", default=None, type=click.Path(file_okay=False),
              help="With --builtin: also copy the evaluation and loss curves here (e.g. benchmarks/results).")
@user_errors
def train(output: str, builtin: bool, images: str | None, resume: str | None, sd: str | None, osdiff_ckpt: str | None,
          config: str | None, steps: int, batch: int, crop: int, rate_weight: float, lr: float, seed: int, device: str,
          checkpoint_every: int, threads: int | None, results: str | None) -> None:
    """Train with the OSDiff objective (paper eqs. 9-14): the LFGCM, the control module and the
    latent discriminator, the SD VAE and UNet frozen. Writes checkpoints that `osdiff export
    --osdiff` reads unchanged, and resumes from them."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    if builtin:
        from osdiff.training.builtin import report_builtin, train_builtin

        train_builtin(output, log=click.echo)
        report_builtin(output, results, log=click.echo)
        return

    from osdiff.export.checkpoint import read_checkpoints, read_state_dict
    from osdiff.training.data import RandomCrops, folder_images
    from osdiff.training.loop import Trainer, TrainSettings
    from osdiff.training.objective import OSDiffTraining

    if images is None:
        raise click.UsageError("give --images FOLDER (or --builtin)")
    settings = TrainSettings(steps=steps, rate_weight=rate_weight, lr=lr, d_lr=lr, seed=seed)
    if resume:
        if sd or osdiff_ckpt:
            raise click.UsageError("--resume takes no other checkpoint")
        trainer = Trainer.resume(resume, device, settings)
        click.echo(f"resuming at step {trainer.global_step}")
    else:
        model = OSDiffTraining(ModelConfig.named(config))
        if osdiff_ckpt:
            model.load_checkpoint_state_dict(read_checkpoints(sd, osdiff_ckpt))
        elif sd:
            model.load_sd(read_state_dict(sd))
        else:
            raise click.UsageError("give --sd (and --osdiff), or --resume")
        trainer = Trainer(model, settings, device)
    batches = RandomCrops(folder_images(images), crop, batch, seed)
    for _ in range(trainer.global_step):  # the batches an uninterrupted run would see next
        next(batches)
    trainer.train(batches, steps, log=click.echo, checkpoint=Path(output), checkpoint_every=checkpoint_every)
    click.echo(f"wrote {output} at step {trainer.global_step}")


@main.command()
@click.option("--backend", type=click.Choice(["torch", "torch-cuda", "onnxruntime", "tensorrt"]), default="torch",
              show_default=True, help="torch-cuda: fp16 heavy stages, channels_last and CUDA graphs on the GPU.")
@click.option("--engines", type=click.Path(exists=True, file_okay=False), help="Export (onnxruntime) or engine (tensorrt) directory.")
@click.option("--provider", type=click.Choice(["cpu", "cuda", "tensorrt"]), default="cpu", show_default=True)
@click.option("--precision", type=click.Choice(["fp32", "fp16"]), default=None, help="Default: fp16 for torch-cuda, else fp32.")
@click.option("--size", type=HxW(), default="512x768", show_default=True, help="HxW of the image.")
@click.option("--batch", default=1, show_default=True)
@click.option("--warmup", default=5, show_default=True)
@click.option("--runs", default=50, show_default=True)
@click.option("--image", type=_file, default=None, help="Image to resize to --size (default: the bundled one).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the results as JSON.")
@click.option("--trace", "trace_path", type=click.Path(dir_okay=False), help="Write the last run as a Chrome trace.")
@checkpoint_options
@user_errors
def profile(backend: str, engines: str | None, provider: str, precision: str | None, size: tuple[int, int], batch: int,
            warmup: int, runs: int, image: str | None, json_path: str | None, trace_path: str | None,
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


@main.command()
@click.option("--http-port", default=8000, show_default=True)
@click.option("--grpc-port", default=8001, show_default=True)
@click.option("--metrics-port", default=8002, show_default=True, help="Prometheus metrics at /metrics.")
@click.option("--instances", default=1, show_default=True, type=click.IntRange(min=1),
              help="Model instances per device, each with its own backend (and copy of the model).")
@click.option("--max-batch", default=0, show_default=True, type=click.IntRange(min=0),
              help="Dynamic batcher's largest batch; 0: no batching (and no batch dimension).")
@click.option("--queue-delay-us", default=0, show_default=True, type=click.IntRange(min=0),
              help="How long the dynamic batcher waits to fill a batch, microseconds.")
@backend_options
@user_errors
def serve(http_port: int, grpc_port: int, metrics_port: int, instances: int, max_batch: int, queue_delay_us: int,
          device: str, **options: Any) -> None:
    """Serve osdiff_compress and osdiff_decompress on Triton Inference Server (PyTriton; needs the
    serve extra). --device takes a comma-separated list for the torch backend: --instances per device."""
    from osdiff.serving.server import ServeError, ServeOptions, serve_forever, start

    devices = device.split(",")
    if len(devices) > 1 and (options["backend"] or ("onnxruntime" if options["engines"] else "torch")) != "torch":
        raise click.UsageError("several --device values need --backend torch")
    codecs = [open_codec(device=d, **options) for d in devices for _ in range(instances)]
    try:
        triton = start(codecs, ServeOptions(http_port, grpc_port, metrics_port, max_batch, queue_delay_us))
    except ServeError as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"serving {len(codecs)} instance(s) of osdiff_compress and osdiff_decompress: HTTP :{http_port}, "
               f"gRPC :{grpc_port}, metrics :{metrics_port}/metrics; health /v2/health/ready; Ctrl-C stops", err=True)
    serve_forever(triton)


@main.command("triton-repo")
@click.argument("engines", type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="Repository folder (new or empty).")
@click.option("--python-only", is_flag=True,
              help="Graph models on the Python backend (ONNX Runtime, CPU), for tritonservers without the "
                   "onnxruntime backend, such as PyTriton's.")
@click.option("--precision", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True,
              help="ONNX variant of the heavy graphs.")
@click.option("--max-batch", default=8, show_default=True, type=click.IntRange(min=0),
              help="Dynamic batcher of the graph models (TensorRT: the engines' profiles decide).")
@click.option("--queue-delay-us", default=500, show_default=True, type=click.IntRange(min=0))
@click.option("--cpu", is_flag=True, help="Graph models on CPU instances (default: GPU; TensorRT: always GPU).")
@click.option("--instances", default=1, show_default=True, type=click.IntRange(min=1), help="Per graph model and GPU.")
@click.option("--codec-instances", default=2, show_default=True, type=click.IntRange(min=1),
              help="CPU instances of osdiff_compress and of osdiff_decompress (entropy coding).")
@user_errors
def triton_repo(engines: str, output: str, python_only: bool, precision: str, max_batch: int, queue_delay_us: int,
                cpu: bool, instances: int, codec_instances: int) -> None:
    """Write a Triton model repository from an `osdiff export` (ONNX) or `osdiff build` (TensorRT)
    directory: osdiff_compress and osdiff_decompress (Python backend) over one model per heavy graph."""
    from osdiff.serving.repository import RepositoryOptions, write_repository

    names = write_repository(engines, output, RepositoryOptions(python_only, precision, max_batch, queue_delay_us,
                                                                not cpu, instances, codec_instances))
    click.echo(f"wrote {len(names)} models to {output} (every config.pbtxt parsed by Triton's ModelConfig): "
               + ", ".join(names))


@main.command("eval")
@click.argument("inputs", nargs=-1, required=True, type=_file)
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False),
              help="Results folder (NAME.json, NAME.csv, streams/); with --compare: rd.png and compare.json.")
@click.option("--codec", type=click.Choice(["osdiff", "jpeg", "webp"]), default="osdiff", show_default=True,
              help="jpeg/webp: Pillow's, swept over --quality (the classical baselines).")
@click.option("--quality", "qualities", default=None, metavar="Q,Q,...",
              help="Pillow qualities for --codec jpeg|webp (default: jpeg 1..90, webp 0..90 in 8-9 steps).")
@click.option("--protocol", type=click.Choice(["none", "kodak", "clic768"]), default="none", show_default=True,
              help="kodak: as is (checks 768x512); clic768: shorter side resized to 768, center crop 768x768.")
@click.option("--name", default=None, help="Curve name (file names, legends; default: from the codec or model).")
@click.option("--seed", default=0, show_default=True, help="OSDiff: diffusion noise seed stored in the streams.")
@click.option("--metric-weights", type=click.Path(exists=True, file_okay=False), default=None,
              help="Folder with the metric backbones' weight files, looked in before torch's hub cache.")
@click.option("--fid-min-patches", default=100, show_default=True, type=click.IntRange(min=2),
              help="FID/KID only when the set gives this many 256x256 patches (Kodak: 192).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--compare", "compare_mode", is_flag=True,
              help="INPUTS are results JSON files: print BD-rates, write RD plots.")
@click.option("--published", multiple=True, type=_file,
              help="With --compare: a published curve (CompressAI's JSON layout), drawn dashed (repeatable).")
@click.option("--anchor", default=None, help="With --compare: the BD-rate anchor curve (default: the first).")
@backend_options
@user_errors
def eval_(inputs: tuple[str, ...], output: str, codec: str, qualities: str | None, protocol: str, name: str | None,
          seed: int, metric_weights: str | None, fid_min_patches: int, no_progress: bool, compare_mode: bool,
          published: tuple[str, ...], anchor: str | None, **options: Any) -> None:
    """Rate, distortion and perception of a codec on a set of images (bpp from the streams
    written; PSNR, MS-SSIM, LPIPS, DISTS per image; FID/KID over 256x256 patches), or with
    --compare, BD-rates and RD plots of results files."""
    import json

    from osdiff.evaluation import missing_modules

    if missing_modules():
        raise click.ClickException(f"osdiff eval needs the eval extra (missing: {', '.join(missing_modules())}): "
                                   "pip install 'osdiff-engine[eval]'")
    from osdiff.evaluation import codecs, compare, metrics, run

    if name is not None and (Path(name).name != name or name in (".", "..")):
        raise click.UsageError(f"--name must be a plain file name, got {name!r}")
    out = Path(output)
    if compare_mode:
        curves = [compare.read_curve(p) for p in inputs] + [compare.read_curve(p, published=True) for p in published]
        result = compare.compare(curves, anchor)
        click.echo(compare.report(result))
        write_atomic(out / "compare.json", json.dumps(result, indent=1).encode())
        compare.plot(curves, out / "rd.png")
        click.echo(f"\nwrote {out / 'compare.json'} and {out / 'rd.png'}")
        return

    images = run.ImageSet(list(inputs), protocol)
    if codec == "osdiff":
        osdiff_codec = open_codec(**options)
        label = name or _model_name(options)
        points: list[Any] = [codecs.OSDiffCodec(osdiff_codec, label, seed)]
        description = f"OSDiff, {_model_description(options)}, {osdiff_codec.backend.name} backend"
    else:
        if any(options[k] for k in ("engines", "sd", "osdiff_ckpt", "random_weights")):
            raise click.UsageError(f"--codec {codec} takes no model (--engines, --sd, --osdiff, --random-weights)")
        try:
            qs = [int(q) for q in qualities.split(",")] if qualities else list(codecs.DEFAULT_QUALITIES[codec])
        except ValueError:
            raise click.UsageError(f"--quality takes integers separated by commas, got {qualities!r}") from None
        label = name or codec
        points = [codecs.PillowCodec(codec, q) for q in qs]
        description = codecs.pillow_description(codec)
    click.echo(f"{len(images)} image(s), protocol {protocol}; building the metric networks ...", err=True)
    scores = metrics.ImageMetrics(metric_weights, options["device"])
    scores.check_sizes(images.sizes, images.names)
    fid = metrics.PatchFID(images.patch_count(), fid_min_patches, metric_weights, options["device"])
    for key, reason in {**scores.skipped, **fid.skipped}.items():
        click.echo(f"skipping {key}: {reason}", err=True)
    document = run.evaluate(images, points, out, label, description, scores, fid, progress=not no_progress)
    click.echo(run.summary(document))
    click.echo(f"wrote {out / (label + '.json')}, {out / (label + '.csv')} and the streams in {out / 'streams'}")


def _model_name(options: dict[str, Any]) -> str:
    if options.get("engines"):
        return "osdiff-" + Path(options["engines"]).resolve().name
    if options.get("osdiff_ckpt"):
        return "osdiff-" + Path(options["osdiff_ckpt"]).stem
    config = options.get("config") or "full"
    return f"osdiff-{Path(config).stem}" + ("-random" if options.get("random_weights") else "")


def _model_description(options: dict[str, Any]) -> str:
    if options.get("engines"):
        return f"export {options['engines']}"
    if options.get("random_weights"):
        return (f"'{options.get('config') or 'full'}' config with RANDOM weights (seed {options['weights_seed']}): "
                "not a trained codec")
    if not (options.get("sd") or options.get("osdiff_ckpt")):
        return "the built-in demo model (osdiff/assets/demo_model.safetensors)"
    return f"checkpoints {options.get('sd')} + {options.get('osdiff_ckpt')}"


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
