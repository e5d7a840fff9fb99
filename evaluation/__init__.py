"""Rate, distortion and perception of image codecs on image sets, reported as the field reports them.

    protocols.py  how a test set's images are prepared (Kodak as is, CLIC 2020 at 768x768)
    codecs.py     the codecs under test, one rate point each: OSDiff, Pillow's JPEG and WebP
    metrics.py    PSNR, MS-SSIM, LPIPS, DISTS per image; FID and KID over 256x256 patches
    weights.py    the metric backbones' weight files: found locally, checked, never downloaded
    run.py        one evaluation: streams written, bpp from their sizes, CSV and CompressAI JSON
    compare.py    BD-rates and RD plots of several results files

`osdiff eval` (osdiff/cli/evaluate.py) calls run.py, and compare.py with --compare. Needs the `eval`
extra: pip install "osdiff-engine[eval]".
"""

import importlib.util

# The modules of the `eval` extra (pyproject.toml), by import name.
EXTRA_MODULES = ("torchmetrics", "torch_fidelity", "pytorch_msssim", "bjontegaard", "matplotlib")


def missing_modules() -> list[str]:
    """The eval extra's modules that are not installed (looked up, not imported: torchmetrics
    must not be imported before weights.import_torchvision)."""
    return [m for m in EXTRA_MODULES if importlib.util.find_spec(m) is None]
