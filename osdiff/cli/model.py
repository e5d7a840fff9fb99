"""Commands on models and engines: export to ONNX, check against golden data, build and compare TensorRT engines."""

from __future__ import annotations

import time
from typing import Any

import click

from osdiff.cli.common import checkpoint_options, load_model, user_errors
from osdiff.engine.profiles import DEFAULT_PROFILE
from osdiff.export.models.attention import FORMS

@click.command()
@checkpoint_options
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option("--fp16/--no-fp16", default=True, show_default=True, help="Also write fp16 variants of the heavy graphs.")
@click.option("--only", multiple=True, help="Export only these graphs (repeatable).")
@click.option("--attention", type=click.Choice(FORMS), default="mha", show_default=True,
              help="Form of attention in the graphs: mha (ONNX Runtime's fused MultiHeadAttention, and GELU as its "
                   "Gelu in the heavy graphs; `osdiff build` rewrites both into the patterns TensorRT fuses), plain (MatMul-Softmax-MatMul), scan (blocks of "
                   "queries in an ONNX Scan: bounded memory on runtimes with no fused attention; not for TensorRT).")
@user_errors
def export(output: str, fp16: bool, only: tuple[str, ...], attention: str, **checkpoints: Any) -> None:
    """Export every stage of a model to ONNX (fp32, and fp16 with fp32 islands)."""
    from osdiff.export.onnx_export import export_onnx

    model = load_model(**checkpoints)
    t0 = time.perf_counter()
    export_onnx(model, output, fp16=fp16, progress=click.echo, only=list(only) or None, attention=attention)
    click.echo(f"exported to {output} in {time.perf_counter() - t0:.0f} s")



@click.command("verify-reference")
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


@click.command()
@click.argument("onnx_dir", type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="Engine directory.")
@click.option("--profile", "profiles", multiple=True, default=[DEFAULT_PROFILE], show_default=True,
              metavar="MIN:OPT:MAX", help="Optimization profile over padded image sizes, each BATCHxHEIGHTxWIDTH "
                                          "(repeatable: one profile each).")
@click.option("--workspace", default=8192, show_default=True, type=click.IntRange(min=1),
              help="Builder workspace limit, MiB.")
@click.option("--opt-level", default=3, show_default=True, type=click.IntRange(0, 5),
              help="Builder optimization level (higher: longer builds, maybe faster engines).")
@click.option("--precision", type=click.Choice(["fp16", "int8", "fp8"]), default="fp16", show_default=True,
              help="Variant of the heavy graphs: fp16, or the Q/DQ graphs of `osdiff calibrate` (strongly typed: "
                   "the graph decides every tensor's type).")
@user_errors
def build(onnx_dir: str, output: str, profiles: tuple[str, ...], workspace: int, opt_level: int, precision: str) -> None:
    """Build a TensorRT engine per graph of an `osdiff export` directory (needs TensorRT and a GPU)."""
    from osdiff.engine.build import build_engines
    from osdiff.engine.profiles import ShapeProfile

    t0 = time.perf_counter()
    build_engines(onnx_dir, output, [ShapeProfile.parse(p) for p in profiles], workspace, opt_level, echo=click.echo,
                  precision=precision)
    click.echo(f"built the engines in {output} in {time.perf_counter() - t0:.0f} s")


@click.command()
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


COMMANDS = [export, verify_reference, build, compare]
