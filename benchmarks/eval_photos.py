"""OSDiff against JPEG and WebP on scikit-image's bundled photographs, with `osdiff eval`.

The photographs ship in scikit-image's wheel (skimage/data): astronaut (NASA, public domain),
chelsea (Stefan van der Walt, CC0), coffee (Rachel Michetti, CC0), rocket (SpaceX, public
domain); full size, protocol none. Runs, exactly as a user would:

    osdiff eval PHOTOS --config demo -o TMP --no-progress   (the built-in model, or the model given)
    osdiff eval PHOTOS --codec jpeg -o TMP
    osdiff eval PHOTOS --codec webp -o TMP
    osdiff eval --compare TMP/<osdiff>.json TMP/jpeg.json TMP/webp.json --anchor jpeg -o OUT

and keeps the JSON and CSV results, compare.json and rd.png in OUT (default
benchmarks/results/eval_photos/); the streams stay in the temporary folder.

    python benchmarks/eval_photos.py                         # the built-in demo model
    python benchmarks/eval_photos.py --model-args "--engines model/"
    python benchmarks/eval_photos.py --metric-weights ~/weights   # adds LPIPS and DISTS
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import click
from PIL import Image

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")
RESULTS = Path(__file__).parent / "results" / "eval_photos"


def osdiff(*args: str) -> None:
    cmd = [sys.executable, "-m", "osdiff.cli", *args]
    click.echo("$ osdiff " + " ".join(shlex.quote(a) for a in args), err=True)
    subprocess.run(cmd, check=True)


@click.command()
@click.option("--model-args", default="--config demo", show_default=True,
              help="How `osdiff eval` gets the OSDiff model.")
@click.option("--name", default=None, help="Curve name of the OSDiff model (default: osdiff eval's).")
@click.option("--metric-weights", default=None, help="Folder with the metric backbones' weights.")
@click.option("-o", "--output", default=str(RESULTS), show_default=True)
def main(model_args: str, name: str | None, metric_weights: str | None, output: str) -> None:
    import skimage.data

    out = Path(output)
    extra = ["--no-progress"] + (["--metric-weights", metric_weights] if metric_weights else [])
    with tempfile.TemporaryDirectory() as tmp:
        photos = Path(tmp) / "photos"
        photos.mkdir()
        files = []
        for p in PHOTOS:
            files.append(str(photos / f"{p}.png"))
            Image.fromarray(getattr(skimage.data, p)()).save(files[-1])
        results = Path(tmp) / "results"
        osdiff("eval", *files, *shlex.split(model_args), *(["--name", name] if name else []), "-o", str(results), *extra)
        osdiff("eval", *files, "--codec", "jpeg", "-o", str(results), *extra)
        osdiff("eval", *files, "--codec", "webp", "-o", str(results), *extra)
        out.mkdir(parents=True, exist_ok=True)
        for f in sorted(results.glob("*.json")) + sorted(results.glob("*.csv")):
            shutil.copy(f, out / f.name)
        learned = sorted(str(p) for p in results.glob("*.json") if p.stem not in ("jpeg", "webp"))
        osdiff("eval", "--compare", *learned, str(results / "jpeg.json"), str(results / "webp.json"),
               "--anchor", "jpeg", "-o", str(out))


if __name__ == "__main__":
    main()
