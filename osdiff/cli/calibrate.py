"""`osdiff calibrate`: calibrated INT8/FP8 graphs for an export (a thin command over calibration/)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click

from osdiff.cli.common import checkpoint_options, load_model, user_errors


@click.command()
@checkpoint_options
@click.option("--engines", required=True, type=click.Path(exists=True, file_okay=False),
              help="The `osdiff export` directory of the same model; the quantized graphs are added to it.")
@click.option("--images", multiple=True, type=click.Path(exists=True),
              help="Calibration images or folders (repeatable; folders searched recursively, files sorted by path; "
                   "at least 6 images). Default: the built-in model's training photos, its wallpaper ones too "
                   "when fetched by `make photos`. Never the evaluation images.")
@click.option("--precision", "precisions", multiple=True, type=click.Choice(["int8", "fp8"]), default=["int8"],
              show_default=True, help="int8: Q/DQ graphs for ONNX Runtime and TensorRT; fp8: for TensorRT only "
                                      "(its loss is measured in PyTorch). Repeatable.")
@click.option("--calibrator", type=click.Choice(["percentile", "entropy", "max"]), default="percentile",
              show_default=True, help="INT8 activation ranges: a percentile of |x|, the entropy (KL) clip, or the max.")
@click.option("--percentile", default=99.999, show_default=True, type=click.FloatRange(50, 100, min_open=True),
              help="For --calibrator percentile (INT8).")
@click.option("--smoothquant-alpha", default=0.8, show_default=True, type=click.FloatRange(0, 1),
              help="SmoothQuant's migration strength for the Linear layers (INT8); 0 turns it off.")
@click.option("--crop", default=256, show_default=True, help="Side of the square calibration crops, pixels.")
@click.option("--crops-per-image", default=1, show_default=True,
              help="1: each image scaled to the crop; more: also crops at native resolution.")
@click.option("--measure-size", default=768, show_default=True,
              help="Every third image sets no range and is decoded whole, scaled down to this longer side "
                   "(pixels): the loss, the sensitivity and the skip list are measured on these pictures.")
@click.option("--max-block-loss", default=0.05, show_default=True, type=click.FloatRange(min=0),
              help="A block whose quantization alone drops the decoded PSNR by more (dB) stays float.")
@click.option("--aim", default=0.7, show_default=True, type=click.FloatRange(0, 1, min_open=True),
              help="Further blocks (at most 8, the costliest first) stay float until the loss on the validation "
                   "pictures is under this fraction of the targets (0.3 dB PSNR, 0.005 MS-SSIM): a margin for "
                   "photos they do not represent. Needs --sensitivity.")
@click.option("--sensitivity/--no-sensitivity", default=True, show_default=True,
              help="Measure each block's cost (one decode of the validation pictures per block).")
@click.option("--accept-loss", is_flag=True, help="Enter the graphs in the manifest even if they lose more than "
                                                  "the targets (0.3 dB PSNR, 0.005 MS-SSIM).")
@user_errors
def calibrate(engines: str, images: tuple[str, ...], precisions: tuple[str, ...], calibrator: str, percentile: float,
              smoothquant_alpha: float, crop: int, crops_per_image: int, measure_size: int, max_block_loss: float,
              aim: float, sensitivity: bool, accept_loss: bool, **checkpoints: Any) -> None:
    """Quantize the heavy graphs (VAE encoder, G_s, denoiser, VAE decoder) of an export to INT8
    (and FP8) with NVIDIA ModelOpt, calibrated on real images, their loss measured; the
    entropy-model graphs stay fp32. Writes int8/ and fp8/ graphs and calibration.json into the
    export and enters them in its manifest; exits 1 when the loss is over the targets (unless
    --accept-loss). Run the result with `osdiff compress/decompress/profile/serve --precision int8`
    (ONNX Runtime) or build it with `osdiff build --precision int8|fp8` (TensorRT)."""
    from osdiff.calibration.calibrate import REPORT, Settings, calibrate as run, verdict
    from osdiff.calibration.images import load_calibration_set
    from osdiff.calibration.quantize import modelopt_version
    from osdiff.export.onnx_export import ExportError, load_export

    modelopt_version()  # before loading anything: a clear message when the extra is missing
    try:
        load_export(engines)
    except ExportError as e:
        raise ExportError(f"{e}; --engines takes the directory `osdiff export -o DIR` wrote") from e
    if calibrator != "percentile" and click.get_current_context().get_parameter_source("percentile") \
            is not click.core.ParameterSource.DEFAULT:
        click.echo(f"note: --percentile is for --calibrator percentile; --calibrator {calibrator} ignores it")
    if not images:
        from osdiff.training import wallpapers

        if not wallpapers.available():
            click.echo(f"note: {wallpapers.missing_message()}; calibrating on the wheels' six photos only")
    calibration_set = load_calibration_set(list(images) or None, crop, crops_per_image, measure_size)
    click.echo(f"ranges from {len(calibration_set.crops)} crops ({', '.join(c.name for c in calibration_set.crops)}); "
               "loss measured on " + ", ".join(f"{v.name} ({v.pixels.shape[0]}x{v.pixels.shape[1]})"
                                               for v in calibration_set.validation))
    model = load_model(**checkpoints)
    settings = Settings(precisions=tuple(dict.fromkeys(precisions)), calibrator=calibrator, percentile=percentile,
                        smoothquant_alpha=smoothquant_alpha or None, max_block_loss_db=max_block_loss, aim=aim,
                        sensitivity=sensitivity)
    t0 = time.perf_counter()
    results = run(model, engines, calibration_set.crops, settings, accept_loss=accept_loss, echo=click.echo,
                  validation=calibration_set.validation)
    click.echo(f"calibrated in {time.perf_counter() - t0:.0f} s; every number in {Path(engines) / REPORT}")
    for r in results:  # last, where the user looks: a loss over the targets is never buried in the log
        click.echo(verdict(r))
    refused = [r.precision for r in results if not r.registered]
    if refused:
        raise click.ClickException(f"{', '.join(refused)} lost more than the targets and was not entered in the "
                                   "manifest (see above; --accept-loss to use it anyway)")


COMMANDS = [calibrate]
