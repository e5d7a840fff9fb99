"""Reading images and writing outputs for the command line.

Outputs are written to a temporary file in the destination folder and renamed into place, so
a failure or an interrupted run never leaves a partial file under the final name.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


class ImageError(ValueError):
    """An input image cannot be read, or has no defined 8-bit RGB meaning."""


class ImageWarning(UserWarning):
    """An input image was converted by a rule that changes what it shows (transparency
    composited, frames after the first dropped); the CLI prints it as a note."""


def read_image(path: str | Path) -> np.ndarray:
    """Any image Pillow reads (PNG, JPEG, TIFF, ...) -> H x W x 3 uint8 RGB, EXIF orientation
    applied. The rules (README, "Inputs"):

    - 8-bit images: as stored; grayscale, palette, CMYK, YCbCr, ... converted to RGB by Pillow.
    - 16 bits per sample: v -> round(v / 257), so that a 16-bit image holding exactly
      257 x an 8-bit image gives that 8-bit image (and the same stream). Pillow keeps only the
      high byte of 16-bit colour PNGs, so those are decoded with pypng instead; 16-bit colour
      in other formats (TIFF, PPM) is refused for the same reason. A PGM with maxval > 255 is
      read by Pillow as mode I scaled to 0..65535, and taken as 16-bit.
    - float (Pillow mode F): values in [0, 1] -> round(v * 255); anything outside [0, 1] or
      not finite is refused (no defined mapping: HDR, depth maps, ...).
    - 32-bit integer images (mode I) are refused: they have no defined range.
    - alpha: composited over white, round((c a + 255 (255 - a)) / 255); an ImageWarning says
      so when any pixel is not opaque (an opaque alpha channel changes nothing).
    - several frames (GIF, multi-page TIFF, ...): the first frame, with an ImageWarning.

    Raises ImageError.
    """
    try:
        with Image.open(path) as im:
            frames = getattr(im, "n_frames", 1)
            if frames > 1:
                warnings.warn(f"{path}: {frames} frames; only the first is coded", ImageWarning, stacklevel=2)
            rgba = _png16(path, im) if _is_16bit_colour(im) else _to_rgba(ImageOps.exif_transpose(im), path, im.format)
    except Image.DecompressionBombError as e:
        raise ImageError(f"{path}: refused for its size: {e}") from e
    except UnidentifiedImageError as e:
        raise ImageError(f"{path}: not a readable image: {e}") from e
    except (OSError, SyntaxError) as e:  # Pillow raises SyntaxError for some corrupt headers
        raise ImageError(f"{path}: cannot read image: {e}") from e
    if rgba.shape[2] == 3:
        return rgba
    alpha = rgba[..., 3:].astype(np.uint32)
    if (alpha < 255).any():
        warnings.warn(f"{path}: transparent pixels composited over white", ImageWarning, stacklevel=2)
    rgb = (rgba[..., :3].astype(np.uint32) * alpha + 255 * (255 - alpha) + 127) // 255
    return rgb.astype(np.uint8)


def _is_16bit_colour(im: Image.Image) -> bool:
    """Pillow decodes 16-bit colour (and gray + alpha) to 8 bits by dropping the low byte, and
    colour PPMs with maxval > 255 to 8 bits by truncating v * 255 / maxval."""
    args = im.tile[0].args if im.tile else ""
    if im.format == "PPM" and im.mode == "RGB":
        return isinstance(args, tuple) and len(args) == 2 and isinstance(args[1], int) and args[1] > 255
    rawmode = args if isinstance(args, str) else args[0] if isinstance(args, tuple) and args else ""
    return isinstance(rawmode, str) and ";16" in rawmode and im.mode not in ("I", "I;16", "I;16B", "I;16L", "I;16N")


def _png16(path: str | Path, im: Image.Image) -> np.ndarray:
    if im.format != "PNG":
        raise ImageError(f"{path}: 16-bit colour {im.format} images are not supported (Pillow cuts them to 8 bits "
                         "without rounding); save it as a 16-bit PNG or convert it to 8 bits")
    import png  # pypng: reads every sample at full depth

    width, height, rows, info = png.Reader(filename=str(path)).asDirect()
    planes = info["planes"]
    v = np.vstack([np.asarray(r, dtype=np.uint32) for r in rows]).reshape(height, width, planes)
    v8 = ((2 * v + 257) // 514).astype(np.uint8)  # round(v / 257)
    if planes <= 2:  # gray (+ alpha)
        v8 = np.concatenate([v8[..., :1]] * 3 + [v8[..., 1:]], axis=2)
    # EXIF orientation, applied as ImageOps.exif_transpose applies it
    method = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
              5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}.get(im.getexif().get(0x0112, 1))
    return v8 if method is None else np.asarray(Image.fromarray(v8).transpose(method))


def _to_rgba(im: Image.Image, path: str | Path, fmt: str | None) -> np.ndarray:
    """H x W x 3 (or x 4 with alpha) uint8, by the rules of read_image; fmt: the file's format
    (`im` may be a transposed copy, which has none)."""
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N") or (mode == "I" and fmt == "PPM"):
        v = np.asarray(im).astype(np.uint32)
        return np.repeat(((2 * v + 257) // 514).astype(np.uint8)[..., None], 3, axis=2)
    if mode == "F":
        v = np.asarray(im, dtype=np.float64)
        if not np.isfinite(v).all():
            raise ImageError(f"{path}: a float image with {np.count_nonzero(~np.isfinite(v))} NaN or infinite "
                             "values; only [0, 1] has a defined 8-bit mapping")
        if v.min(initial=0) < 0 or v.max(initial=0) > 1:
            raise ImageError(f"{path}: a float image with values outside [0, 1] "
                             f"(min {v.min():.4g}, max {v.max():.4g}); only [0, 1] has a defined 8-bit mapping")
        return np.repeat(np.rint(v * 255).astype(np.uint8)[..., None], 3, axis=2)
    if mode in ("I", "I;32", "I;32B", "I;32L"):
        raise ImageError(f"{path}: a 32-bit integer image (mode {mode}) has no defined range; "
                         "convert it to 8 or 16 bits")
    has_alpha = mode in ("RGBA", "RGBa", "LA", "La", "PA") or (mode == "P" and "transparency" in im.info) \
        or (mode in ("L", "RGB") and "transparency" in im.info)
    return np.asarray(im.convert("RGBA" if has_alpha else "RGB"), dtype=np.uint8).copy()


def write_atomic(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder and a rename: a
    failure leaves no partial file. The file gets the mode a new file gets (0666 less the
    umask: 0644 under umask 022), as other tools' outputs."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        # tempfile.mkstemp would create it 0600; os.open lets the umask decide
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
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
