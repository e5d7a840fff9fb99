"""The pretrained backbones of the perceptual metrics: found on this machine, checked, never downloaded.

LPIPS, DISTS, FID and KID run networks pretrained on ImageNet: torchvision's AlexNet and VGG16
(LPIPS; DISTS uses the same VGG16) and torch-fidelity's port of TensorFlow's InceptionV3 (FID,
KID). Their libraries download these files into torch's hub cache on first use; evaluation
machines often have no network, so here nothing is downloaded. Each file is looked up by the
name the library downloads it under, first in a folder the user names, then in the hub cache
(`$TORCH_HOME/hub/checkpoints`). A metric whose file is missing is skipped, with a message that
names the file and where it comes from.

The small heads that sit on the backbones (LPIPS's linear layers, DISTS's alpha and beta) ship
inside torchmetrics and need nothing.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch


class MissingWeights(Exception):
    """A backbone's weight file is not on this machine (the metric is skipped, not failed)."""


class WeightsError(ValueError):
    """A backbone's weight file is there but is not a plain file of tensors."""


@dataclass(frozen=True)
class Backbone:
    what: str
    file: str  # the name the library downloads it under, and looks it up by in the hub cache
    url: str


ALEXNET = Backbone("torchvision's AlexNet (ImageNet)", "alexnet-owt-7be5be79.pth",
                   "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth")
VGG16 = Backbone("torchvision's VGG16 (ImageNet)", "vgg16-397923af.pth",
                 "https://download.pytorch.org/models/vgg16-397923af.pth")
INCEPTION = Backbone("torch-fidelity's InceptionV3 (TensorFlow's FID network)", "weights-inception-2015-12-05-6726825d.pth",
                     "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                     "weights-inception-2015-12-05-6726825d.pth")


def hub_checkpoints() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def find(backbone: Backbone, folder: str | Path | None = None) -> Path:
    """The backbone's weight file: `folder`/<file> if a folder is given, then torch's hub cache.

    Raises MissingWeights (naming the file, where it was looked for and where it comes from), or
    WeightsError when the file is not a plain pickle of tensors (checked with torch's
    weights-only unpickler, so a file that would run code when the library loads it is refused
    before the library sees it)."""
    where = ([Path(folder)] if folder is not None else []) + [hub_checkpoints()]
    for d in where:
        path = d / backbone.file
        if path.is_file():
            check(path)
            return path
    raise MissingWeights(f"{backbone.what} weights not found: needs {backbone.file} in "
                         f"{' or '.join(str(d) for d in where)} (published at {backbone.url})")


def check(path: Path) -> None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # the unpickler raises many types for a bad or hostile file
        raise WeightsError(f"{path}: not a plain file of tensors ({type(e).__name__}: {str(e).splitlines()[0]})") from e
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: not a state dict (a dict of tensors)")


def _no_download(url: str, *args: object, **kwargs: object) -> None:
    raise MissingWeights(f"the metric library asked to download {url}: nothing is downloaded here "
                         f"(put the file in the weights folder)")


@contextlib.contextmanager
def hub_holding(paths: list[Path]) -> Iterator[None]:
    """Point torch's hub cache at a temporary folder that holds exactly `paths` (links), so the
    libraries load the checked files by their own code path and can find nothing else; a
    download they would start instead (a library release that asks for another file) raises
    MissingWeights at once rather than waiting on a network that evaluation machines lack."""
    # torch.hub keeps an explicit choice in `_hub_dir` (None: follow $TORCH_HOME); restore exactly
    # that, so the redirection leaves no trace in the process.
    previous = getattr(torch.hub, "_hub_dir", None)
    download = torch.hub.download_url_to_file
    tmp = Path(tempfile.mkdtemp(prefix="osdiff-hub-"))
    try:
        (tmp / "checkpoints").mkdir()
        for p in paths:
            (tmp / "checkpoints" / p.name).symlink_to(p.resolve())
        torch.hub.set_dir(str(tmp))
        torch.hub.download_url_to_file = _no_download
        yield
    finally:
        torch.hub.download_url_to_file = download
        torch.hub._hub_dir = previous
        shutil.rmtree(tmp, ignore_errors=True)


# Kept alive for the whole process: the operator schemas below exist as long as this object does.
_torchvision_schemas: torch.library.Library | None = None


def import_torchvision() -> None:
    """Import torchvision before any metric library does, also where its C++ operators cannot load.

    PyPI's torchvision wheels for Linux are built against the CUDA build of torch; beside the CPU
    build (pinned on the CI machines) their C++ extension fails to load. torchvision copes with
    that (its operators then raise when called), except that its `_meta_registrations` (0.28 and
    0.29 at least) registers a fake kernel for `torchvision::nms` unconditionally and so fails the
    whole import with "operator torchvision::nms does not exist". torchmetrics, torch-fidelity and
    lpips import torchvision at import time, so none of them would import. Here the two schemas
    that registration expects (`nms`, `qnms`, as torchvision declares them) are declared without
    any kernel and the import is repeated: the metric backbones (AlexNet, VGG16) are plain torch
    modules and run as usual; torchvision's detection operators keep raising torchvision's own
    "Couldn't load custom C++ ops" error, and none of them is used here. With a torchvision that
    matches torch nothing of this runs."""
    global _torchvision_schemas
    try:
        import torchvision  # noqa: F401
        return
    except ImportError:
        return  # no torchvision at all: the metrics that need it say so when they are built
    except RuntimeError as e:
        if "torchvision::nms does not exist" not in str(e):
            raise
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]
    _torchvision_schemas = torch.library.Library("torchvision", "DEF")
    _torchvision_schemas.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _torchvision_schemas.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    import torchvision  # noqa: F401,F811
