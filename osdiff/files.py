"""Reading images and writing outputs for the command line.

Outputs are written to a temporary file in the destination folder and renamed into place, so
a failure or an interrupted run never leaves a partial file under the final name.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


class ImageError(ValueError):
    """An input image cannot be read."""


def read_image(path: str | Path) -> np.ndarray:
    """Any image Pillow reads (PNG, JPEG, ...) -> H x W x 3 uint8 RGB, EXIF orientation applied;
    alpha is dropped and grayscale or palette images are converted."""
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except (UnidentifiedImageError, Image.DecompressionBombError) as e:
        raise ImageError(f"{path}: not a readable image: {e}") from e
    except OSError as e:
        raise ImageError(f"{path}: cannot read image: {e}") from e


def write_atomic(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def read_manifest(directory: str | Path, fmt: str, version: int, error: type[Exception], remedy: str) -> dict[str, Any]:
    """A directory's manifest.json, checked to be of format `fmt` at `version`."""
    d = Path(directory)
    try:
        manifest = json.loads((d / "manifest.json").read_text())
    except (OSError, ValueError) as e:
        raise error(f"{d}: not an {fmt} directory (no readable manifest.json): {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != fmt or manifest.get("format_version") != version:
        got = f"{manifest.get('format')} v{manifest.get('format_version')}" if isinstance(manifest, dict) else "unknown"
        raise error(f"{d}: manifest format {got} is not {fmt} v{version}; {remedy}")
    return manifest
