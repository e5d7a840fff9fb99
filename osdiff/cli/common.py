"""What every command group shares: error handling, the model and backend options, per-file runs
and their progress.

Every command turns the project's own error types (bad checkpoint, bad stream, bad export,
bad config, unreadable image) into a one-line message and exit code 1; a traceback means a
bug in osdiff.

Progress: long work shows a tqdm bar on stderr, named by the stage running now (the span names
of runtime/profiling.py, as `osdiff profile` reports them), only when stderr is a terminal and
--quiet is not given. Bars are transient and appear only once their work has taken PROGRESS_DELAY_S,
so what stays on the screen is each file's result line, and small images show none.
"""

from __future__ import annotations

import functools
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from tqdm import tqdm

from osdiff.config import ConfigError, ModelConfig
from osdiff.export.checkpoint import CheckpointError, CheckpointWarning
from osdiff.files import ImageError
from osdiff.runtime.coder import StreamError
from osdiff.runtime.profiling import Trace

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


quiet_option = click.option("-q", "--quiet", is_flag=True,
                            help="No progress and no informational lines: only each file's result line, notes "
                                 "and errors.")


def info(message: str, quiet: bool) -> None:
    """An informational line on stderr (what is being loaded, how long it took), unless --quiet."""
    if not quiet:
        click.echo(message, err=True)


# ---------------------------------------------------------------------------------------------
# Progress
# ---------------------------------------------------------------------------------------------

PROGRESS_DELAY_S = 1.0


def stderr_is_terminal() -> bool:
    return sys.stderr.isatty()


def show_progress(quiet: bool) -> bool:
    return not quiet and stderr_is_terminal()


class _Bar:
    """A transient tqdm bar on stderr that appears once its work has taken PROGRESS_DELAY_S and
    is redrawn twice a second, so that its clock runs on through a long stage."""

    def __init__(self, enabled: bool, **bar: Any) -> None:
        # miniters 0 (fixed): an update(0) redraws too, which is what the ticking thread does
        self.bar = tqdm(file=sys.stderr, disable=not enabled, delay=PROGRESS_DELAY_S, leave=False, miniters=0, **bar)
        self._lock = threading.Lock()  # the ticking thread and the work both redraw
        self._stop = threading.Event()
        if enabled:
            threading.Thread(target=self._tick, daemon=True).start()

    def _tick(self) -> None:
        while not self._stop.wait(0.5):
            self.advance(0)

    def advance(self, n: int) -> None:
        """Count n more done and redraw (update() honours the delay, and close() then clears)."""
        with self._lock:
            self.bar.update(n)

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            self.bar.close()


class StageProgress(_Bar):
    """One long run (a compress, a decompress): its label, the stage running now and the time
    so far. `trace` is what the codec is given to report its stages."""

    def __init__(self, label: str, enabled: bool) -> None:
        # mininterval 0: every stage change is drawn (at most some 70 per image, one short line each)
        super().__init__(enabled, desc=f"{label}: reading", bar_format="{desc} [{elapsed}]", mininterval=0)
        self.label = label
        self.trace = Trace(on_start=self.stage) if enabled else Trace(enabled=False)

    def stage(self, name: str) -> None:
        self.bar.set_description_str(f"{self.label}: {name}", refresh=False)
        self.advance(0)


class RunProgress(_Bar):
    """The runs of `osdiff profile` (warm-up, then measured), with the stage of the run in
    progress."""

    def __init__(self, warmups: int, runs: int, enabled: bool) -> None:
        # smoothing 0: the rate over the whole run (the ticking redraws would skew a moving average)
        super().__init__(enabled, total=warmups + runs, desc="warm-up", unit="run", dynamic_ncols=True, smoothing=0)
        self.warmups = warmups

    def stage(self, name: str) -> None:
        self.bar.set_postfix_str(name, refresh=False)

    def run_done(self) -> None:
        if self.bar.n + 1 >= self.warmups:
            self.bar.set_description_str("measured runs", refresh=False)
        self.advance(1)


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
        click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default="fp32", show_default=True,
                     help="Precision of the heavy stages (VAE, G_s, denoiser); an export without that variant of one is "
                          "an error. int8: the Q/DQ graphs `osdiff calibrate` adds to an export (onnxruntime). The "
                          "LFGCM graphs (analysis, entropy models) are fp32 by design. tensorrt: the engines' own, set "
                          "when they were built."),
        click.option("--provider", type=click.Choice(["cpu", "cuda", "tensorrt"]), default="cpu", show_default=True,
                     help="onnxruntime execution provider."),
        click.option("--max-memory", default=None, metavar="SIZE",
                     help="Memory a run may take in all (e.g. 6G); default: what the machine has free. A run "
                          "that would need more is refused before it starts."),
    ]):
        fn = option(fn)
    return checkpoint_options(fn)


def load_model(sd: str | None, osdiff_ckpt: str | None, config: str | None, random_weights: bool,
               weights_seed: int = 0, quiet: bool = False) -> "OSDiffModel":
    from osdiff.export.model import OSDiffModel

    cfg = ModelConfig.named(config)
    if random_weights:
        if sd or osdiff_ckpt:
            raise click.UsageError("--random-weights takes no checkpoints")
        info(f"building the '{cfg.name}' model with random weights (seed {weights_seed}) ...", quiet)
        return OSDiffModel.random(cfg, weights_seed)
    if not (sd or osdiff_ckpt):
        if config == "demo":
            from osdiff.builtin import load_builtin

            info("loading the built-in demo model ...", quiet)
            return load_builtin()
        raise click.UsageError("give --sd and --osdiff checkpoints (or --config demo, or --random-weights)")
    info("loading checkpoints ...", quiet)
    with warnings.catch_warnings(record=True) as notes:
        warnings.simplefilter("always", CheckpointWarning)
        model = OSDiffModel.load(sd, osdiff_ckpt, cfg)
    for note in notes:
        if issubclass(note.category, CheckpointWarning):
            click.echo(f"note: {note.message}", err=True)
        else:
            warnings.showwarning(note.message, note.category, note.filename, note.lineno)
    return model


def open_codec(max_memory: str | None, quiet: bool = False, max_pixels: int | None = None, **options: Any) -> "Codec":
    """The codec of the backend and model the options name; says how long loading took (the
    ONNX Runtime backend creates each graph's session on its first run, not here)."""
    from osdiff.runtime.codec import DEFAULT_MAX_PIXELS, Codec
    from osdiff.runtime.memory import parse_size

    limit = parse_size(max_memory) if max_memory else None
    t0 = time.perf_counter()
    codec = Codec(open_backend(quiet=quiet, **options), max_pixels=max_pixels or DEFAULT_MAX_PIXELS, max_memory=limit)
    info(f"model loaded in {time.perf_counter() - t0:.2f} s ({codec.backend.name} backend)", quiet)
    return codec


def open_backend(backend: str | None, engines: str | None, device: str, precision: str, provider: str,
                 quiet: bool = False, **checkpoints: Any) -> "Backend":
    backend = backend or ("onnxruntime" if engines else "torch")
    if precision == "int8" and backend != "onnxruntime":
        raise click.UsageError("--precision int8 runs the calibrated graphs of an export: use --engines DIR with "
                               "--backend onnxruntime (`osdiff calibrate` makes them)")
    if backend == "torch":
        from osdiff.runtime.backends.torch_backend import TorchBackend

        return TorchBackend(load_model(quiet=quiet, **checkpoints), device=device, half=precision == "fp16")
    if engines is None:
        raise click.UsageError(f"--backend {backend} needs --engines DIR")
    if backend == "onnxruntime":
        from osdiff.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend

        return OnnxRuntimeBackend(engines, precision=precision, provider=provider)
    from osdiff.runtime.backends.tensorrt_backend import TensorRTBackend

    return TensorRTBackend(engines)


# Suffixes of the files the codec reads and writes: with several inputs, an -o that ends in one
# is a file name typed by mistake, not a folder to create.
STREAM_SUFFIXES = (".osd", ".bin")


def outputs_for(inputs: tuple[str, ...], output: str, suffix: str) -> list[Path]:
    """One file for one input (unless OUT is a folder), else OUT/<stem><suffix> per input, OUT
    a folder (made if missing). UsageError for several inputs and an OUT that is a file, or
    that does not exist and is named like an image or a stream."""
    from PIL import Image

    out = Path(output)
    if len(inputs) == 1 and not out.is_dir() and out.suffix:
        return [out]
    if len(inputs) > 1 and not out.is_dir():
        if out.exists():
            raise click.UsageError(f"several inputs need an output directory: {out} is a file")
        if out.suffix.lower() in (*STREAM_SUFFIXES, *Image.registered_extensions()):
            raise click.UsageError(f"several inputs need an output directory: -o {out} names a {out.suffix} file "
                                   f"(give a folder, e.g. -o {out.with_suffix('')}/)")
    paths = [out / (Path(i).stem + suffix) for i in inputs]
    if len(set(paths)) != len(paths):
        raise click.UsageError("two inputs share a file name; they would overwrite each other's output")
    return paths


def run_each(items: list[tuple[str, Path]], work: Callable[[str, Path, Trace], str], codec: "Codec",
             quiet: bool = False) -> None:
    """Run `work(src, dst, trace)` per file with its progress (see the module docstring),
    report each with its time, go on after a bad file, exit 1 if any failed.

    The first file that runs also warms the backend up (ONNX Runtime creates each graph's
    session on its first run; PyTorch sets up its kernels and allocator): its line says so,
    with the seconds spent creating sessions where the backend counts them."""
    failed = 0
    warm = False
    for i, (src, dst) in enumerate(items, 1):
        progress = StageProgress(f"[{i}/{len(items)}] {src}", show_progress(quiet))
        sessions = getattr(codec.backend, "session_seconds", None)
        t0 = time.perf_counter()
        try:
            note = work(src, dst, progress.trace)
        except USER_ERRORS as e:
            failed += 1
            # library errors name their file for callers without this prefix: not twice here
            message = str(e).removeprefix(f"{src}: ")
            click.echo(f"[{i}/{len(items)}] {src}: error: {message}", err=True)
            continue
        finally:
            progress.close()
        seconds = time.perf_counter() - t0
        line = f"[{i}/{len(items)}] {src} -> {dst}: {note}, {seconds:.2f} s"
        if not warm:
            created = getattr(codec.backend, "session_seconds", None)
            of_it = f", {created - sessions:.2f} s of it creating ONNX Runtime sessions" if sessions is not None else ""
            line += f" (first file: includes the warm-up{of_it})"
            warm = True
        click.echo(line)
    if failed:
        raise click.ClickException(f"{failed} of {len(items)} file(s) failed")
