"""Training data: folders of images, or photographs that installed packages ship, as random crops.

The built-in model is trained on photographs bundled in the scikit-image wheel (its
`skimage/data/` folder) and one in matplotlib's (`mpl-data/sample_data/`): no download. Each
is used under the licence its package states:

| file | package | licence | use |
|---|---|---|---|
| astronaut.png | scikit-image | public domain (NASA) | train |
| hubble_deep_field.jpg | scikit-image | public domain (NASA) | train |
| retina.jpg | scikit-image | CC0 1.0 | train |
| ihc.png | scikit-image | no known copyright restrictions | train |
| motorcycle_left.png, motorcycle_right.png | scikit-image | from the Middlebury 2014 stereo datasets (Scharstein et al., GCPR 2014), shipped in the BSD-3 wheel; no other licence stated | train |
| grace_hopper.jpg | matplotlib | public domain (U.S. Navy photograph) | train |
| chelsea.png | scikit-image | CC0 (Stefan van der Walt) | held out |
| coffee.png | scikit-image | CC0 (Rachel Michetti) | held out |
| rocket.jpg | scikit-image | public domain (SpaceX) | held out |

Colour photographs only: with scikit-image's five grey ones (camera, coins, brick, grass,
gravel) as 45 % of the crops, the autoencoder first learns to answer in grey, and 500 steps in
it still reconstructed held-out photos without colour (17.4 dB; 19.2 dB without them).
The held-out three are never cropped for training; evaluation uses them whole.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from osdiff.files import read_image

TRAIN_PHOTOS = ("astronaut.png", "hubble_deep_field.jpg", "retina.jpg", "ihc.png", "motorcycle_left.png",
                "motorcycle_right.png", "grace_hopper.jpg")
HELD_OUT_PHOTOS = ("chelsea.png", "coffee.png", "rocket.jpg")
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
    vertical flip. Images smaller than the crop are skipped."""

    SCALES = (1.0, 0.75, 0.5)

    def __init__(self, images: list[np.ndarray], crop: int, batch: int, seed: int):
        self.crop, self.batch = crop, batch
        self.rng = np.random.default_rng(seed)
        self.pyramid = [[_resize(im, s) for s in self.SCALES] for im in images]
        self.pyramid = [[im for im in levels if min(im.shape[:2]) >= crop] for levels in self.pyramid]
        self.pyramid = [levels for levels in self.pyramid if levels]
        if not self.pyramid:
            raise ValueError(f"no image is at least {crop}x{crop}")

    def __iter__(self) -> "RandomCrops":
        return self

    def __next__(self) -> torch.Tensor:
        """B x 3 x crop x crop float32 in [0, 1]."""
        out = np.empty((self.batch, self.crop, self.crop, 3), dtype=np.uint8)
        for i in range(self.batch):
            levels = self.pyramid[self.rng.integers(len(self.pyramid))]
            im = levels[self.rng.integers(len(levels))]
            top = self.rng.integers(im.shape[0] - self.crop + 1)
            left = self.rng.integers(im.shape[1] - self.crop + 1)
            patch = im[top: top + self.crop, left: left + self.crop]
            if self.rng.random() < 0.5:
                patch = patch[:, ::-1]
            if self.rng.random() < 0.5:
                patch = patch[::-1]
            out[i] = patch
        return torch.from_numpy(out).permute(0, 3, 1, 2).float() / 255.0


def _resize(im: np.ndarray, scale: float) -> np.ndarray:
    if scale == 1.0:
        return im
    h, w = im.shape[:2]
    return np.asarray(Image.fromarray(im).resize((round(w * scale), round(h * scale)), Image.LANCZOS))
