"""How each test set's images are prepared before they are coded, as the papers prepare them.

    none     every image as it is
    kodak    as it is; checks that every image is 768x512 or 512x768 (the Kodak set)
    clic768  CLIC 2020: resize so that the shorter side is 768, then center-crop 768x768

clic768 follows the evaluations OSDiff compares with (PerCo, MS-ILLM), which prepare CLIC 2020
with torchvision's Resize(768) and CenterCrop(768) on PIL images: bilinear resampling (Pillow's,
antialiased), the longer side truncated to int(768 * long / short), the crop offset rounded.
The same arithmetic is written here with Pillow alone.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

PROTOCOLS = ("none", "kodak", "clic768")
CLIC_SIDE = 768


def prepare(image: np.ndarray, protocol: str, name: str = "image") -> np.ndarray:
    """H x W x 3 uint8 -> the image the protocol codes. Raises ValueError for an unknown
    protocol or, with kodak, an image of another size."""
    h, w = image.shape[:2]
    if protocol == "none":
        return image
    if protocol == "kodak":
        if (h, w) not in ((512, 768), (768, 512)):
            raise ValueError(f"{name}: {w}x{h} is not a Kodak image (768x512 or 512x768); use --protocol none")
        return image
    if protocol == "clic768":
        s = CLIC_SIDE
        size = (s, int(s * h / w)) if w <= h else (int(s * w / h), s)  # (width, height)
        im = Image.fromarray(image)
        if size != (w, h):
            im = im.resize(size, Image.BILINEAR)
        left, top = int(round((size[0] - s) / 2.0)), int(round((size[1] - s) / 2.0))
        return np.asarray(im.crop((left, top, left + s, top + s)), dtype=np.uint8).copy()
    raise ValueError(f"unknown protocol {protocol!r} (one of {', '.join(PROTOCOLS)})")
