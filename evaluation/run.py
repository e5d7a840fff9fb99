"""One evaluation: every image of a set through one codec at each of its rate points.

For each rate point and image: encode (timed), write the stream to disk, read it back, decode
(timed), and score the decoded image against the prepared original (metrics.py). bpp is
8 * (bytes of the stream file) / (pixels of the image). The first image is coded once untimed
before the timed runs of each rate point (sessions, allocators and caches warm up on first use).

Writes, under the results folder:
    <name>.json   CompressAI's results layout: {"name", "description", "results": {"bpp": [...],
                  "psnr-rgb": [...], ...}} with one list entry per rate point, each the mean over
                  the images (as CompressAI's eval_model reports), its keys as CompressAI names
                  them ("encoding_time" and "decoding_time" in seconds, as there), plus what the
                  layout has no place for: "units", the rate points, the images and protocol,
                  the skipped metrics and why, and the library versions
    <name>.csv    one row per rate point and image; columns named with their unit where they
                  have one (encoding_time_s, decoding_time_s); a skipped metric has no column
    streams/<point>/<image><suffix>   the streams themselves
"""

from __future__ import annotations

import csv
import io
import json
import math
import platform
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from PIL import features
from tqdm import tqdm

from osdiff.evaluation.codecs import ImageCodec
from osdiff.evaluation.metrics import PER_IMAGE, PER_SET, ImageMetrics, PatchFID, ms_ssim_db, patch_count
from osdiff.evaluation.protocols import prepare
from osdiff.files import read_image, write_atomic

CSV_COLUMNS = ("point", "image", "height", "width", "bytes", "bpp", *PER_IMAGE, "encoding_time_s", "decoding_time_s")
# Units of the results' keys that have one (CompressAI's layout keeps its own key names)
UNITS = {"bpp": "bits per pixel", "psnr-rgb": "dB", "ms-ssim-rgb-db": "dB", "encoding_time": "s", "decoding_time": "s"}


@dataclass
class ImageSet:
    """Image files prepared by a protocol; read again on each pass, so a large set is never held
    in memory whole. Every file is read once up front, so a bad one stops the evaluation before
    anything runs."""

    paths: list[Path]
    protocol: str = "none"
    names: list[str] = field(init=False)
    sizes: list[tuple[int, int]] = field(init=False)

    def __post_init__(self) -> None:
        self.paths = [Path(p) for p in self.paths]
        self.names = [p.stem for p in self.paths]
        if len(set(self.names)) != len(self.names):
            raise ValueError("two images share a file name (their streams and rows would collide)")
        self.sizes = [self.read(i).shape[:2] for i in range(len(self.paths))]

    def read(self, i: int) -> np.ndarray:
        return prepare(read_image(self.paths[i]), self.protocol, str(self.paths[i]))

    def __len__(self) -> int:
        return len(self.paths)

    def __iter__(self) -> Iterator[tuple[str, np.ndarray]]:
        for i, name in enumerate(self.names):
            yield name, self.read(i)

    def patch_count(self) -> int:
        return sum(patch_count(h, w) for h, w in self.sizes)


def mean_results(rows: list[dict[str, Any]], skipped: dict[str, str]) -> dict[str, float]:
    """The mean over images of every column all rows have, under CompressAI's key names; MS-SSIM
    in dB from the mean MS-SSIM (as CompressAI's plots convert it)."""
    out = {}
    for key in ("bpp", *PER_IMAGE, "encoding_time_s", "decoding_time_s"):
        if key == "ms-ssim-rgb-db" or key in skipped:
            continue
        values = [r.get(key) for r in rows]
        if all(v is not None for v in values):
            out[key.removesuffix("_s")] = float(np.mean(values))
    if "ms-ssim-rgb" in out:
        out["ms-ssim-rgb-db"] = ms_ssim_db(out["ms-ssim-rgb"])
    return out


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("osdiff-engine", "torch", "torchmetrics", "pytorch-msssim", "torch-fidelity", "pillow"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    out["libjpeg-turbo"] = str(features.version("libjpeg_turbo"))
    out["libwebp"] = str(features.version("webp"))
    return out


def evaluate(images: ImageSet, points: Sequence[ImageCodec], output: str | Path, name: str, description: str,
             metrics: ImageMetrics, fid: PatchFID, progress: bool = True) -> dict[str, Any]:
    """Run the evaluation, write <name>.json, <name>.csv and the streams under `output`, and
    return the JSON's content."""
    out = Path(output)
    rows: list[dict[str, Any]] = []
    results: dict[str, list[float]] = {}
    for point in points:
        fid.new_point()
        _, first = next(iter(images))
        point.decode(point.encode(first))  # warm-up, untimed
        point_rows = []
        bar = tqdm(images, total=len(images), desc=point.label, unit="image", file=sys.stderr, disable=not progress,
                   dynamic_ncols=True)
        for image_name, image in bar:
            t0 = time.perf_counter()
            data = point.encode(image)
            encoding_time = time.perf_counter() - t0
            path = out / "streams" / point.label / (image_name + point.suffix)
            write_atomic(path, data)
            data = path.read_bytes()
            t0 = time.perf_counter()
            decoded = point.decode(data)
            decoding_time = time.perf_counter() - t0
            h, w = image.shape[:2]
            row = {"point": point.label, "image": image_name, "height": h, "width": w, "bytes": len(data),
                   "bpp": 8 * len(data) / (h * w), **metrics(image, decoded, image_name),
                   "encoding_time_s": encoding_time, "decoding_time_s": decoding_time}
            fid.add(image, decoded)
            point_rows.append(row)
            bar.set_postfix(bpp=f"{row['bpp']:.3f}", psnr=f"{row['psnr-rgb']:.2f}")
        means = {**mean_results(point_rows, metrics.skipped), **fid.compute()}
        if point.quality is not None:
            means["quality"] = point.quality
        for key, value in means.items():
            results.setdefault(key, []).append(value)
        rows += point_rows

    document = {
        "name": name,
        "description": description,
        "results": results,
        "units": {k: v for k, v in UNITS.items() if k in results},
        "points": [p.label for p in points],
        "dataset": {"protocol": images.protocol, "images": images.names, "sizes": [list(s) for s in images.sizes],
                    "fid_patches": images.patch_count()},
        "skipped": {**metrics.skipped, **fid.skipped},
        "versions": versions(),
    }
    write_atomic(out / f"{name}.json", json.dumps(document, indent=1).encode())
    write_atomic(out / f"{name}.csv", _csv(rows, document["skipped"]).encode())
    return document


def _csv(rows: list[dict[str, Any]], skipped: dict[str, str]) -> str:
    """One row per rate point and image; a skipped metric has no column (the JSON says why)."""
    buf = io.StringIO()
    columns = [c for c in CSV_COLUMNS if c not in skipped]
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (repr(v) if isinstance(v, float) and math.isfinite(v) else v) for k, v in row.items()})
    return buf.getvalue()


def summary(document: dict[str, Any]) -> str:
    """The results as a table: one row per rate point."""
    res = document["results"]
    keys = [k for k in ("bpp", *PER_IMAGE, *PER_SET, "encoding_time", "decoding_time") if k in res]
    heads = [f"{k} [{UNITS[k]}]" if UNITS.get(k) in ("dB", "s") else k for k in keys]
    lines = ["  ".join(f"{k:>14}" for k in ["point", *heads])]
    for i, label in enumerate(document["points"]):
        lines.append("  ".join([f"{label:>14}"] + [f"{res[k][i]:>14.4f}" for k in keys]))
    for key, reason in document["skipped"].items():
        lines.append(f"skipped {key}: {reason}")
    return "\n".join(lines)
