"""`osdiff eval`: rate, distortion and perception of a codec on a set of images, and comparisons."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from osdiff.cli.common import backend_options, existing_file, open_codec, show_progress, user_errors
from osdiff.files import write_atomic

@click.command("eval")
@click.argument("inputs", nargs=-1, required=True, type=existing_file)
@click.option("-o", "--output", default=None, type=click.Path(file_okay=False),
              help="Results folder (NAME.json, NAME.csv, streams/). With --compare, optional: where to write "
                   "compare.json and rd.png (the tables are printed either way).")
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
@click.option("--no-progress", is_flag=True, help="No progress bar (there is none either when stderr is not a terminal).")
@click.option("--compare", "compare_mode", is_flag=True,
              help="INPUTS are results JSON files: print BD-rates, write RD plots.")
@click.option("--published", multiple=True, type=existing_file,
              help="With --compare: a published curve (CompressAI's JSON layout), drawn dashed (repeatable).")
@click.option("--anchor", default=None, help="With --compare: the BD-rate anchor curve (default: the first).")
@backend_options
@user_errors
def eval_(inputs: tuple[str, ...], output: str | None, codec: str, qualities: str | None, protocol: str, name: str | None,
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
    if compare_mode:
        # a folder's earlier `--compare -o` output is caught by `results/*.json`: left out, said
        ours = [p for p in inputs if Path(p).name == "compare.json" and compare.is_comparison(p)]
        for p in ours:
            click.echo(f"leaving out {p}: a comparison `osdiff eval --compare -o` wrote, not a results file")
        inputs = tuple(p for p in inputs if p not in ours)
        curves = [compare.read_curve(p) for p in inputs] + [compare.read_curve(p, published=True) for p in published]
        result = compare.compare(curves, anchor)
        click.echo(compare.report(result))
        if output is not None:
            out = Path(output)
            write_atomic(out / "compare.json", json.dumps(result, indent=1).encode())
            compare.plot(curves, out / "rd.png")
            click.echo(f"\nwrote {out / 'compare.json'} and {out / 'rd.png'}")
        return
    if output is None:
        raise click.UsageError("give -o DIR: the folder for the results (NAME.json, NAME.csv and the streams)")
    out = Path(output)

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
    document = run.evaluate(images, points, out, label, description, scores, fid, progress=show_progress(no_progress))
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


COMMANDS = [eval_]
