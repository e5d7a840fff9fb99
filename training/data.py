"""Training data: folders of images, or photographs that installed packages ship, as random crops.

The built-in model is trained on photographs bundled in the scikit-image wheel (its
`skimage/data/` folder) and one in matplotlib's (`mpl-data/sample_data/`), and on the pictures of
two Debian wallpaper packages (training/wallpapers.py: licences and authors there; fetched with
apt-get, never committed). The wheels' photographs, each used under the licence its package states:

| file | package | licence | use |
|---|---|---|---|
| astronaut.png | scikit-image | public domain (NASA) | held out (skin; trained on until issue 29) |
| hubble_deep_field.jpg | scikit-image | public domain (NASA) | train |
| retina.jpg | scikit-image | CC0 1.0 | train |
| ihc.png | scikit-image | no known copyright restrictions | train |
| motorcycle_left.png, motorcycle_right.png | scikit-image | from the Middlebury 2014 stereo datasets (Scharstein et al., GCPR 2014), shipped in the BSD-3 wheel; no other licence stated | train |
| grace_hopper.jpg | matplotlib | public domain (U.S. Navy photograph) | train |
| chelsea.png | scikit-image | CC0 (Stefan van der Walt) | held out |
| coffee.png | scikit-image | CC0 (Rachel Michetti) | held out |
| rocket.jpg | scikit-image | public domain (SpaceX) | held out |

The wallpaper packages (Debian 12), fetched by `make photos`: plasma-workspace-wallpapers
(GPL-2+; its photographs LGPL-3, one CC-BY-SA-4.0) and ukui-wallpapers (CC-BY-SA-3.0); each
picture's author, licence and use (train or held out) in training/wallpapers.py WALLPAPERS.

Colour photographs from the wheels only: with scikit-image's five grey ones (camera, coins, brick, grass,
gravel) as 45 % of the crops, the autoencoder first learns to answer in grey, and 500 steps in
it still reconstructed held-out photos without colour (17.4 dB; 19.2 dB without them). Two of
the wallpaper photographs are nearly grey (ColdRipple, Grey): 12 % of the crops.
The held-out photographs are never cropped for training; evaluation uses them whole. The
held-out set (HELD_OUT_SET) is the scikit-image four and the eight held-out wallpaper photographs:
foliage, sky, water, skin and man-made scenes. HELD_OUT_PHOTOS, the first three, is the trio the
model was first measured on.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from osdiff.files import read_image
from osdiff.training import wallpapers
from osdiff.training.wallpapers import WALLPAPERS

TRAIN_PHOTOS = ("hubble_deep_field.jpg", "retina.jpg", "ihc.png", "motorcycle_left.png",
                "motorcycle_right.png", "grace_hopper.jpg")
HELD_OUT_PHOTOS = ("chelsea.png", "coffee.png", "rocket.jpg")
HELD_OUT_SET = HELD_OUT_PHOTOS + ("astronaut.png",) + tuple(w.name for w in WALLPAPERS if w.held_out)
_FOLDERS = (("skimage", "data"), ("matplotlib", "mpl-data/sample_data"))


def bundled_photo(name: str) -> np.ndarray:
    """A photograph that scikit-image's or matplotlib's wheel ships, as H x W x 3 uint8 (grey
    ones replicated). Raises FileNotFoundError naming the packages looked in."""
    for package, folder in _FOLDERS:
        try:
            path = resources.files(package) / folder / name
        except ModuleNotFoundError:
            continue
        if path.is_file():
            with resources.as_file(path) as p:
                return read_image(p)
    raise FileNotFoundError(f"{name}: not among the photographs of scikit-image or matplotlib; the built-in "
                            "training data needs both: pip install scikit-image matplotlib (or osdiff-engine[train])")


def held_out_photo(name: str) -> np.ndarray:
    """A photograph of HELD_OUT_SET, H x W x 3 uint8: a wheel's (bundled_photo) or a wallpaper
    (wallpapers.load, which raises FileNotFoundError when they were not fetched)."""
    return wallpapers.load(name) if name in wallpapers.BY_NAME else bundled_photo(name)


def builtin_training_images(log=print) -> tuple[list[str], list[np.ndarray], list[bool]]:
    """The built-in recipe's training pictures: (names, H x W x 3 uint8 images, is a photograph).
    The wheels' TRAIN_PHOTOS always; the wallpapers not held out when fetched (else it says so)."""
    names = list(TRAIN_PHOTOS)
    images = [bundled_photo(n) for n in names]
    photo = [True] * len(names)
    if wallpapers.available():
        for w in WALLPAPERS:
            if not w.held_out:
                names.append(w.name)
                images.append(wallpapers.load(w.name))
                photo.append(w.photo)
        log(f"  training pictures: {len(TRAIN_PHOTOS)} from the wheels, {len(names) - len(TRAIN_PHOTOS)} from the "
            f"wallpaper packages in {wallpapers.photo_dir()}")
    else:
        log(f"  training pictures: the wheels' {len(TRAIN_PHOTOS)} only; {wallpapers.missing_message()}")
    return names, images, photo


def folder_images(folder: str | Path) -> list[np.ndarray]:
    exts = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
    paths = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in exts)
    if not paths:
        raise ValueError(f"no images in {folder}")
    return [read_image(p) for p in paths]


class RandomCrops:
    """Batches of random crops from a fixed set of images, seeded: the same seed gives the
    same batches. Each crop: a random image (all equally likely: by area, two large dark
    astronomy and retina photos would fill most batches), a random
    scale (1, 3/4 or 1/2: more content per crop), a random position, a random horizontal and
    vertical flip. Images smaller than the crop are skipped.

    weights: how likely each image is (default: all alike). colour: jitter half the crops'
    colours (colour_jitter), so that no hue is rare in training."""

    SCALES = (1.0, 0.75, 0.5)

    def __init__(self, images: list[np.ndarray], crop: int, batch: int, seed: int,
                 weights: list[float] | None = None, colour: bool = False):
        self.crop, self.batch, self.colour = crop, batch, colour
        self.rng = np.random.default_rng(seed)
        pyramid = [[_resize(im, s) for s in self.SCALES] for im in images]
        pyramid = [[im for im in levels if min(im.shape[:2]) >= crop] for levels in pyramid]
        keep = [i for i, levels in enumerate(pyramid) if levels]
        if not keep:
            raise ValueError(f"no image is at least {crop}x{crop}")
        self.pyramid = [pyramid[i] for i in keep]
        self.p = None
        if weights is not None:
            w = np.asarray([weights[i] for i in keep], dtype=np.float64)
            self.p = w / w.sum()

    def __iter__(self) -> "RandomCrops":
        return self

    def __next__(self) -> torch.Tensor:
        """B x 3 x crop x crop float32 in [0, 1]."""
        out = np.empty((self.batch, self.crop, self.crop, 3), dtype=np.uint8)
        for i in range(self.batch):
            pick = self.rng.integers(len(self.pyramid)) if self.p is None else self.rng.choice(len(self.p), p=self.p)
            levels = self.pyramid[pick]
            im = levels[self.rng.integers(len(levels))]
            top = self.rng.integers(im.shape[0] - self.crop + 1)
            left = self.rng.integers(im.shape[1] - self.crop + 1)
            patch = im[top: top + self.crop, left: left + self.crop]
            if self.rng.random() < 0.5:
                patch = patch[:, ::-1]
            if self.rng.random() < 0.5:
                patch = patch[::-1]
            if self.colour and self.rng.random() < 0.5:
                patch = colour_jitter(patch, self.rng)
            out[i] = patch
        return torch.from_numpy(out).permute(0, 3, 1, 2).float() / 255.0


def colour_jitter(patch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """H x W x 3 uint8 -> the same with its hue rotated by a uniform angle about the grey axis,
    its saturation scaled by 2^U(-1/2, 1/2) and its brightness by 2^U(-1/4, 1/4): one 3 x 3
    colour matrix. The training photos' foliage is mostly autumn-orange; rotated, it is every
    other hue too (issue 29: greens decoded brown, skies over-saturated)."""
    angle = rng.uniform(-np.pi, np.pi)
    saturation, brightness = 2 ** rng.uniform(-0.5, 0.5), 2 ** rng.uniform(-0.25, 0.25)
    axis = np.ones(3) / np.sqrt(3)
    grey = np.outer(axis, axis)  # projection on the grey axis
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rotation = grey + np.cos(angle) * (np.eye(3) - grey) + np.sin(angle) * cross  # Rodrigues
    m = brightness * (grey + saturation * (rotation - grey))
    out = patch.astype(np.float32) @ m.T.astype(np.float32)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _resize(im: np.ndarray, scale: float) -> np.ndarray:
    if scale == 1.0:
        return im
    h, w = im.shape[:2]
    return np.asarray(Image.fromarray(im).resize((round(w * scale), round(h * scale)), Image.LANCZOS))
