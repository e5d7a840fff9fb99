"""Photographs and digital paintings from Debian's wallpaper packages: more, and more varied,
training images for the built-in model, and most of its held-out evaluation set.

The packages (Debian 12 "bookworm"; licences from each package's copyright file and, for KDE's,
each wallpaper's metadata.json):

| package | version | licence |
|---|---|---|
| plasma-workspace-wallpapers | 4:5.27.5-2 | GPL-2+ (package); the photographs LGPL-3 or CC-BY-SA-4.0 (Volna), authors in WALLPAPERS |
| ukui-wallpapers | 20.04.3-1.1 | CC-BY-SA-3.0 (Ubuntu Kylin community contributors) |

Nothing from them is committed but a downscaled contact sheet of the held-out photographs
(benchmarks/results/demo_model_held_out.jpg, with their licences named): `fetch()` (`make photos`, or `python -m osdiff.training.wallpapers
DIR`) downloads both packages with apt-get (no root needed), unpacks them with dpkg-deb and keeps
the files listed in WALLPAPERS, each checked against its SHA-256 (a different package version
would change the training data or the evaluation set silently); fetching again into a folder
with a damaged or missing picture replaces it. They live in
`$OSDIFF_PHOTOS`, default `~/.cache/osdiff/wallpapers`.

Of the packages' 45 pictures, 12 are photographs; the others are digital paintings (gradients,
flat shapes, a few rendered scenes), which carry every hue but little texture. Eight of the
photographs are held out (with four of scikit-image's) and never cropped for training; the
held-out set covers foliage, sky, water, skin and man-made scenes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

PACKAGES = ("plasma-workspace-wallpapers", "ukui-wallpapers")
# Debian 12's versions, which the pictures' SHA-256 are pinned to (other distributions and
# releases ship other versions: apt-get then says it has no such version)
VERSIONS = {"plasma-workspace-wallpapers": "4:5.27.5-2", "ukui-wallpapers": "20.04.3-1.1"}
# every picture is used at this size (longer side, pixels): the packages' 2560-5120 px originals
# are smoother per pixel than any photo a user compresses; 768 is the size the held-out
# measurements of issue 29 were made at
LONG_SIDE = 768


@dataclass(frozen=True)
class Wallpaper:
    name: str
    path: str  # inside the package
    sha256: str
    photo: bool  # a photograph (else a digital painting)
    held_out: bool
    content: str = ""
    licence: str = ""


def _kde(name: str, size: str, sha: str, photo: bool = False, held_out: bool = False, content: str = "",
         licence: str = "LGPL-3", folder: str = "images", ext: str = "jpg") -> Wallpaper:
    return Wallpaper(name if folder == "images" else f"{name}_dark",
                     f"usr/share/wallpapers/{name}/contents/{folder}/{size}.{ext}", sha, photo, held_out, content,
                     licence)


def _ukui(file: str, sha: str) -> Wallpaper:
    return Wallpaper(Path(file).stem, f"usr/share/backgrounds/{file}", sha, False, False, "", "CC-BY-SA-3.0")


WALLPAPERS = (
    # the photographs (author; licence from metadata.json)
    _kde("Path", "2560x1600", "7477457d7f17b736259f1b021864778ad4ba802cf3214e6728181ff29126bba8", True, True,
         "foliage: a forest path (Risto Saukonpää)"),
    _kde("FallenLeaf", "2560x1600", "95603a6560c7e8d50e0e03b3f4adbe39c5258c72528e74e4ecaea1daf4e499de", True, True,
         "foliage: autumn leaves, blurred background (Martin Klapetek)"),
    _kde("Kite", "2560x1600", "bdca288ce296a981e80659c021cf707caddc702c0c8d4247e60bd618476d47f8", True, True,
         "sky: clouds and a kite (Risto Saukonpää)"),
    _kde("summer_1am", "2560x1600", "c868b50789591dd42910153c768053f1ba0a98cb36bbfc2b7a96a1045d0477f8", True, True,
         "sky, water: a lake at dusk (Risto Saukonpää)"),
    _kde("BytheWater", "2560x1600", "c272434ef39f2abf1ed48a15a8910088020f3165329a5092f3940ec9464bc05f", True, True,
         "water, man-made: a wooden pier (Maciej Wiklo)"),
    _kde("EveningGlow", "2560x1600", "586682dcb362b9f620068f10138f87d0d3649939aef238adc5807cb951976a7a", True, True,
         "sky, water, man-made: boats at sunset (Ian Hex)"),
    _kde("ColorfulCups", "2560x1600", "6e0f3a72feb5a4a9fec191b77e34874c3c69e2d93040deb3f07773e73385023d", True, True,
         "man-made: stacked cups (Dmitri Popov)"),
    _kde("Volna", "5120x2880", "abc30b4fc6f6a83b6156e6b59ac283c067de40af820aafac8ac7c4fd83a9607c", True, True,
         "water, sand: a beach from above (Nikita Babin)", licence="CC-BY-SA-4.0"),
    _kde("OneStandsOut", "2560x1600", "cb507baf1dafdcae362264f3aba9483ed4be5f6c9fdd770f0ec0920c6d9e80fd", True, False,
         "foliage: moss (Risto Saukonpää)"),
    _kde("ColdRipple", "2560x1600", "05bef6722fc0ed81292cceb3ed026c38d17e510f3c84be7d68610c2b1a723c3f", True, False,
         "water, man-made: a pier in fog, grey (Risto Saukonpää)"),
    _kde("Grey", "2560x1600", "88c31d8944b7e6935d1b9a296654c692f0772cb512491713eb30a972a604c0ed", True, False,
         "man-made: a facade, grey (Sigi Sagi)"),
    _kde("DarkestHour", "2560x1600", "8e3703fae3a3c217b1fc2b399b706cd3720584268d071ba153e4809daa55f1ce", True, False,
         "water, sky: a lake at night (Risto Saukonpää)"),
    # KDE's digital paintings
    _kde("Altai", "5120x2880", "f693f572875536b41935417f88d523bb0174b77c2dd7f00b71cd55436f93387d", ext="png"),
    _kde("Autumn", "2560x1600", "dfded25df13f5c2dfee68cafb23f69c3efb32b8a6931d82ebbe42de9810dd1e4"),
    _kde("Canopee", "3840x2160", "c538a5a7f7f78fbc129006b889acd8580e088f070df83509a1a7a7af9681ae43", ext="png"),
    _kde("Cascade", "3840x2160", "1915b53a6c0679595cdc3601dd3fc2984774152cbe40550b338d0121a41828c8", ext="png"),
    _kde("Cluster", "3840x2160", "e3e77c68791e1b7cc2e46bc9428798ac5582e9f88e1d6ca570078129437e596f", ext="png"),
    _kde("Elarun", "2560x1600", "ce4d7a22554fdc4d170c56bdee699e92ef6d721f4507f963702ed866029c01ed", ext="png"),
    _kde("Flow", "5120x2880", "b2f1fbe9ebf772fed224de83ee4159cc3735c633a88cc42f8f45d49ccd12efc3"),
    _kde("Flow", "5120x2880", "1798416959864c574fcafa333da73f30d810ae7aa9e65f68451c8a2345636b19", folder="images_dark"),
    _kde("FlyingKonqui", "2560x1600", "856ecdf80b8253759629ae2c76d25d63d79fa81dbf05e4ee7ae0c95454e555bb", ext="png"),
    _kde("Honeywave", "5120x2880", "e75adbd953e9b7dc8946223e7f1f2c4a9378496e7597198f65b095356995c7ad"),
    _kde("IceCold", "5120x2880", "4f000813086b839f4845e40bb51385e2e2afaf1df5bf55514d808f70611a63e6", ext="png"),
    _kde("Kay", "5120x2880", "2b2fcfe33dbf701deb524f04231a3966e40f3239baf70469318c00c3961c2458", ext="png"),
    _kde("Kay", "5120x2880", "f911dedd21a9f874d8de7835e3d06ca1a3fd0dfaa623bea99c232856be140606", ext="png",
         folder="images_dark"),
    _kde("Kokkini", "3840x2160", "ba6fbd6ca54e4fef11e6c3e0b4f8fce21305846c7fcc2bcac6b4e15c75343d46", ext="png"),
    _kde("MilkyWay", "5120x2880", "777b501b626c0e8417167229187a787bbaf2b59c83f8343c18d1b0486e754296", ext="png"),
    _kde("Opal", "3840x2160", "bdc37f083dd498c54b853a273b2518a6402dbece172cc2d7873c478d70e06b20", ext="png"),
    _kde("PastelHills", "3200x2000", "8a5f3dc3ddc75687b5cc83833acb1ec9ce0b03d6529b2dace584707485447506"),
    _kde("Patak", "5120x2880", "e8f6167bafea78c54e2b736c448ce22809cc0bd085fb3a371d71546e956e7391", ext="png"),
    _kde("Patak", "3840x2160", "8e79f4f3aaab328440271485023fcaf3372a40b4e68188eeee5ca78e3d0695dc", ext="png",
         folder="images_dark"),
    _kde("SafeLanding", "5120x2880", "7341ff2532d1a13a2ba35f2a9219a2c6cb070446f1aae4ce9a3a981c3bedd32f"),
    _kde("Shell", "5120x2880", "220d5fe725453dba2329b6733cb7094d8615f2e0bbbb8a150e9f113101c02213"),
    # Ubuntu Kylin's digital paintings
    _ukui("2004default.jpg", "3a9ce649f4cc97bec5f53eba56b73d4186efa86de0708bf1d85236eeeb875ca8"),
    _ukui("calla.png", "26fc5b5461f37132d913c9b03a48392e59a58f66e665cc5dfc2d997bda4190d4"),
    _ukui("city.png", "7d7d048f935a7ca9de2808bc0523507a2fe36eda7e9b2fdfc1e3ebd7f4f2169d"),
    _ukui("desert.png", "e4247a65a08bdf23b42b318583ca9d2c796728466d30a2afdcf3a135c6a14a34"),
    _ukui("firstgeneration.jpg", "177f1f8cf97dce50abd06c60f274547114b71519f3484e744beecaffa4fd6faa"),
    _ukui("fluent-color.png", "d8c185c623cdacf36133a3030ac86d73ef2b54e9aad1c8fab1ccb4d91f297511"),
    _ukui("focal-ubuntukylin.png", "3590397864dfceb16f14fc7646c5465a691082fd33a5fc8702c31d954fd9ef0a"),
    _ukui("goldfish.png", "a01ef5d91bfe63fd77e91107ebb83fe203b39ad09cfb40488c56d21f50dffe0f"),
    _ukui("rhythm.jpg", "7ed93d313b3a699b0f97af153aa3af6dcfdedb8dd35b4fba090f16fb82087de0"),
    _ukui("rollpaper.png", "6928e4ae7483a4df1fa5d3cdd89ef94fa236fe560f97c99f399f0163120e9669"),
    _ukui("string.jpg", "73fd26471a45955d256e9318fb24e7ec3a6a922fdc12ec3080c75d2a8da8ab3d"),
    _ukui("the-mouse.jpg", "e4717d5cb7dd3ed12cf0883567b7f2ca38dd83a073a12fc666e8c3b87c3abf79"),
)
BY_NAME = {w.name: w for w in WALLPAPERS}


def photo_dir() -> Path:
    """Where fetch() puts the pictures: $OSDIFF_PHOTOS, else ~/.cache/osdiff/wallpapers."""
    return Path(os.environ.get("OSDIFF_PHOTOS") or Path.home() / ".cache" / "osdiff" / "wallpapers")


def _file(w: Wallpaper, folder: Path) -> Path:
    return folder / f"{w.name}{Path(w.path).suffix}"


def available(folder: Path | None = None) -> bool:
    """Whether every picture of WALLPAPERS is in the folder (not whether it is intact: load checks)."""
    folder = photo_dir() if folder is None else folder
    return all(_file(w, folder).is_file() for w in WALLPAPERS)


def missing_message(folder: Path | None = None) -> str:
    folder = photo_dir() if folder is None else folder
    return (f"the wallpaper photographs are not in {folder}: fetch them with `make photos` or `python -m "
            f"osdiff.training.wallpapers` (apt-get download of Debian 12's {' and '.join(PACKAGES)}, about 115 MB)")


def _intact(w: Wallpaper, folder: Path) -> bool:
    path = _file(w, folder)
    return path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == w.sha256


def load(name: str, folder: Path | None = None) -> np.ndarray:
    """One picture of WALLPAPERS as H x W x 3 uint8, its longer side LONG_SIDE pixels (Lanczos).

    Raises FileNotFoundError (not fetched) or ValueError (its SHA-256 is not the pinned one)."""
    w = BY_NAME[name]
    folder = photo_dir() if folder is None else folder
    path = _file(w, folder)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {missing_message(folder)}")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != w.sha256:
        raise ValueError(f"{path}: not the pinned picture (SHA-256 differs); fetch again into an empty folder")
    with Image.open(path) as im:
        im = im.convert("RGB")  # the PNGs are RGBA, fully opaque
        k = LONG_SIDE / max(im.size)
        return np.asarray(im.resize((round(im.size[0] * k), round(im.size[1] * k)), Image.LANCZOS))


def fetch(folder: Path | None = None, log=print) -> Path:
    """Download both packages with apt-get, keep the pictures of WALLPAPERS (SHA-256 checked) and
    the packages' copyright files in `folder`. Raises RuntimeError when apt-get or dpkg-deb fail
    or a picture is missing or differs."""
    folder = photo_dir() if folder is None else folder
    if all(_intact(w, folder) for w in WALLPAPERS):
        log(f"{folder}: already there (every SHA-256 checked)")
        return folder
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} not found: the wallpaper packages are fetched with Debian's package tools")
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        packages = [f"{p}={VERSIONS[p]}" for p in PACKAGES]
        log(f"apt-get download {' '.join(packages)}")
        run = subprocess.run(["apt-get", "download", *packages], cwd=tmp, capture_output=True, text=True)
        debs = sorted(Path(tmp).glob("*.deb"))
        if run.returncode != 0 or len(debs) != len(PACKAGES):
            raise RuntimeError(f"apt-get download failed (the pictures are pinned to Debian 12's packages): "
                               f"{run.stderr.strip()[-500:]}")
        root = Path(tmp) / "root"
        for deb in debs:
            subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
        for w in WALLPAPERS:
            src = root / w.path
            if not src.is_file() or hashlib.sha256(src.read_bytes()).hexdigest() != w.sha256:
                raise RuntimeError(f"{w.path}: missing or different in the downloaded packages (another version?)")
            shutil.copyfile(src, _file(w, folder).with_suffix(".part"))
            _file(w, folder).with_suffix(".part").replace(_file(w, folder))
        for package in PACKAGES:
            shutil.copyfile(root / "usr/share/doc" / package / "copyright", folder / f"{package}.copyright")
    log(f"{len(WALLPAPERS)} pictures in {folder}")
    return folder


if __name__ == "__main__":
    fetch(Path(sys.argv[1]) if len(sys.argv) > 1 else None)
