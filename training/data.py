"""Training data: folders of images, or the photographs scikit-image ships, as random crops.

The built-in model is trained on the photographs bundled in the scikit-image wheel (its
`skimage/data/` folder: no download), each used under the licence its docstring states:

| file | licence | use |
|---|---|---|
| astronaut.png | public domain (NASA) | train |
| hubble_deep_field.jpg | public domain (NASA) | train |
| retina.jpg | CC0 1.0 | train |
| ihc.png | no known copyright restrictions | train |
| camera.png | CC0 (Lav Varshney) | train (grey, as RGB) |
| coins.png | no known copyright restrictions | train (grey, as RGB) |
| brick.png, grass.png, gravel.png | CC0 (cc0textures.com) | train (grey, as RGB) |
| chelsea.png | CC0 (Stefan van der Walt) | held out |
| coffee.png | CC0 (Rachel Michetti) | held out |
| rocket.jpg | public domain (SpaceX) | held out |

The held-out three are never cropped for training; evaluation uses them whole.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from osdiff.files import read_image

TRAIN_PHOTOS = ("astronaut.png", "hubble_deep_field.jpg", "retina.jpg", "ihc.png", "camera.png", "coins.png",
                "brick.png", "grass.png", "gravel.png")
HELD_OUT_PHOTOS = ("chelsea.png", "coffee.png", "rocket.jpg")


def skimage_photo(name: str) -> np.ndarray:
    """A photograph of scikit-image's wheel as H x W x 3 uint8 (grey ones replicated)."""
    try:
        folder = resources.files("skimage") / "data"
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError("the built-in training data is scikit-image's bundled photographs: "
                                  "pip install scikit-image (or osdiff-engine[train])") from e
    with resources.as_file(folder / name) as path:
        return read_image(path)


def folder_images(folder: str | Path) -> list[np.ndarray]:
    exts = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
    paths = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in exts)
    if not paths:
        raise ValueError(f"no images in {folder}")
    return [read_image(p) for p in paths]


class RandomCrops:
    """Batches of random crops from a fixed set of images, seeded: the same seed gives the
    same batches. Each crop: a random image (chance proportional to its area), a random
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
        area = np.array([levels[0].shape[0] * levels[0].shape[1] for levels in self.pyramid], dtype=np.float64)
        self.weights = area / area.sum()

    def __iter__(self) -> "RandomCrops":
        return self

    def __next__(self) -> torch.Tensor:
        """B x 3 x crop x crop float32 in [0, 1]."""
        out = np.empty((self.batch, self.crop, self.crop, 3), dtype=np.uint8)
        for i in range(self.batch):
            levels = self.pyramid[self.rng.choice(len(self.pyramid), p=self.weights)]
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
