"""The top-level folders install as one namespace, `osdiff`, editable and as a wheel, each with
the native coder built by CMakeLists.txt."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import REPO

MODULES = ["osdiff.cli", "osdiff.export.model", "osdiff.export.models.unet", "osdiff.runtime.codec",
           "osdiff.runtime.backends.onnxruntime_backend", "osdiff.engine.profiles", "osdiff.calibration.precision",
           "osdiff.serving.models",
           "osdiff.evaluation.run", "osdiff.evaluation.compare", "osdiff.runtime._rans"]
# Imports the modules, codes a few symbols with the native coder, prints where osdiff.export and
# the extension came from. With "wheel", the editable install's import redirect (scikit-build-core
# puts it first on sys.meta_path) is dropped, so that the copy on PYTHONPATH is what imports.
CHECK = """
import importlib, sys
import numpy as np
if sys.argv[1] == "wheel":
    sys.meta_path[:] = [f for f in sys.meta_path if "ScikitBuild" not in type(f).__name__]
for m in sys.argv[2:]:
    importlib.import_module(m)
from osdiff.runtime.coder import Decoder, Encoder
from osdiff.runtime.entropy import GaussianConditional
import osdiff.export, osdiff.runtime._rans as native
tables = GaussianConditional().tables
enc = Encoder("native")
enc.encode(np.arange(-5, 5, dtype=np.int32), np.arange(10, dtype=np.uint8), tables)
assert Decoder(enc.flush(), tables, 10, "native").decode(np.arange(10, dtype=np.uint8)).tolist() == list(range(-5, 5))
print(osdiff.export.__file__)
print(native.__file__)
"""


def test_editable_install_maps_the_folders():
    out = subprocess.run([sys.executable, "-c", CHECK, "editable", *MODULES], capture_output=True, text=True,
                         check=True, cwd="/")
    export, extension = map(Path, out.stdout.split())
    assert export == REPO / "export" / "__init__.py"
    assert extension.name.startswith("_rans.") and extension.parent.parts[-2:] == ("osdiff", "runtime")


def test_make_installs_the_build_requirements():
    """The Makefile installs pyproject's build requirements into the venv, so that rebuilding the
    extension (and the wheel test below) needs no network: the two lists must agree."""
    tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python 3.11")

    build = tomllib.loads((REPO / "pyproject.toml").read_text())["build-system"]["requires"]
    makefile = (REPO / "Makefile").read_text()
    line = next(ln for ln in makefile.splitlines() if ln.startswith("BUILD_REQUIRES"))
    assert sorted(line.split(":=", 1)[1].replace('"', "").split()) == sorted(build)


def test_built_wheel_installs_and_imports(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(REPO)],
                   check=True, capture_output=True)
    (wheel,) = tmp_path.glob("osdiff_engine-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "osdiff/assets/demo.png" in names and "osdiff/assets/demo_model.safetensors" in names
    assert not any(n.startswith(("export/", "runtime/", "engine/", "calibration/", "serving/", "evaluation/", "training/",
                                 "tests/")) for n in names)
    assert "osdiff/export/models/unet.py" in names and "osdiff/runtime/backends/base.py" in names
    assert any(n.startswith("osdiff/runtime/_rans.") for n in names)
    assert not any(n.startswith("osdiff/runtime/native/") or n.endswith((".pyc", ".cpp", ".hpp")) for n in names)
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    env = dict(os.environ, PYTHONPATH=str(site))
    out = subprocess.run([sys.executable, "-c", CHECK, "wheel", *MODULES], capture_output=True, text=True, check=True,
                         cwd="/", env=env)
    export, extension = map(Path, out.stdout.split())
    assert export == site / "osdiff" / "export" / "__init__.py"
    assert extension.parent == site / "osdiff" / "runtime"
    assert (site / "bin" / "osdiff").exists()
