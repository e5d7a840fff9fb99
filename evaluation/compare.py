"""Comparing rate-distortion-perception curves: BD-rates and RD plots.

A curve is a results JSON in CompressAI's layout (what `osdiff eval` writes, and what CompressAI
and many papers publish): {"name", "description", "results": {"bpp": [...], "psnr-rgb": [...],
...}}. Files that share a name are one curve (one `osdiff eval` per model of a curve, e.g. one
per lambda), their points sorted by bpp.

BD-rate (Bjontegaard, VCEG-M33) is the average difference in log-rate between two curves over
the range of quality both cover, in percent: negative means fewer bits for the same quality. It
comes from the `bjontegaard` package (FAU, BSD-3), with Akima interpolation, which its authors
found more accurate and stable than VCEG-M33's cubic fit. For metrics where lower is better
(LPIPS, DISTS, FID, KID) the negated metric is used, so the sign means the same everywhere.
A curve with one point has no BD-rate; the metrics of the other curves at its rate (linear in
log bpp, never extrapolated) are given instead.
"""

from __future__ import annotations

import io
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from osdiff.evaluation.metrics import HIGHER_IS_BETTER, ms_ssim_db
from osdiff.files import write_atomic

# Compared and plotted, in this order, when at least one curve has them.
COMPARED = ("psnr-rgb", "ms-ssim-rgb-db", "lpips-alex", "lpips-vgg", "dists", "fid", "kid")
TITLES = {"psnr-rgb": "PSNR (RGB) [dB]", "ms-ssim-rgb-db": "MS-SSIM (RGB) [dB]", "lpips-alex": "LPIPS (AlexNet)",
          "lpips-vgg": "LPIPS (VGG)", "dists": "DISTS", "fid": "FID (256x256 patches)", "kid": "KID (256x256 patches)"}


@dataclass
class Curve:
    name: str
    description: str
    results: dict[str, list[float]]
    published: bool = False

    @property
    def bpp(self) -> np.ndarray:
        return np.asarray(self.results["bpp"], dtype=np.float64)

    def values(self, metric: str) -> np.ndarray | None:
        v = self.results.get(metric)
        return None if v is None else np.asarray(v, dtype=np.float64)


def is_comparison(path: str | Path) -> bool:
    """Whether the file is what `compare` returned, as `osdiff eval --compare -o` writes it."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(doc, dict) and "anchor" in doc and "metrics" in doc and "results" not in doc


def read_curve(path: str | Path, published: bool = False) -> Curve:
    """Read one results JSON; ValueError naming the file when it is not in the layout."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{path}: not a readable JSON file: {e}") from e
    results = doc.get("results") if isinstance(doc, dict) else None
    if not isinstance(results, dict) or not isinstance(results.get("bpp"), list) or not results["bpp"]:
        raise ValueError(f"{path}: not a results file in CompressAI's layout (needs results.bpp, a list)")
    n = len(results["bpp"])
    clean: dict[str, list[float]] = {}
    for key, values in results.items():
        if not isinstance(values, list) or len(values) != n:
            continue  # per-curve notes some layouts carry; only lists aligned with bpp are points
        try:
            clean[key] = [float(v) for v in values]
        except (TypeError, ValueError):
            raise ValueError(f"{path}: results.{key} holds a value that is not a number") from None
    if not all(b > 0 and math.isfinite(b) for b in clean["bpp"]):
        raise ValueError(f"{path}: every bpp must be a positive number")
    if "ms-ssim-rgb" in clean and "ms-ssim-rgb-db" not in clean:
        clean["ms-ssim-rgb-db"] = [ms_ssim_db(v) for v in clean["ms-ssim-rgb"]]
    return Curve(str(doc.get("name", path.stem)), str(doc.get("description", "")), clean, published)


def merge(curves: list[Curve]) -> list[Curve]:
    """Curves of one name become one, points sorted by bpp; only metrics all parts have stay."""
    by_name: dict[str, list[Curve]] = {}
    for c in curves:
        by_name.setdefault(c.name, []).append(c)
    merged = []
    for name, parts in by_name.items():
        keys = set.intersection(*(set(p.results) for p in parts))
        results = {k: [v for p in parts for v in p.results[k]] for k in keys}
        order = np.argsort(results["bpp"], kind="stable")
        results = {k: [v[i] for i in order] for k, v in results.items()}
        merged.append(Curve(name, parts[0].description, results, parts[0].published))
    return merged


def bd_rate(anchor: Curve, test: Curve, metric: str) -> tuple[float | None, str]:
    """BD-rate of `test` against `anchor` on `metric`, percent; or None and the reason."""
    import bjontegaard

    pairs = []
    for c in (anchor, test):
        y = c.values(metric)
        if y is None:
            return None, f"{c.name} has no {metric}"
        keep = np.isfinite(y)
        r, y = c.bpp[keep], y[keep]
        if not HIGHER_IS_BETTER[metric]:
            y = -y
        if len(r) < 2:
            return None, f"{c.name} has {len(r)} point(s); BD-rate needs 2 or more"
        order = np.argsort(y)
        if np.any(np.diff(y[order]) <= 0):
            return None, f"{c.name}: two points share one {metric} value"
        pairs.append((r[order], y[order]))
    (ra, ya), (rt, yt) = pairs
    if min(ya[-1], yt[-1]) <= max(ya[0], yt[0]):
        return None, f"the curves do not overlap in {metric}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its low-overlap warning: the overlap is reported with the value
        value = bjontegaard.bd_rate(ra, ya, rt, yt, method="akima", require_matching_points=False, min_overlap=0)
    overlap = (min(ya[-1], yt[-1]) - max(ya[0], yt[0])) / (max(ya[-1], yt[-1]) - min(ya[0], yt[0]))
    return float(value), f"over {overlap:.0%} of the joint {metric} range"


def at_rate(curve: Curve, bpp: float, metric: str) -> float | None:
    """The curve's metric at `bpp`, linear in log bpp; None outside its range of rates."""
    y = curve.values(metric)
    if y is None or len(curve.bpp) < 2:
        return None
    r = curve.bpp
    keep = np.isfinite(y)
    r, y = r[keep], y[keep]
    if len(r) < 2 or not r.min() <= bpp <= r.max():
        return None
    order = np.argsort(r)
    return float(np.interp(math.log(bpp), np.log(r[order]), y[order]))


def compare(curves: list[Curve], anchor_name: str | None = None) -> dict[str, Any]:
    """BD-rates of every curve against the anchor (default: the first), and for each
    single-point curve the other curves' metrics at its rate."""
    curves = merge(curves)
    anchor = next((c for c in curves if c.name == anchor_name), None) if anchor_name else curves[0]
    if anchor is None:
        raise ValueError(f"no curve named {anchor_name!r} (curves: {', '.join(c.name for c in curves)})")
    metrics = [m for m in COMPARED if any(m in c.results for c in curves)]
    bd: dict[str, dict[str, Any]] = {}
    for c in curves:
        if c is anchor:
            continue
        bd[c.name] = {}
        for m in metrics:
            value, note = bd_rate(anchor, c, m)
            bd[c.name][m] = {"bd_rate": value, "note": note}
    matched = []
    for c in curves:
        if len(c.bpp) != 1:
            continue
        bpp = float(c.bpp[0])
        row: dict[str, Any] = {"curve": c.name, "bpp": bpp, c.name: {m: c.results[m][0] for m in metrics if m in c.results}}
        for other in curves:
            if other is not c and len(other.bpp) > 1:
                row[other.name] = {m: at_rate(other, bpp, m) for m in metrics}
        matched.append(row)
    return {"anchor": anchor.name, "metrics": metrics,
            "curves": {c.name: {"points": len(c.bpp), "description": c.description, "published": c.published}
                       for c in curves},
            "bd_rate": bd, "at_rate": matched}


def report(result: dict[str, Any]) -> str:
    """The comparison as text tables."""
    metrics = result["metrics"]
    lines = [f"BD-rate against {result['anchor']} (%, negative: fewer bits for the same quality; Akima)",
             "  ".join([f"{'curve':<24}", *(f"{m:>14}" for m in metrics)])]
    for name, row in result["bd_rate"].items():
        cells = [f"{row[m]['bd_rate']:>14.2f}" if row[m]["bd_rate"] is not None else f"{'n/a':>14}" for m in metrics]
        lines.append("  ".join([f"{name:<24}", *cells]))
    reasons = sorted({f"  n/a: {row[m]['note']}" for row in result["bd_rate"].values() for m in metrics
                      if row[m]["bd_rate"] is None})
    lines += reasons
    for row in result["at_rate"]:
        lines += ["", f"at {row['bpp']:.4f} bpp, the rate of {row['curve']} (others interpolated in log bpp):",
                  "  ".join([f"{'curve':<24}", *(f"{m:>14}" for m in metrics)])]
        for name, values in row.items():
            if name in ("curve", "bpp"):
                continue
            cells = [f"{values[m]:>14.4f}" if values.get(m) is not None else f"{'outside':>14}" for m in metrics]
            lines.append("  ".join([f"{name:<24}", *cells]))
    return "\n".join(lines)


def plot(curves: list[Curve], path: str | Path, title: str = "") -> None:
    """One panel per metric, bpp on x; published curves dashed. Writes a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = merge(curves)
    metrics = [m for m in COMPARED if any(m in c.results for c in curves)]
    cols = min(4, len(metrics))
    rows = -(-len(metrics) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax, m in zip(axes.flat, metrics):
        for c in curves:
            y = c.values(m)
            if y is None:
                continue
            ax.plot(c.bpp, y, "--" if c.published else "-", marker="o", markersize=4, label=c.name)
        ax.set_title(f"{TITLES[m]} ({'higher' if HIGHER_IS_BETTER[m] else 'lower'} is better)", fontsize=10)
        ax.set_xlabel("bpp")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    legend = {label: h for ax in axes.flat for h, label in zip(*ax.get_legend_handles_labels())}
    handles, labels = list(legend.values()), list(legend)
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.06 + 0.02 * (len(labels) > 4), 1, 1))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    write_atomic(path, buf.getvalue())
