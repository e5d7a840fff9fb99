"""Distortion and perception of a decoded image against its original, and FID/KID over a set.

Every number comes from a well-kept library, called the way the field calls it:

| key | metric | computed by | on |
|---|---|---|---|
| psnr-rgb | PSNR | `osdiff.files.psnr` (10 log10(255^2 / MSE), CompressAI's eval formula) | 8-bit RGB, every pixel and channel |
| ms-ssim-rgb | MS-SSIM | pytorch-msssim `ms_ssim(data_range=255)`, as CompressAI's eval | 8-bit RGB values as floats |
| ms-ssim-rgb-db | MS-SSIM in dB | -10 log10(1 - MS-SSIM) | |
| lpips-alex, lpips-vgg | LPIPS v0.1 (Zhang et al. 2018) | torchmetrics `LearnedPerceptualImagePatchSimilarity` | RGB in [0, 1] |
| dists | DISTS (Ding et al. 2020) | torchmetrics `DISTSNetwork` | RGB in [0, 1] |
| fid, kid, kid-std | FID, KID | torchmetrics `FrechetInceptionDistance`, `KernelInceptionDistance` (torch-fidelity's InceptionV3) | 256x256 patches of the set (HiFiC's protocol, see `patches`) |

The whole image goes into every metric as it is: never padded, never resized. A metric that
cannot run is skipped with its reason in `skipped` (its backbone weights are missing, or an image
is too small for it: MS-SSIM's five scales need more than 160 pixels on the shorter side); a
skipped metric has no value anywhere, never a stand-in.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from osdiff.evaluation.weights import ALEXNET, INCEPTION, VGG16, Backbone, MissingWeights, WeightsError, find, hub_holding, import_torchvision
from osdiff.files import psnr

# Which way is better, per metric key (the BD-rate and the plots need it).
HIGHER_IS_BETTER = {"psnr-rgb": True, "ms-ssim-rgb": True, "ms-ssim-rgb-db": True, "lpips-alex": False,
                    "lpips-vgg": False, "dists": False, "fid": False, "kid": False}
PER_IMAGE = ("psnr-rgb", "ms-ssim-rgb", "ms-ssim-rgb-db", "lpips-alex", "lpips-vgg", "dists")
PER_SET = ("fid", "kid", "kid-std")

# pytorch-msssim's default: 11x11 windows at five scales (four 2x downsamplings)
MS_SSIM_MIN_SIDE = (11 - 1) * 2**4 + 1

PATCH = 256

# LPIPS-VGG keeps five VGG16 feature maps of both images: about 2.5 GB per megapixel measured on
# the CPU. Larger images are refused up front with a clear error rather than run out of memory.
MAX_NETWORK_PIXELS = 2048 * 2048


def ms_ssim_db(value: float) -> float:
    return math.inf if value >= 1 else -10 * math.log10(1 - value)


def to_tensor(image: np.ndarray, device: str | torch.device = "cpu") -> Tensor:
    """H x W x 3 uint8 -> 1 x 3 x H x W float32 in [0, 1]."""
    return torch.tensor(image).permute(2, 0, 1)[None].to(device).float() / 255


def _build(make: Callable[[], Any], backbone: Backbone, weights_dir: str | None, device: str) -> Any:
    """A library's metric module, its backbone loaded by the library's own code from the file
    `weights.find` checked, and nothing else reachable (no download)."""
    path = find(backbone, weights_dir)
    with hub_holding([path]):
        try:
            return make().to(device)
        except RuntimeError as e:  # load_state_dict: missing, unexpected or mis-shaped keys
            raise WeightsError(f"{path}: does not hold {backbone.what}: {str(e).splitlines()[0]}") from e


class ImageMetrics:
    """The per-image metrics of the table above; each network is built once.

    `skipped` maps each metric that cannot run to the reason (a missing weight file is named);
    calling returns the others for one image pair (H x W x 3 uint8 each, the same size)."""

    def __init__(self, weights_dir: str | None = None, device: str = "cpu") -> None:
        import_torchvision()
        import pytorch_msssim
        from torchmetrics.functional.image.dists import DISTSNetwork
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

        self.device = device
        self.skipped: dict[str, str] = {}
        self._ms_ssim = pytorch_msssim.ms_ssim
        self._nets: dict[str, Any] = {}
        builders = {
            "lpips-alex": (lambda: LearnedPerceptualImagePatchSimilarity(net_type="alex", normalize=True), ALEXNET),
            "lpips-vgg": (lambda: LearnedPerceptualImagePatchSimilarity(net_type="vgg", normalize=True), VGG16),
            "dists": (DISTSNetwork, VGG16),
        }
        for key, (make, backbone) in builders.items():
            try:
                self._nets[key] = _build(make, backbone, weights_dir, device)
            except (MissingWeights, WeightsError, ModuleNotFoundError) as e:
                self.skipped[key] = str(e)

    def check_sizes(self, sizes: list[tuple[int, int]], names: list[str]) -> None:
        """ValueError naming the first image too large for the networks (when any runs)."""
        for (h, w), name in zip(sizes, names):
            if self._nets and h * w > MAX_NETWORK_PIXELS:
                raise ValueError(f"{name}: {w}x{h} is over the {MAX_NETWORK_PIXELS / 1e6:.1f} megapixels LPIPS and "
                                 f"DISTS are run on (about 2.5 GB per megapixel); use --protocol clic768 or smaller images")

    def __call__(self, original: np.ndarray, decoded: np.ndarray, name: str = "an image") -> dict[str, float]:
        """Metric key -> value for this pair; a key is absent when the metric cannot run (its
        reason, naming the first image it could not run on, is then in `skipped`)."""
        if original.shape != decoded.shape:
            raise ValueError(f"decoded image is {decoded.shape[:2]}, the original {original.shape[:2]}")
        self.check_sizes([original.shape[:2]], ["image"])
        out = {"psnr-rgb": psnr(original, decoded)}
        if min(original.shape[:2]) >= MS_SSIM_MIN_SIDE:
            a, b = (torch.tensor(im).permute(2, 0, 1)[None].float() for im in (original, decoded))  # 0..255
            out["ms-ssim-rgb"] = float(self._ms_ssim(a, b, data_range=255, size_average=True))
            out["ms-ssim-rgb-db"] = ms_ssim_db(out["ms-ssim-rgb"])
        else:
            h, w = original.shape[:2]
            reason = (f"needs images of at least {MS_SSIM_MIN_SIDE} pixels on the shorter side; {name} is {w}x{h} "
                      "(the set's mean would leave it out, so the metric is left out for the whole set)")
            self.skipped.setdefault("ms-ssim-rgb", reason)
            self.skipped.setdefault("ms-ssim-rgb-db", reason)
        x, y = to_tensor(original, self.device), to_tensor(decoded, self.device)
        with torch.inference_mode():
            for key, net in self._nets.items():
                if key.startswith("lpips"):
                    net.reset()
                    net.update(y, x)
                    out[key] = float(net.compute())
                else:
                    out[key] = float(net(y, x))
        return out


def patches(image: np.ndarray) -> np.ndarray:
    """HiFiC's FID/KID patches (Mentzer et al. 2020, section 4.1; also PerCo, MS-ILLM): the
    256x256 tiles of a grid from the top-left corner, then of the same grid shifted by 128
    pixels in both directions; only whole tiles. H x W x 3 -> N x 256 x 256 x 3."""
    h, w = image.shape[:2]
    tiles = [image[t : t + PATCH, left : left + PATCH]
             for offset in (0, PATCH // 2)
             for t in range(offset, h - PATCH + 1, PATCH)
             for left in range(offset, w - PATCH + 1, PATCH)]
    return np.stack(tiles) if tiles else np.zeros((0, PATCH, PATCH, 3), np.uint8)


def patch_count(height: int, width: int) -> int:
    return sum(max(0, (height - o) // PATCH) * max(0, (width - o) // PATCH) for o in (0, PATCH // 2))


class PatchFID:
    """FID and KID between the patches of the originals and of the decoded images of a set.

    The originals' Inception features are kept across rate points (`new_point` clears only the
    decoded side). Below `min_patches` patches both are skipped: FID's bias grows as the sample
    shrinks, and KID needs a subset of patches to draw from (subset size min(1000, patches))."""

    def __init__(self, n_patches: int, min_patches: int, weights_dir: str | None = None, device: str = "cpu") -> None:
        self.device = device
        self.skipped: dict[str, str] = {}
        self._fid: Any = None
        self._kid: Any = None
        self._real_done = False
        if n_patches < max(min_patches, 2):
            reason = (f"needs at least {min_patches} patches of {PATCH}x{PATCH} "
                      f"(this set gives {n_patches}; change with --fid-min-patches)")
            self.skipped = dict.fromkeys(PER_SET, reason)
            return
        import_torchvision()
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.kid import KernelInceptionDistance

        try:
            self._fid = _build(lambda: FrechetInceptionDistance(feature=2048, reset_real_features=False),
                               INCEPTION, weights_dir, device)
            self._kid = _build(lambda: KernelInceptionDistance(subset_size=min(1000, n_patches), reset_real_features=False),
                               INCEPTION, weights_dir, device)
        except (MissingWeights, WeightsError, ModuleNotFoundError) as e:
            self.skipped = dict.fromkeys(PER_SET, str(e))
            self._fid = self._kid = None

    @property
    def active(self) -> bool:
        return self._fid is not None

    def new_point(self) -> None:
        if self.active:
            self._fid.reset()
            self._kid.reset()
            self._real_done = self._real_done or self._fid.real_features_num_samples > 0

    def add(self, original: np.ndarray, decoded: np.ndarray) -> None:
        if not self.active:
            return
        with torch.inference_mode():
            for image, real in ((original, True), (decoded, False)):
                if real and self._real_done:
                    continue
                p = torch.tensor(patches(image)).permute(0, 3, 1, 2).to(self.device)
                if len(p):
                    self._fid.update(p, real=real)
                    self._kid.update(p, real=real)

    def compute(self) -> dict[str, float]:
        if not self.active:
            return {}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # KID's random subsets: the same number on every run
            kid_mean, kid_std = self._kid.compute()
        return {"fid": float(self._fid.compute()), "kid": float(kid_mean), "kid-std": float(kid_std)}
