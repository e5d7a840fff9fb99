"""Calibration images: the photographs whose real activations set the INT8/FP8 ranges.

Default: the built-in model's training photographs (default_photos): the six from scikit-image's
and matplotlib's wheels (training/data.py TRAIN_PHOTOS), then, when fetched (`make photos`), the
four wallpaper photographs it trained on (moss, a pier in fog, a facade, a lake at night; the
wheels' six show no open water or sky), in an order that makes a portrait and the two with water
and sky the validation pictures (DEFAULT_PHOTOS). Never an evaluation image: the held-out set (training/data.py
HELD_OUT_SET: four scikit-image photographs and eight wallpaper photographs) and the bundled demo
photo (a crop of chelsea) are refused, all named in one message: by pixel content, by file (a
held-out wallpaper's original under any name) and by the wheels' file names, because a quality
figure measured on the images that set the ranges would flatter the quantization.

Each image gives `crops` square crops of `size` pixels:
the whole picture scaled so that its shorter side is `size`, centre-cropped (the image's overall
content), then centre crops at native resolution (its fine texture), so that the ranges see both.

`load_calibration_set` also keeps every third image out of the ranges (VALIDATION_EVERY) and
gives it whole, scaled down to `measure_size` on its longer side: what a quantized graph costs is
measured there.
Measured on the images that set the ranges, the cost is flattered by up to a hundredfold (the
built-in model's UNet output blocks: 0.002 dB on their own 256-pixel calibration crops, 0.28 dB
on whole photographs they had not seen), and the skip list follows from the wrong numbers.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image

from osdiff.files import ImageError, read_image

# at least this many images: percentile and entropy calibrators estimate the tails of the
# activation histograms, which a couple of pictures do not show
MIN_IMAGES = 6
# images[VALIDATION_EVERY - 1 :: VALIDATION_EVERY] validate (load_calibration_set); the others set ranges
VALIDATION_EVERY = 3
_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


class CalibrationError(ValueError):
    """Calibration images that are too few, unreadable, or evaluation images."""


@dataclass(frozen=True)
class CalibrationImage:
    name: str  # file name (or bundled photo name) and crop, e.g. "retina.jpg@scaled", "ihc.png@whole"
    pixels: np.ndarray  # size x size x 3 uint8 (a crop), or H x W x 3 (a whole validation picture)


@dataclass(frozen=True)
class CalibrationSet:
    crops: list[CalibrationImage]  # what sets the activation ranges
    validation: list[CalibrationImage]  # whole pictures, never in `crops`: what the loss is measured on


def evaluation_images() -> dict[str, np.ndarray]:
    """The images quality is reported on (name -> H x W x 3 uint8): the held-out set, where
    scikit-image is installed and the wallpapers fetched, and the bundled demo photo."""
    from osdiff.training.data import HELD_OUT_SET, held_out_photo

    out = {}
    for name in HELD_OUT_SET:
        try:
            out[name] = held_out_photo(name)
        except (FileNotFoundError, ValueError):
            continue  # not installed or not fetched: the name check below still refuses them
    with resources.as_file(resources.files("osdiff") / "assets" / "demo.png") as demo:
        out["demo.png (the bundled demo photo)"] = read_image(demo)
    return out


def _evaluation_image(label: str, pixels: np.ndarray, evaluation: dict[str, np.ndarray],
                      file_sha256: str | None) -> str | None:
    """Which evaluation image this is (its name), or None. By pixels (the held-out photos as the
    evaluation uses them, the demo photo), by file (a wallpaper's original file under any name:
    its pinned SHA-256), and by the distinctive file names of the wheels' held-out photos and the
    demo photo (not the wallpapers' names: a user's path.jpg or kite.png is not refused for them)."""
    from osdiff.training.data import HELD_OUT_PHOTOS, HELD_OUT_SET
    from osdiff.training.wallpapers import WALLPAPERS

    same = [n for n, ev in evaluation.items() if ev.shape == pixels.shape and np.array_equal(ev, pixels)]
    if same:
        return same[0]
    originals = {w.sha256: w.name for w in WALLPAPERS if w.held_out}
    if file_sha256 in originals:
        return f"{originals[file_sha256]}, a held-out wallpaper photograph"
    stems = {Path(n).stem.lower() for n in HELD_OUT_SET if n.endswith((".png", ".jpg"))} | {"demo"}
    assert {Path(n).stem for n in HELD_OUT_PHOTOS} <= stems
    if Path(label).stem.lower() in stems:
        return "the file name of an evaluation image, not its pixels; rename it if it is not that photo"
    return None


def load_calibration_images(paths: list[str | Path] | None, size: int, crops: int = 1) -> list[CalibrationImage]:
    """Calibration crops of every image: from image files and folders (searched recursively),
    or from the built-in training photographs when `paths` is None or empty.

    Raises CalibrationError: fewer than MIN_IMAGES images, an unreadable image, an evaluation
    image, or an image smaller than `size` on its shorter side.
    """
    _check_crops(size, crops)
    return _cropped(_read(paths), size, crops)


def load_calibration_set(paths: list[str | Path] | None, size: int, crops: int = 1,
                         measure_size: int = 768) -> CalibrationSet:
    """As load_calibration_images, with every VALIDATION_EVERY-th image (in the order read:
    the paths as given, each folder's files sorted by path) kept out of the crops and given
    whole instead, scaled down (never up) so that its longer side is at most `measure_size`
    pixels: the pictures `osdiff calibrate` measures the loss on. Raises CalibrationError as
    load_calibration_images does (a validation picture smaller than `size` once scaled, too), and for a
    `measure_size` under `size`."""
    _check_crops(size, crops)
    if measure_size < size:
        raise CalibrationError(f"--measure-size ({measure_size}) must be at least --crop ({size}): the validation "
                               "pictures are measured at least as large as the crops that set the ranges")
    images = _read(paths)
    held = set(range(VALIDATION_EVERY - 1, len(images), VALIDATION_EVERY))
    validation = []
    for i in sorted(held):
        label, pixels = images[i]
        h, w = pixels.shape[:2]
        k = measure_size / max(h, w)
        if k < 1:
            pixels = np.asarray(Image.fromarray(pixels).resize((round(w * k), round(h * k)), Image.LANCZOS))
        if min(pixels.shape[:2]) < size:  # as a crop would be: too small to say what the graphs lose
            raise CalibrationError(f"{label}: {h}x{w}{f' (scaled to --measure-size {measure_size})' if k < 1 else ''} "
                                   f"is {pixels.shape[0]}x{pixels.shape[1]}, smaller than the {size}x{size} "
                                   "calibration crop; as every third image it is a validation picture (choose a "
                                   "smaller --crop, a larger --measure-size, or another image)")
        validation.append(CalibrationImage(f"{Path(label).name}@whole", pixels))
    return CalibrationSet(_cropped([im for i, im in enumerate(images) if i not in held], size, crops), validation)


def _read(paths: list[str | Path] | None) -> list[tuple[str, np.ndarray]]:
    """(label, H x W x 3 uint8) of every calibration image, checked (see load_calibration_images)."""
    evaluation = evaluation_images()
    images: list[tuple[str, np.ndarray]] = []
    digests: dict[str, str] = {}  # file -> SHA-256 of its bytes
    if not paths:
        images = default_photos()
    else:
        files: list[Path] = []
        for p in map(Path, paths):
            if p.is_dir():
                files += sorted(f for f in p.rglob("*") if f.suffix.lower() in _EXTENSIONS)
            elif p.is_file():
                files.append(p)
            else:
                raise CalibrationError(f"{p}: no such file or folder")
        for f in files:
            try:
                images.append((str(f), read_image(f)))
            except ImageError as e:
                raise CalibrationError(f"calibration image {e}; remove it or give readable images") from e
            digests[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    if len(images) < MIN_IMAGES:
        raise CalibrationError(f"calibration needs at least {MIN_IMAGES} images, got {len(images)}"
                               f"{' in ' + ', '.join(map(str, paths)) if paths else ''}: the activation ranges "
                               "would be set by too little content")
    found = [(label, what) for label, pixels in images
             if (what := _evaluation_image(label, pixels, evaluation, digests.get(label))) is not None]
    if found:
        from osdiff.training.data import HELD_OUT_SET

        raise CalibrationError(
            "evaluation images among the calibration images: " + "; ".join(f"{label} ({what})" for label, what in found)
            + f". Quality is measured on the held-out set ({', '.join(HELD_OUT_SET)}) and the demo photo, so they "
            "never set the quantization ranges: calibrate on other photos (default: the built-in model's training "
            "photos)")
    return images


# The default photos in the order read. Every third validates, so the order chooses the validation
# pictures: a portrait, a pier in fog over water, a lake at night under the sky (with the wallpapers;
# without them, the portrait and a motorcycle). Content like what is compressed: validated on
# microscopy, the portrait and a facade, the built-in model's INT8 kept a UNet block that costs
# skies and water most, and the held-out photos of sea and sky lost 0.012-0.014 MS-SSIM.
DEFAULT_PHOTOS = ("hubble_deep_field.jpg", "retina.jpg", "grace_hopper.jpg", "ihc.png", "motorcycle_left.png",
                  "ColdRipple", "motorcycle_right.png", "OneStandsOut", "DarkestHour", "Grey")


def default_photos() -> list[tuple[str, np.ndarray]]:
    """(name, H x W x 3 uint8) of the default calibration photographs (see the module docstring),
    in DEFAULT_PHOTOS' order: the wheels' TRAIN_PHOTOS and the training wallpapers that are
    photographs, those only if fetched. Raises CalibrationError when the wheels' photos are missing."""
    from osdiff.training import wallpapers
    from osdiff.training.data import TRAIN_PHOTOS, bundled_photo

    fetched = wallpapers.available()
    try:
        return [(name, bundled_photo(name) if name in TRAIN_PHOTOS else wallpapers.load(name))
                for name in DEFAULT_PHOTOS if name in TRAIN_PHOTOS or fetched]
    except FileNotFoundError as e:
        raise CalibrationError(f"the default calibration photos are missing: {e}") from e


def _check_crops(size: int, crops: int) -> None:
    if size <= 0 or crops < 1:
        raise CalibrationError(f"--crop and --crops-per-image must be positive (got {size}, {crops})")


def _cropped(images: list[tuple[str, np.ndarray]], size: int, crops: int) -> list[CalibrationImage]:
    out = []
    for label, pixels in images:
        if min(pixels.shape[:2]) < size:
            raise CalibrationError(f"{label}: {pixels.shape[0]}x{pixels.shape[1]} is smaller than the "
                                   f"{size}x{size} calibration crop (choose a smaller --crop)")
        out += [CalibrationImage(f"{Path(label).name}@{tag}", crop) for tag, crop in _crops(pixels, size, crops)]
    return out


def _crops(pixels: np.ndarray, size: int, count: int) -> list[tuple[str, np.ndarray]]:
    h, w = pixels.shape[:2]
    k = size / min(h, w)
    scaled = np.asarray(Image.fromarray(pixels).resize((max(size, round(w * k)), max(size, round(h * k))), Image.LANCZOS))
    out = [("scaled", _centre(scaled, size, 0.5, 0.5))]
    # native-resolution crops spread along the longer side
    for i in range(1, count):
        f = i / count
        out.append((f"native{i}", _centre(pixels, size, f if h > w else 0.5, 0.5 if h > w else f)))
    return out


def _centre(pixels: np.ndarray, size: int, fy: float, fx: float) -> np.ndarray:
    h, w = pixels.shape[:2]
    top = min(max(round(fy * h - size / 2), 0), h - size)
    left = min(max(round(fx * w - size / 2), 0), w - size)
    return np.ascontiguousarray(pixels[top: top + size, left: left + size])
