"""What every command group shares: error handling, the model and backend options, per-file runs.

Every command turns the project's own error types (bad checkpoint, bad stream, bad export,
bad config, unreadable image) into a one-line message and exit code 1; a traceback means a
bug in osdiff.
"""

from __future__ import annotations

import functools
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from osdiff.config import ConfigError, ModelConfig
from osdiff.export.checkpoint import CheckpointError, CheckpointWarning
from osdiff.files import ImageError
from osdiff.runtime.coder import StreamError

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


# ---------------------------------------------------------------------------------------------
# Choosing the model and the backend
# ---------------------------------------------------------------------------------------------

existing_file = click.Path(exists=True, dir_okay=False)


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
        click.option("--sd", type=existing_file, help="SD 2.1 checkpoint (v2-1_512-ema-pruned.ckpt or .safetensors)."),
        click.option("--osdiff", "osdiff_ckpt", type=existing_file, help="OSDiff checkpoint (lambda_*.ckpt), or a combined file."),
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


def open_codec(max_memory: str | None, max_pixels: int | None = None, **options: Any) -> "Codec":
    from osdiff.runtime.codec import DEFAULT_MAX_PIXELS, Codec
    from osdiff.runtime.memory import parse_size

    limit = parse_size(max_memory) if max_memory else None
    return Codec(open_backend(**options), max_pixels=max_pixels or DEFAULT_MAX_PIXELS, max_memory=limit)


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


def outputs_for(inputs: tuple[str, ...], output: str, suffix: str) -> list[Path]:
    """One file for one input (unless OUT is a folder), else OUT/<stem><suffix> per input."""
    out = Path(output)
    if len(inputs) == 1 and not out.is_dir() and out.suffix:
        return [out]
    paths = [out / (Path(i).stem + suffix) for i in inputs]
    if len(set(paths)) != len(paths):
        raise click.UsageError("two inputs share a file name; they would overwrite each other's output")
    return paths


def run_each(items: list[tuple[str, Path]], work: Callable[[str, Path], str]) -> None:
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

